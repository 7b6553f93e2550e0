"""The one loop: targets and examples in, results out, the device never waiting on the host.

    runner = Runner(model, pool, most_similar=4, objects=ObjectRule(min_area=16))
    for result in runner.run(Target(key, image) for key, image in items):
        result.prediction, result.instances, result.confidence, result.prompts, result.error

Every host drives this loop: `SegGPT.segment` / `iter_segment` (the CLI, napari), the scale engines'
`SegGPTPredictor` (`seggpt segment --engine`, Ray actors, `seggpt labelstudio predict`), Label Studio's
/predict and the FiftyOne operator. It owns, once for all of them:

- decoding ahead of the device (reader threads, a window of a few batches);
- which examples a target is shown (all of a PromptSet, or the k most alike from a PromptPool) and a
  bounded cache of the PromptSets prepared for each choice;
- examples and target in one colour mode (grey examples make a colour target grey, a grey target makes
  colour examples grey: images.one_colour_mode);
- batches of targets, and of the tiles of large targets, of any sizes and prompt sets;
- per-target failures: a target that cannot be read or segmented is a `Result` with an `error`, and a
  batch that fails is retried target by target;
- the host work of a finished target (stitching, quality, objects) in worker threads while the device
  computes the next batch, and the consumer's own work (writing) in its thread, on CUDA; on a CPU the
  forward already uses every core and all of it runs inline;
- objects by one rule (`instances.ObjectRule`) with per-object and per-image quality;
- events for progress: per tile, per image, per failure.

The model is any object with SegGPT's public steps (`prepare_prompts`, `encode_images`, `paint_targets`,
`to_predictions`, `assess`, `device`): this module does not import the engine.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np

from .ensembles import Stitcher, Tile, auto_halo, auto_tile, tile_grid, tile_size
from .errors import InputError, SegGPTError
from .example_ids import check_example_ids
from .images import as_array, looks_grey, one_colour_mode, to_rgb8
from .instances import ObjectRule
from .prediction import Prediction
from .prompts import PromptPool, PromptSet
from .quality import check_quality
from .run_control import Missed, Stop, through_thread
from .run_items import Event, Result, Target, Tiling
from .vocabulary import SEG_TYPES

PROMPT_SETS_KEPT = 32  # prepared prompt sets kept when examples are chosen per target
READ_AHEAD_BATCHES = 1  # batches of targets decoded ahead of the one being assembled (by default)
PENDING_BATCHES = 2  # batches of finished targets whose host work may wait in the workers
NO_EXAMPLES = "no example left to show it (the only examples are the target itself)"


@dataclass
class _Job:
    """A target in flight: its pixels, prompts, tiles and the pieces done so far."""

    index: int
    target: Target
    rgb: np.ndarray
    prompts: PromptSet
    keys: tuple
    grid: list  # Tiles (one covering the image when untiled)
    views: tuple  # (False,) or (False, True): the mirrored target too (quality "full")
    tiling: Tiling | None  # None when untiled
    stitchers: dict = field(default_factory=dict)  # mirrored -> Stitcher
    whole: dict = field(default_factory=dict)  # mirrored -> Prediction (untiled)
    done: int = 0
    failed: BaseException | None = None

    @property
    def pieces(self) -> int:
        return len(self.grid) * len(self.views)

    @property
    def tiled(self) -> bool:
        return self.tiling is not None


@dataclass
class _Piece:
    job: _Job
    mirrored: bool
    tile: Tile
    crop: np.ndarray


class Runner:
    """Segments targets with examples; `run` yields one Result per target.

    Args:
        model: a SegGPT (engine.py).
        prompts: a PromptSet (every target is shown all of it), a PromptPool (each target is shown the
            `most_similar` most alike, or all of them), or None when every Target brings its own.
        most_similar: with a pool, how many examples each target is shown (None: all).
        label_ids: with a pool, every label id the examples may hold (one colour code for every choice).
        batch_size: targets (or tiles) per forward pass.
        seg_type, intensity_range, ensemble, tile, halo, quality, with_painting: as in SegGPT.segment.
        objects: the object rule (instances.ObjectRule) to apply to every prediction, or None for label maps only.
        keep_images: give each Result the target's RGB as segmented (e.g. for an overlay).
        overlap: run host work in worker threads beside the device (default: on CUDA only).
        readers: threads decoding targets (default: 2 on CUDA, 1 elsewhere; 0: in the runner's thread).
        read_ahead: batches decoded ahead of the one being assembled (0: a batch's images only; a host that
            bounds the pixels it holds counts batch_size * (1 + read_ahead) targets, plus its results).
        prompt_sets_kept: prepared prompt sets cached for choices from a pool.
        example_ids: with a pool, what the examples' ids mean ("auto", "classes", "instances"; example_ids.py).
        foreground_margin: how the paintings are read (colors.favour_background; None: the model's own).
    """

    def __init__(self, model, prompts: PromptSet | PromptPool | None = None, *, most_similar: int | None = None,
                 label_ids=None, batch_size: int = 8, seg_type: str = "instance", intensity_range=None,
                 ensemble: str = "feature", tile=None, halo: int = 32, quality: str | None = "fast",
                 with_painting: bool = False, objects: ObjectRule | None = None, keep_images: bool = False,
                 overlap: bool | None = None, readers: int | None = None, read_ahead: int = READ_AHEAD_BATCHES,
                 prompt_sets_kept: int = PROMPT_SETS_KEPT, example_ids: str = "auto",
                 foreground_margin: float | None = None):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if seg_type not in SEG_TYPES:
            raise InputError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
        if most_similar is not None and most_similar < 1:
            raise InputError(f"most_similar must be a whole number >= 1, got {most_similar}")
        if prompts is not None and not isinstance(prompts, (PromptSet, PromptPool)):
            raise TypeError(f"prompts must be a PromptSet, a PromptPool or None, got {type(prompts).__name__}")
        self.model, self.prompts, self.most_similar = model, prompts, most_similar
        self.batch_size, self.seg_type, self.intensity_range = batch_size, seg_type, intensity_range
        self.ensemble, self.halo, self.tile = ensemble, halo, tile_size(tile, halo)
        self.quality, self.with_painting = check_quality(quality), with_painting
        self.objects, self.keep_images = objects, keep_images
        self.example_ids = check_example_ids(example_ids)
        self.foreground_margin = foreground_margin
        on_cuda = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
        self.overlap = on_cuda if overlap is None else overlap
        self.readers = (2 if on_cuda else 1) if readers is None else readers
        self.read_ahead = max(0, read_ahead)
        self.code = None
        if isinstance(prompts, PromptPool):
            self.code = model.color_code([], [], label_ids) if label_ids is not None else prompts.code
        self._sets: OrderedDict = OrderedDict()  # choice -> PromptSet
        self._modes: OrderedDict = OrderedDict()  # id(PromptSet) -> [it, its examples' RGB, it made grey,
        #                                            whether each example looks grey]
        self._sets_kept = max(1, prompt_sets_kept)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- prompts

    def prompts_for(self, rgb: np.ndarray, exclude: tuple = ()) -> tuple[PromptSet | None, tuple]:
        """(the PromptSet a target is shown, the keys of the pool's examples in it); (None, ()) when the
        pool has nothing else to show it."""
        if isinstance(self.prompts, PromptSet):
            return self.prompts, ()
        if self.prompts is None:
            raise InputError("no prompts: give the Runner a PromptSet or a PromptPool, or each Target its own")
        pool = self.prompts
        if self.most_similar is None or self.most_similar >= len(pool):
            excluded = set(exclude)
            choice = tuple(i for i, key in enumerate(pool.keys) if key not in excluded)
        else:
            choice = pool.choose(rgb, self.most_similar, exclude=exclude)
        if not choice:
            return None, ()
        with self._lock:
            prepared = self._sets.get(choice)
            if prepared is None:
                images, masks = pool.pairs(choice)
                prepared = self.model.prepare_prompts(images, masks, (0, 255), code=self.code,
                                                      ensemble=self.ensemble, tile=self.tile,
                                                      example_ids=self.example_ids)
                self._sets[choice] = prepared
                while len(self._sets) > self._sets_kept:
                    self._sets.popitem(last=False)
            self._sets.move_to_end(choice)
        return prepared, tuple(pool.keys[i] for i in choice)

    # ----------------------------------------------------------------------------------------- run

    def run(self, targets: Iterable, *, total: int | None = None, on_event: Callable[[Event], None] | None = None,
            deadline: float | None = None, cancelled: Callable[[], bool] | None = None,
            errors: str = "collect") -> Iterator[Result]:
        """One Result per target, each as soon as it is done (results of one batch in target order).

        Args:
            targets: Target items, or plain images / paths (their position is their key).
            total: how many targets there are, for events (default: len(targets) when it has one).
            on_event: called with an Event per tile, image and failure (from the runner's thread).
            deadline: time.monotonic() after which no new batch starts: the targets not started are
                Results with `missed` set.
            cancelled: checked between batches; when it returns True the rest are `missed` likewise.
            errors: "collect" (a target that fails is a Result with `error`) or "raise" (its exception is
                raised, after the results finished before it).
        """
        if errors not in ("collect", "raise"):
            raise ValueError(f"errors must be 'collect' or 'raise', got {errors!r}")
        if total is None and hasattr(targets, "__len__"):
            total = len(targets)
        stop = Stop(deadline, cancelled)
        produced = self._produce(iter(targets), total, on_event or (lambda event: None), stop, errors == "raise")
        if not self.overlap:
            yield from produced
            return
        yield from through_thread(produced, stop, depth=PENDING_BATCHES * self.batch_size)

    def _produce(self, targets: Iterator, total, on_event, stop: Stop, raising: bool) -> Iterator[Result]:
        """The loop itself: read ahead, choose prompts, batch pieces, paint, finish each target."""
        workers = ThreadPoolExecutor(max(1, self.batch_size // 4), "seggpt-host") if self.overlap else None
        pending: deque = deque()  # Futures (or Results) of finished targets, in finishing order
        batch: list[_Piece] = []
        counts = {"done": 0}
        limit = PENDING_BATCHES * self.batch_size

        def emit(result: Result):  # a finished result: count it, report it, pass it on
            counts["done"] += 1
            on_event(Event("image" if result.ok else "failed", result.key, counts["done"], total))
            if raising and result.exception is not None:
                raise result.exception
            return result

        def ready(keep: int) -> Iterator[Result]:  # the finished ones, waiting until at most `keep` remain
            while pending and (len(pending) > keep or not isinstance(pending[0], Future) or pending[0].done()):
                item = pending.popleft()
                yield emit(item.result() if isinstance(item, Future) else item)

        def finished(job: _Job) -> None:
            if workers is None:
                pending.append(self._finish(job))
            else:
                pending.append(workers.submit(self._finish, job))

        try:
            for index, target, rgb, exc in self._read(targets):
                if stop():
                    pending.append(self._missed(index, target, stop.reason))
                    continue
                if isinstance(exc, Missed):  # e.g. a download the deadline cut: a later run may try again
                    pending.append(self._missed(index, target, str(exc)))
                    continue
                if exc is not None:
                    pending.append(self._failed(index, target, exc, "cannot be read"))
                    yield from ready(limit)
                    continue
                job = self._job(index, target, rgb)
                if not isinstance(job, _Job):  # a Result: no prompts for it
                    pending.append(job)
                    continue
                for piece in self._pieces(job):
                    batch.append(piece)
                    if len(batch) == self.batch_size:
                        self._paint(batch, finished, on_event, raising, stop)
                        batch = []
                        yield from ready(limit)
            if batch:
                self._paint(batch, finished, on_event, raising, stop)
            yield from ready(0)
        finally:
            if workers is not None:
                workers.shutdown(wait=True, cancel_futures=True)

    def _read(self, targets: Iterator) -> Iterator[tuple[int, Target, np.ndarray | None, BaseException | None]]:
        """(index, Target, RGB or None, exception or None) per target. With reader threads, a batch's targets
        are decoded together, and `read_ahead` batches more while it is assembled and painted."""
        items = (self._as_target(i, t) for i, t in enumerate(targets))
        if self.readers < 1:
            for index, target in items:
                yield (index, target, *self._decode(target))
            return
        with ThreadPoolExecutor(self.readers, "seggpt-read") as readers:
            chunks: deque = deque()

            def submit() -> bool:
                chunk = [(i, t, readers.submit(self._decode, t)) for i, t in islice(items, self.batch_size)]
                if chunk:
                    chunks.append(chunk)
                return bool(chunk)

            while True:
                while len(chunks) <= self.read_ahead and submit():
                    pass
                if not chunks:
                    return
                for index, target, decoded in chunks.popleft():
                    yield (index, target, *decoded.result())

    @staticmethod
    def _as_target(index: int, item) -> tuple[int, Target]:
        if isinstance(item, Target):
            return index, item
        name = f"target {index}" + (f" ({item})" if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__")
                                    else "")
        return index, Target(key=index, image=item, name=name)

    def _decode(self, target: Target) -> tuple[np.ndarray | None, BaseException | None]:
        name = target.name or str(target.key)
        try:
            image = target.image() if callable(target.image) else target.image
            limits = self.intensity_range
            if limits is None:  # the range its examples were read with, for a target that is not 8-bit either
                shared = getattr(target.prompts if target.prompts is not None else self.prompts, "intensity_range",
                                 None)
                if shared is not None:
                    image = as_array(image, name)
                    limits = None if image.dtype in (np.uint8, np.bool_) else shared
            return to_rgb8(image, limits, name=name), None
        except Exception as exc:  # the target's failure, reported with its result
            return None, exc

    def _job(self, index: int, target: Target, rgb: np.ndarray) -> "_Job | Result":
        try:
            prompts, keys = (target.prompts, ()) if target.prompts is not None else \
                self.prompts_for(rgb, tuple(target.exclude))
        except Exception as exc:
            return self._failed(index, target, exc)
        if prompts is None:
            return Result(target.key, index, error=NO_EXAMPLES, skipped=True)
        try:
            rgb, prompts = self._one_colour_mode(rgb, prompts)
        except Exception as exc:
            return self._failed(index, target, exc)
        auto = self.tile == "auto"
        size = auto_tile(prompts.sizes, rgb.shape) if auto else self.tile
        height, width = rgb.shape[:2]
        tiling = None
        if size:
            halo = auto_halo(size, self.halo) if auto else self.halo
            grid = tile_grid(rgb.shape, size, halo)
            tiling = Tiling(tuple(size), halo, len(grid), auto)
        else:
            grid = [Tile((0, height, 0, width), (0, height, 0, width))]
        views = (False, True) if self.quality == "full" else (False,)
        return _Job(index, target, rgb, prompts, keys, grid, views, tiling)

    def _one_colour_mode(self, rgb: np.ndarray, prompts: PromptSet) -> tuple[np.ndarray, PromptSet]:
        """The target and its prompts in one colour mode (images.one_colour_mode): the examples' pixels are
        read back from the prepared set, and judged grey or not, once per set; a set made grey is encoded
        once. Tuned prompts (learnt pixels) are left as they are. An extended set (a propagation run's
        memory after its examples) is judged by its examples alone: the memory is the targets' own frames."""
        own = prompts.base if prompts.base is not None else prompts
        if own.shown is None:
            return rgb, prompts
        with self._lock:
            kept = self._modes.get(id(own))
            if kept is None or kept[0] is not own:
                from .modeling import denormalize

                pixels = denormalize(own.images.float()).round().permute(0, 2, 3, 1).cpu().numpy()
                pixels = pixels.astype(np.uint8)
                kept = self._modes[id(own)] = [own, pixels, None, [looks_grey(e) for e in pixels]]
                while len(self._modes) > self._sets_kept:
                    self._modes.popitem(last=False)
            target, examples = one_colour_mode(rgb, kept[1], kept[3])
            if examples is kept[1]:
                return target, prompts
            if kept[2] is None:
                kept[2] = replace(own, images=self.model.encode_images(list(examples)))
            if own is prompts:
                return target, kept[2]
            import torch

            return target, replace(prompts, images=torch.cat([kept[2].images, prompts.images[len(own):]]))

    @staticmethod
    def _pieces(job: _Job) -> Iterator[_Piece]:
        for mirrored in job.views:
            view = job.rgb[:, ::-1] if mirrored else job.rgb
            for tile in job.grid:
                crop = view if not job.tiled else np.ascontiguousarray(view[tile.slices])
                yield _Piece(job, mirrored, tile, np.ascontiguousarray(crop) if mirrored else crop)

    # ----------------------------------------------------------------------------------- the device

    def _paint(self, batch: list[_Piece], finished: Callable[[_Job], None], on_event, raising: bool,
               stop: Stop) -> None:
        """One forward pass over a batch of pieces (retried piece by piece if it fails); each target whose
        last piece is done goes to `finished`. Past the deadline (or cancelled) the batch is not painted: its
        targets are missed, even those with tiles done already."""
        live = [p for p in batch if p.job.failed is None]
        if stop():
            for piece in live:
                piece.job.failed = piece.job.failed or Missed(stop.reason)
        if stop() or not live:
            for piece in batch:
                self._count(piece.job, finished)
            return
        try:
            predictions = self._forward(live)
        except Exception as exc:
            if raising:
                raise
            if len(live) == 1:
                live[0].job.failed = exc
                self._count(live[0].job, finished)
                return
            for piece in live:  # one input spoiled the batch: each alone tells which
                self._paint([piece], finished, on_event, raising, stop)
            return
        for piece, prediction in zip(live, predictions):
            job = piece.job
            if job.tiled:
                stitcher = job.stitchers.get(piece.mirrored)
                if stitcher is None:
                    stitcher = job.stitchers[piece.mirrored] = Stitcher(
                        job.rgb.shape, prediction.labels.dtype, self.with_painting and not piece.mirrored)
                stitcher.add(piece.tile, prediction.labels, prediction.scores, prediction.painting)
            else:
                job.whole[piece.mirrored] = prediction
            if job.tiled:
                on_event(Event("tile", job.target.key, job.done + 1, job.pieces, job.tiling))
            self._count(job, finished)

    @staticmethod
    def _count(job: _Job, finished: Callable[[_Job], None]) -> None:
        """One more piece of `job` done (painted, failed or skipped); the last one finishes it."""
        job.done += 1
        if job.done == job.pieces:
            finished(job)

    def _forward(self, pieces: list[_Piece]) -> list:
        model = self.model
        crops = [p.crop for p in pieces]
        sets = [p.job.prompts for p in pieces]
        paintings = model.paint_targets(model.encode_images(crops), sets, self.seg_type)
        return model.to_predictions(paintings, [c.shape[:2] for c in crops], [s.code for s in sets],
                                    [p.job.index for p in pieces],
                                    self.with_painting and not any(p.mirrored for p in pieces),
                                    margin=self.foreground_margin)

    # ------------------------------------------------------------------------------------- the host

    def _finish(self, job: _Job) -> Result:
        """A target whose pieces are all painted -> its Result: stitched, judged, split into objects."""
        if isinstance(job.failed, Missed):
            return self._missed(job.index, job.target, str(job.failed))
        if job.failed is not None:
            return self._failed(job.index, job.target, job.failed)
        try:
            prediction, mirrored = self._assemble(job)
            prediction.ids_are_objects = job.prompts.ids_are_objects
            shown = job.prompts.shown
            if shown is not None and len(shown) < len(job.prompts.code):  # an id no example shows is not meant
                unseen = np.isin(prediction.labels, shown, invert=True)
                if unseen.any():
                    prediction.labels[unseen] = 0
            if job.target.relabel is not None:
                prediction.labels = job.target.relabel(prediction.labels)
            if self.quality:
                prediction.quality = self.model.assess(prediction, job.prompts.examples, job.rgb, self.quality,
                                                       mirrored)
            instances = prediction.objects(self.objects) if self.objects is not None else None
        except Exception as exc:
            return self._failed(job.index, job.target, exc)
        return Result(job.target.key, job.index, prediction, instances, job.keys,
                      rgb=job.rgb if self.keep_images else None)

    def _assemble(self, job: _Job):
        """(the target's Prediction, the mirrored view's labels mirrored back or None)."""
        if not job.tiled:
            prediction = job.whole[False]
            mirrored = job.whole[True].labels[:, ::-1] if True in job.whole else None
            return prediction, mirrored
        labels, scores = job.stitchers[False].result()
        prediction = Prediction(labels=labels, scores=scores, painting=job.stitchers[False].painting,
                                index=job.index, colors=job.prompts.code.as_dict())
        mirrored = job.stitchers[True].labels[:, ::-1] if True in job.stitchers else None
        return prediction, mirrored

    @staticmethod
    def _failed(index: int, target: Target, exc: BaseException, what: str = "segmentation failed") -> Result:
        name = target.name or str(target.key)
        if isinstance(exc, SegGPTError):
            message = str(exc)
        else:
            message = f"{name}: {what} ({type(exc).__name__}: {exc})"
        return Result(target.key, index, error=message, exception=exc)

    @staticmethod
    def _missed(index: int, target: Target, reason: str) -> Result:
        return Result(target.key, index, error=reason, missed=True)
