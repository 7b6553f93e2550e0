"""One labelling run over many inputs, in-process ("local") or on Ray Data ("ray"), resumable.

    summary = run(["data/", "s3://bucket/more/"], [("ex.png", "ex_mask.png")], "s3://bucket/labels/",
                  engine="ray", actors=4, gpus_per_actor=1)
    summary.failed, summary.review          # the failures are rows of review.parquet

Both engines run the same stages on the same groups of inputs (`Labeller`: records.fetch ->
predictor.SegGPTPredictor -> records.write_results, then records.merge), so they write the same files.
A group is `batch_size` consecutive inputs of the listing, one model batch, in every run and either
engine: a resumed run gives the same results as an uninterrupted one. On Ray Data the groups stream
through an actor pool (one model per actor) with bounded buffers; the local engine takes one group at a
time. Either way no list of decoded images is ever held.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import InputError, SegGPTError
from ..export import ExportOptions, categories_for
from ..preflight import check_out_of_inputs, check_prompts, check_writable
from ..vocabulary import AUTO_MODEL
from . import records
from .sources import Item, check_sources, is_url, iter_sources, read_bytes
from .storage import Store

ENGINES = ("local", "ray")
LISTING = f"{records.RUN_FOLDER}/listing"
LISTING_PART_ROWS = 256  # inputs per listing part (whole groups): the unit Ray Data splits the work by
SMALL_PARTS_PER_ACTOR = 4  # the first parts hold one group each: every actor busy from the start
LISTING_CPUS = 0.1  # what a listing task asks of Ray
FORWARDED_ENV_PREFIXES = ("AWS_", "FSSPEC_", "SEGGPT_", "HF_")  # to Ray workers: storage and model settings


@dataclass
class RunSummary:
    """What a run did: inputs seen, done and failed in the final outputs, labelled by this very run."""

    out: str
    inputs: int = 0
    done: int = 0
    failed: int = 0
    labelled_now: int = 0  # inputs this run segmented (the others were done by an earlier, interrupted run)
    seconds: float = 0.0
    engine: str = "local"
    files: dict = field(default_factory=dict)  # review / coco -> where
    failures: list = field(default_factory=list)  # (path, reason) of the first failed inputs

    @property
    def review(self) -> str:
        return self.files["review"]


def run(sources: Iterable[str], prompts=(), out: str = "", *, tuned_prompts=(), engine: str = "local",
        ray_address: str | None = None, actors: int = 1, gpus_per_actor: float = 0,
        cpus_per_actor: float | None = None, ray_logs: bool = False,
        model: str = AUTO_MODEL, device=None, dtype=None, quantize: str | None = None, threads: int | None = None,
        batch_size: int = 8, most_similar: int | None = None, seg_type: str = "instance", intensity_range=None,
        ensemble: str = "feature", tile=None, halo: int = 32, quality: str | None = "fast",
        options: ExportOptions = ExportOptions(), overwrite: bool = False, progress: bool = True,
        example_ids: str = "auto") -> RunSummary:
    """Label every input of `sources` (files, folders, globs, manifests, s3:// ...) from the example
    (image, mask) pairs `prompts` into the folder or prefix `out`: label maps mirroring the input tree,
    review.parquet (one row per input) and, with "coco" in options.formats, coco.json.

    Everything is checked before any model work (InputError). `out` remembers the run's settings; a run
    with the same settings resumes it, other settings need `overwrite` (which starts over).
    Ray: `cpus_per_actor` None is 1 CPU per actor, or on a local Ray an equal share of the machine when
    `actors` of 1 CPU would not fit beside the listing tasks; `ray_logs` shows Ray's own log lines.
    """
    started = time.time()
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("actors", actors, 1)):
        if value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise InputError(f"--cpus-per-actor must be > 0, got {cpus_per_actor}")
    if not gpus_per_actor >= 0:
        raise InputError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    if options.output not in records.MAP_SUFFIXES or "panoptic" in options.formats:
        raise InputError("a scaled run writes --output labels or instances (panoptic: run without --engine)")
    options.check(seg_type)
    if not out:
        raise InputError("give the output folder or prefix (--out)")
    # local paths made absolute: every stage (a Ray worker too) reads the same files, whatever its folder
    sources = [_absolute(s) for s in check_sources(sources)]
    prompts = [(_absolute(i), _absolute(m)) for i, m in prompts]
    tuned_prompts = [_absolute(t) for t in tuned_prompts]
    out = _absolute(out)
    model = _model_source(model)
    if not prompts and not tuned_prompts:
        raise InputError("give at least one --prompt IMAGE MASK or --tuned-prompt FILE")
    check_out_of_inputs(out, sources)
    if not is_url(out):
        check_writable(out)
    ids, colors, objects, instance_like = _checked_examples(prompts, tuned_prompts, example_ids)
    categories = categories_for(ids, options.names, colors, objects, instance_like) if options.objects else {}
    examples = [path for pair in prompts for path in pair]  # never targets, even inside a target folder
    predictor_kwargs = dict(prompts=prompts, tuned_prompts=[str(t) for t in tuned_prompts], model=str(model),
                            device=device, dtype=dtype, quantize=quantize, threads=threads, most_similar=most_similar,
                            batch_size=batch_size, seg_type=seg_type,
                            intensity_range=tuple(intensity_range) if intensity_range else None,
                            ensemble=ensemble, tile=tile, halo=halo, quality=quality, output=options.output,
                            min_area=options.min_area, split_touching=options.split_touching,
                            example_ids=example_ids)
    store = Store(out)
    _claim(store, {"sources": sources, "predictor": predictor_kwargs, "formats": list(options.formats)}, overwrite)
    summary = RunSummary(out=store.root, engine=engine)
    stages = dict(out=store.root, output=options.output, formats=tuple(options.formats))
    inputs = functools.partial(iter_sources, sources, examples)
    if engine == "local":
        summary.labelled_now = _run_local(inputs, predictor_kwargs, stages, progress)
    else:
        summary.labelled_now = _run_ray(inputs, predictor_kwargs, stages, ray_address, actors, gpus_per_actor,
                                        cpus_per_actor, batch_size, progress, ray_logs)
    counts = records.merge(inputs(), store.root, categories, "coco" in options.formats)
    if counts["missing"]:
        raise InputError(f"{counts['missing']} input(s) have no result (did the sources change during the run?); "
                         "run the same command again to finish them")
    summary.inputs, summary.done, summary.failed = counts["inputs"], counts["done"], counts["failed"]
    summary.failures = counts["failures"]
    summary.files = {"review": store.url(records.REVIEW_FILE)}
    if "coco" in options.formats:
        summary.files["coco"] = store.url(records.COCO_FILE)
    summary.seconds = round(time.time() - started, 3)
    return summary


def _absolute(location) -> str:
    location = str(location)
    return location if is_url(location) else os.path.abspath(location)


def _model_source(model) -> str:
    """The model every actor loads: "auto" resolved here, once; a local folder or file made absolute."""
    from ..loading import resolve_source

    source = resolve_source(model)
    return os.path.abspath(source) if os.path.exists(source) else source


def _checked_examples(prompts, tuned_prompts, example_ids: str = "auto") -> tuple[list[int], dict | None, bool,
                                                                                  bool]:
    """(the prompts' label ids, {id: colour} for colour masks or None, whether the ids number objects, whether
    the masks look instance-labelled), the example pairs checked first (preflight.check_prompts: readable, one
    size per pair, ids the colour prompt keeps apart, some foreground), before any model work: what
    export.categories_for names them by."""
    from ..example_ids import ids_are_objects, instance_labelled
    from ..images import to_mask
    from ..prompts import TunedPrompt
    from .predictor import decode

    if tuned_prompts:
        return [int(i) for i in TunedPrompt.load(tuned_prompts[0]).code.ids], None, False, False
    images, masks = [], []
    for image, mask in prompts:
        try:
            masks.append(to_mask(decode(read_bytes(mask), mask, as_mask=True), name=f"--prompt {image} {mask}"))
            images.append(decode(read_bytes(image), image) if is_url(image) else image)
        except OSError as exc:
            raise InputError(f"--prompt {image} {mask}: cannot be read ({exc})") from None
    code = check_prompts(images, masks, example_ids=example_ids, mask_names=[mask for _, mask in prompts])
    colour_masks = bool(masks) and masks[0].ndim == 3
    return ([int(i) for i in code.ids], code.as_dict() if colour_masks else None,
            bool(masks) and ids_are_objects(masks, example_ids), instance_labelled(masks))


def _claim(store: Store, settings: dict, overwrite: bool) -> None:
    """Make `store` this run's folder: resume a run with the same settings, refuse anything else (unless
    `overwrite`, which forgets the earlier run's records)."""
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    earlier = store.get(records.SETTINGS)
    if earlier is not None and json.loads(earlier) == settings:
        store.remove_partial()  # a killed run's half-written files (its finished ones are kept)
        return
    if not overwrite:
        if earlier is not None:
            raise InputError(f"{store.root}: holds a run with other settings (sources, prompts, model or "
                             "outputs); pass --overwrite to start over, or choose another --out")
        if not store.is_empty():
            raise InputError(f"{store.root}: is not empty; choose an empty output folder, or pass --overwrite")
    store.remove(records.RUN_FOLDER)
    store.put(records.SETTINGS, json.dumps(settings, indent=1).encode())


def groups(items: Iterable[Item], size: int):
    """{uri, stem} columns of `size` consecutive items: the model batches, the same in every run."""
    import numpy as np

    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield {"uri": np.asarray([i.uri for i in chunk], dtype=object),
               "stem": np.asarray([i.stem for i in chunk], dtype=object)}


class Labeller:
    """fetch -> SegGPTPredictor -> write, one group of inputs (one model batch) at a time: the body of
    both engines (in this process, or as the actors of a Ray Data actor pool). Reading and writing in
    the actor keeps images and label maps out of Ray's object store, and each group whole."""

    def __init__(self, predictor_kwargs: dict, stages: dict):
        from .predictor import SegGPTPredictor

        self.predictor = SegGPTPredictor(**predictor_kwargs)
        self.stages = stages

    def label(self, group: dict) -> dict:
        fetched = records.fetch(group, self.stages["out"])
        if not len(fetched["path"]):
            return {"path": fetched["path"], "status": fetched["path"]}
        return records.write_results(self.predictor(fetched), **self.stages)

    def __call__(self, batch: dict) -> dict:
        """Rows of groups ({uris, stems} as JSON lists) -> {path, status} of the inputs written."""
        import numpy as np

        written = [self.label({"uri": json.loads(u), "stem": json.loads(s)})
                   for u, s in zip(batch["uris"], batch["stems"])]
        return {key: np.concatenate([w[key] for w in written] or [np.asarray([], dtype=object)]).astype(object)
                for key in ("path", "status")}


def _run_local(inputs, predictor_kwargs, stages, progress) -> int:
    """The stages in this process, one group at a time (`inputs()` lists them)."""
    from tqdm import tqdm

    store = Store(stages["out"])
    todo = [g for g in groups(inputs(), predictor_kwargs["batch_size"]) if not records.group_done(g, store)]
    if not todo:
        return 0  # a finished run, resumed: no model loaded
    labeller = Labeller(predictor_kwargs, stages)
    labelled = 0
    total = sum(len(g["uri"]) for g in todo)  # for the progress bar's total and its ETA
    with tqdm(total=total, desc="segmenting", unit="image", disable=not progress, file=sys.stderr) as bar:
        for group in todo:
            labelled += len(labeller.label(group)["path"])
            bar.update(len(group["uri"]))
    return labelled


def _write_listing(inputs, store: Store, size: int, actors: int) -> tuple[int, int]:
    """The input groups still to do (a group whose inputs are all done is left out) as JSON-lines parts of
    the run folder: (inputs, parts). A part is Ray Data's unit of work (one block, for one actor at a
    time): the first few hold one group each, so that every actor has work at once even for a few inputs,
    the others LISTING_PART_ROWS inputs."""
    store.remove(LISTING)
    total = parts = 0
    lines: list[str] = []

    def flush():
        nonlocal parts
        store.put(f"{LISTING}/{parts:08d}.jsonl", "".join(lines).encode())
        parts += 1
        lines.clear()

    for group in groups(inputs(), size):
        if records.group_done(group, store):
            continue
        lines.append(json.dumps({"uris": list(group["uri"]), "stems": list(group["stem"])}) + "\n")
        total += len(group["uri"])
        if parts < SMALL_PARTS_PER_ACTOR * actors or len(lines) * size >= LISTING_PART_ROWS:
            flush()
    if lines:
        flush()
    return total, parts


def read_listing_part(row: dict, out: str) -> list[dict]:
    """The input groups of one listing part (a Ray Data flat_map stage)."""
    data = Store(out).get(f"{LISTING}/{int(row['part']):08d}.jsonl") or b""
    return [{"uris": json.dumps(g["uris"]), "stems": json.dumps(g["stems"])}
            for g in map(json.loads, data.decode().splitlines())]


def _ray_init(address: str | None, logs: bool):
    """Connect to the cluster at `address` (or $RAY_ADDRESS), or start a Ray of our own for this run (whose
    processes a Reaper ends with this process, however it ends). Returns the Reaper, or None."""
    import logging
    import warnings

    import ray

    reaper = None
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            from .reaper import Reaper

            reaper = Reaper()
        # no address: a Ray of our own ("local"), never a cluster someone else started on this machine
        with contextlib.nullcontext() if logs else _quiet_ray_core():
            ray.init(address=address or "local", runtime_env={"env_vars": env} if env else None,
                     log_to_driver=logs, include_dashboard=None if address else False,
                     logging_level="INFO" if logs else "ERROR")
        if reaper is not None:
            node = ray._private.worker._global_node
            reaper.follow(info.process.pid for infos in node.all_processes.values() for info in infos)
    if not logs:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"ray\.")
    return reaper


@contextlib.contextmanager
def _quiet_ray_core():
    """Ray's C++ core in this process logs only fatal errors (it writes to the terminal, not through Python's
    logging); the one line that says so, printed while Ray starts, goes to /dev/null with the rest of what
    the start prints there."""
    saved_level = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = saved_level or "fatal"
    sys.stderr.flush()
    saved_fd, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(null)
        if saved_level is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


def fit_actors(actors: int, cpus_per_actor: float | None, gpus_per_actor: float, cluster: dict,
               local: bool) -> float:
    """The CPUs each actor asks for, so that the actors and the listing tasks (LISTING_CPUS) fit the
    cluster's resources: with none given, 1, or on a local Ray an equal share of its CPUs when that does
    not fit (Ray would otherwise wait for a CPU forever). Actors a local Ray cannot hold are refused
    (InputError); a cluster may grow (autoscaling), so there it is a warning.

    Args:
        actors: model copies (--actors).
        cpus_per_actor: --cpus-per-actor, or None for the default.
        gpus_per_actor: --gpus-per-actor.
        cluster: ray.cluster_resources() ({"CPU": ..., "GPU": ...}).
        local: whether the Ray was started for this run (its resources are all there will be).
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    where = "this machine's Ray" if local else "the Ray cluster"
    problems = []
    if actors * gpus_per_actor > gpus + 1e-9:
        problems.append(f"--actors {actors} with --gpus-per-actor {gpus_per_actor:g} need {actors * gpus_per_actor:g} "
                        f"GPU(s); {where} has {gpus:g}")
    room = cpus - LISTING_CPUS
    wanted = 1.0 if cpus_per_actor is None else cpus_per_actor
    if actors * wanted > room + 1e-9:
        if cpus_per_actor is None and local and actors <= cpus:
            wanted = math.floor(room / actors * 100) / 100  # every actor a share, the listing its 0.1
        else:
            problems.append(f"--actors {actors} with --cpus-per-actor {wanted:g} need {actors * wanted:g} CPU(s) "
                            f"besides {LISTING_CPUS:g} for listing; {where} has {cpus:g}")
    if problems:
        advice = "give fewer --actors" + (" or a smaller --cpus-per-actor" if cpus_per_actor is not None else "")
        if local:
            raise InputError(f"{'; '.join(problems)}: {advice}")
        print(f"seggpt: warning: {'; '.join(problems)}: the run waits until the cluster has them", file=sys.stderr)
    return wanted


def _run_ray(inputs, predictor_kwargs, stages, address, actors, gpus_per_actor, cpus_per_actor, batch_size,
             progress, logs=False) -> int:
    """The stages on Ray Data: listing parts -> groups of inputs -> Labeller actors (an actor pool, one
    model each: fetch, SegGPTPredictor, write); the driver only counts what comes back."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise InputError("--engine ray needs Ray Data: pip install 'seggpt-plugins[ray]'")
    store = Store(stages["out"])
    total, parts = _write_listing(inputs, store, batch_size, actors)
    if not total:
        return 0  # a finished run, resumed: no Ray started
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError(f"--engine ray needs Ray Data: pip install 'seggpt-plugins[ray]' ({exc})") from None
    from tqdm import tqdm

    reaper = _ray_init(address, logs)
    local = reaper is not None or (not address and not os.environ.get("RAY_ADDRESS"))
    try:
        cpus_per_actor = fit_actors(actors, cpus_per_actor, gpus_per_actor, ray.cluster_resources(), local)
    except InputError:
        if reaper is not None:
            ray.shutdown()
        raise
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # the part numbers, one block each, live in the object store (a read task would ask for a whole CPU)
    ds = ray.data.from_items([{"part": k} for k in range(parts)], override_num_blocks=max(1, parts))
    ds = ds.flat_map(read_listing_part, fn_kwargs={"out": store.root}, num_cpus=LISTING_CPUS)
    ds = ds.map_batches(Labeller, fn_constructor_kwargs={"predictor_kwargs": predictor_kwargs, "stages": stages},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(actors, parts)),  # no idle copies
                        num_gpus=gpus_per_actor,
                        num_cpus=cpus_per_actor)
    labelled = 0
    try:
        with tqdm(total=total, desc="segmenting", unit="image", disable=not progress, file=sys.stderr) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                labelled += len(batch["path"])
                bar.update(len(batch["path"]))
    except ray.exceptions.RayError as exc:  # a bad setting met by an actor: its own one-line error
        cause = _cause(exc)
        if isinstance(cause, SegGPTError):
            raise cause from None
        raise
    finally:
        if reaper is not None:  # our own Ray: shut down here (the reaper only catches what a kill leaves)
            ray.shutdown()
    return labelled


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray error wraps (innermost)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc
