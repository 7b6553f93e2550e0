"""The FiftyOne operator against a real MongoDB (FiftyOne's bundled mongod, in a temporary folder).

Dataset: 16 tiles (128x128, the demo model's input size) of the shipped stardist nuclei image, written
as 8-bit PNGs, with ground truth as a Segmentation (1 = nucleus) and as Detections with instance masks.
Two tiles are the prompts (tag "prompt", fields `labels` / `instances`). The plugin is installed with the
real `seggpt fiftyone install` into a temporary FIFTYONE_PLUGINS_DIR and found there by FiftyOne.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ._metadata import standard_metadata_finder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
SEGGPT = Path(sys.executable).with_name("seggpt")
URI = "@seggpt/seggpt/propagate_labels"
TILE = 128
PROMPT_TILES = (0, 5)  # two tiles with different nuclei counts


# ---------------------------------------------------------------------------------------------- set-up


def import_fiftyone():
    """Import fiftyone with the standard library's metadata finder in place (see tests/_metadata.py)."""
    with standard_metadata_finder():
        import fiftyone
        import fiftyone.operators  # noqa: F401
        import fiftyone.utils.eval  # noqa: F401
    return fiftyone


@pytest.fixture(scope="module")
def fo_env(tmp_path_factory):
    """A private database and plugins folder, the plugin installed by the real CLI; yields the folder."""
    import importlib.util

    if importlib.util.find_spec("fiftyone") is None:
        pytest.skip("fiftyone is not installed (the `fiftyone` extra)")
    root = tmp_path_factory.mktemp("fiftyone")
    env = {"FIFTYONE_DATABASE_DIR": str(root / "db"), "FIFTYONE_PLUGINS_DIR": str(root / "plugins"),
           "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_SHOW_PROGRESS_BARS": "false",
           "SEGGPT_ADAPTED_DIR": str(root / "adapted")}  # the models adapt_seggpt saves, which propagate offers
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "fiftyone" in sys.modules:  # imported by another test module: its config was read already
        import fiftyone.core.odm.database as fodb

        if getattr(fodb, "_client", None) is not None:
            pytest.skip("fiftyone is already connected to another database in this process")
    install = subprocess.run([str(SEGGPT), "fiftyone", "install"], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=60)
    assert install.returncode == 0, install.stderr
    fo = import_fiftyone()

    fo.config.database_dir = env["FIFTYONE_DATABASE_DIR"]
    fo.config.plugins_dir = env["FIFTYONE_PLUGINS_DIR"]
    fo.config.show_progress_bars = False
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiles(fo_env):
    """[(png path, 8-bit image, instance mask)] for the 16 tiles."""
    import tifffile
    from PIL import Image

    image = tifffile.imread(SAMPLES / "nuclei2d.tif").astype(np.float32)
    mask = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    lo, hi = np.percentile(image, (0.5, 99.8))
    image8 = np.clip((image - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    folder = fo_env / "tiles"
    folder.mkdir()
    out = []
    for y in range(0, 512, TILE):
        for x in range(0, 512, TILE):
            path = folder / f"tile_{y:03d}_{x:03d}.png"
            Image.fromarray(image8[y:y + TILE, x:x + TILE]).save(path)
            out.append((str(path), image8[y:y + TILE, x:x + TILE], mask[y:y + TILE, x:x + TILE]))
    return out


def detections_of(instance_mask, label="nucleus"):
    import fiftyone as fo

    return fo.Detections(detections=[fo.Detection.from_mask(instance_mask == i, label=label)
                                     for i in np.unique(instance_mask) if i != 0])


@pytest.fixture(scope="module")
def base(tiles):
    import fiftyone as fo

    dataset = fo.Dataset()
    samples = []
    for k, (path, _, instances) in enumerate(tiles):
        sample = fo.Sample(filepath=path, gt=fo.Segmentation(mask=(instances > 0).astype(np.uint8)),
                           gt_instances=detections_of(instances))
        if k in PROMPT_TILES:
            sample.tags.append("prompt")
            sample["labels"] = fo.Segmentation(mask=(instances > 0).astype(np.uint8))
            sample["instances"] = detections_of(instances)
        samples.append(sample)
    dataset.add_samples(samples, progress=False)
    dataset.mask_targets = {"gt": {0: "background", 1: "nucleus"}, "labels": {0: "background", 1: "nucleus"}}
    dataset.classes = {"instances": ["nucleus"], "gt_instances": ["nucleus"]}
    dataset.save()
    return dataset


@pytest.fixture
def dataset(base):
    clone = base.clone()
    yield clone
    clone.delete()


def run(view, params, delegate=False, **ctx):
    import fiftyone.operators as foo

    return foo.execute_operator(URI, dict(view=view, params=params, **ctx), request_delegation=delegate)


def demo(**params):
    return {"model": "demo", "device": "cpu", "max_prompts": 1, **params}


def image_of(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def prompt_ids(dataset):
    return dataset.match_tags("prompt").values("id")


def direct_iou(dataset, ids, pred_field, gt_field, classes=(0, 1)):
    """Per-class IoU and mIoU pooled over the samples, from the masks themselves."""
    view = dataset.select(ids)
    inter, union = {c: 0 for c in classes}, {c: 0 for c in classes}
    for pred, gt in zip(view.values(pred_field), view.values(gt_field)):
        p, g = pred.get_mask(), gt.get_mask()
        for c in classes:
            inter[c] += int(np.sum((p == c) & (g == c)))
            union[c] += int(np.sum((p == c) | (g == c)))
    iou = {c: inter[c] / union[c] for c in classes if union[c]}
    return iou, float(np.mean(list(iou.values())))


def plugin_module(name="segment"):
    """A module of the plugin as FiftyOne loaded it (from the plugins folder, under its own name)."""
    import fiftyone.operators as foo

    package = type(foo.get_operator(URI)).__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def requests(result, operator=None):
    return [r for r in result.executor.to_json()["requests"] if operator is None or r["operator_uri"] == operator]


# ------------------------------------------------------------------------------------------ discovery


def test_plugin_found_in_plugins_dir_after_cli_install(fo_env):
    link = fo_env / "plugins" / "seggpt"
    assert link.is_symlink() and link.resolve() == (ROOT / "fiftyone_op").resolve()
    code = ("import fiftyone.plugins as fop, fiftyone.operators as foo\n"
            "names = [p.name for p in fop.list_plugins()]\n"
            f"op = foo.get_operator('{URI}')\n"
            "print(names, op.uri, op.config.label, op.config.allow_delegated_execution)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FIFTYONE_PLUGINS_DIR": str(fo_env / "plugins")})
    assert out.returncode == 0, out.stderr
    assert "@seggpt/seggpt" in out.stdout and URI in out.stdout and "Propagate labels with SegGPT True" in out.stdout

    import fiftyone.operators as foo

    assert foo.get_operator(URI).config.execute_as_generator


def test_plugin_modules_are_loaded_once(dataset):
    """FiftyOne imports the plugin folder under a name of its own; the adapter's modules must still be
    loaded once (one model cache), as `seggpt_plugins.fiftyone.*`."""
    import fiftyone.operators as foo

    result = run(dataset.limit(3), demo(label_field="labels", output_field="pred", prompt_tag="prompt"))
    assert result.error is None and dataset.count("pred") == 2
    operators = (ROOT / "fiftyone_op" / "operators.py").resolve()
    loaded = [name for name, module in list(sys.modules.items())
              if getattr(module, "__file__", None) and Path(module.__file__).resolve() == operators]
    assert loaded == ["seggpt_plugins.fiftyone.operators"], loaded
    assert type(foo.get_operator(URI)).__module__ == "seggpt_plugins.fiftyone.operators"


# --------------------------------------------------------------------------------- immediate execution


@pytest.fixture(scope="module")
def immediate(base, tiles):
    """One immediate run over the whole dataset: prompts by tag, 2 prompts per target, evaluated."""
    dataset = base.clone()
    before = {i: lab.get_mask().copy() for i, lab in zip(prompt_ids(dataset), dataset.select(prompt_ids(dataset))
                                                         .values("labels"))}
    result = run(dataset.view(), demo(label_field="labels", output_field="pred", prompt_tag="prompt",
                                      max_prompts=2, gt_field="gt", batch_size=4))
    dataset.reload()
    return dataset, result, before


def test_immediate_every_target_gets_a_mask_of_its_image_size(immediate):
    dataset, result, _ = immediate
    assert result.error is None
    targets = dataset.match_tags("prompt", bool=False)
    assert targets.count("pred") == len(targets) == 14
    for path, pred, gt in zip(*targets.values(["filepath", "pred", "gt"])):
        mask = pred.get_mask()
        assert mask.shape == image_of(path).shape[:2] == (TILE, TILE)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    # not garbage: the demo model finds the nuclei (foreground IoU well above chance)
    iou, _ = direct_iou(dataset, targets.values("id"), "pred", "gt")
    assert iou[1] > 0.5, iou
    confidence = targets.values("pred_confidence")
    assert all(0.0 <= c <= 1.0 for c in confidence) and len(set(confidence)) > 1
    prompts = set(prompt_ids(dataset))
    assert all(sorted(p) == sorted(prompts) for p in targets.values("pred.prompt_ids"))  # 2 prompts, both used


def test_immediate_carries_mask_targets_and_leaves_prompts_alone(immediate):
    dataset, _, before = immediate
    assert dataset.mask_targets["pred"] == {0: "background", 1: "nucleus"}
    prompts = dataset.select(list(before))
    assert prompts.count("pred") == 0 and prompts.count("pred_confidence") == 0
    for sample_id, label in zip(prompts.values("id"), prompts.values("labels")):
        np.testing.assert_array_equal(label.get_mask(), before[sample_id])


def test_immediate_reports_progress_and_reloads(immediate):
    _, result, _ = immediate
    progress = [r["params"] for r in requests(result, "set_progress")]
    fractions = [p["progress"] for p in progress]
    assert len(progress) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Predicted 14/14" in p["label"] for p in progress)
    notes = requests(result, "notify")
    last = notes[-1]["params"]
    assert last["variant"] == "success" and "14 samples written to 'pred'" in last["message"]
    assert "sort by 'pred_confidence' to review the lowest first" in last["message"]
    assert [r["operator_uri"] for r in requests(result)][-3:] == ["reload_dataset", "set_color_scheme",
                                                                  "set_active_fields"]


def test_immediate_evaluation_matches_direct_computation(immediate):
    dataset, result, _ = immediate
    ids = dataset.match_tags("prompt", bool=False).values("id")
    iou, miou = direct_iou(dataset, ids, "pred", "gt")
    assert "pred_eval" in dataset.list_evaluations()
    results = dataset.load_evaluation_results("pred_eval")
    matrix = np.asarray(results.confusion_matrix(classes=results.classes))
    from_matrix = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    np.testing.assert_allclose(from_matrix, [iou[0], iou[1]], rtol=1e-12)
    message = requests(result, "notify")[-1]["params"]["message"]
    assert f"mIoU {miou:.3f} (background counted) on 14 samples" in message
    # the per-sample fields of the stored evaluation
    accuracy = dataset.select(ids).values("pred_eval_accuracy")
    assert len(accuracy) == 14 and all(0 < a <= 1 for a in accuracy)


def test_skip_existing(immediate):
    dataset, _, _ = immediate
    targets = dataset.match_tags("prompt", bool=False)
    cleared = targets.values("id")[:2]
    kept = targets.exclude(cleared)
    kept_labels = dict(zip(kept.values("id"), kept.values("pred._id")))
    dataset.select(cleared).set_field("pred", None).save("pred")
    result = run(dataset.view(), demo(label_field="labels", output_field="pred", prompt_tag="prompt"))
    assert any("Predicted 2/2" in r["params"]["label"] for r in requests(result, "set_progress"))
    assert dataset.count("pred") == 14
    assert dict(zip(kept.values("id"), kept.values("pred._id"))) == kept_labels  # untouched
    # skip_existing=False on a view predicts again
    one = kept.limit(1)
    before = one.values("pred._id")
    run(one, demo(label_field="labels", output_field="pred", prompt_tag="prompt", skip_existing=False))
    assert one.values("pred._id") != before and kept.skip(1).values("pred._id") == list(kept_labels.values())[1:]


# --------------------------------------------------------------------------------- delegated execution


def test_delegated_run_with_progress_and_evaluation(dataset, monkeypatch):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    import fiftyone.operators as foo

    view = dataset.limit(8)  # 2 prompts in it (tiles 0 and 5), 6 targets
    propagate = foo.get_operator(URI)  # the Python API: __call__ over execute_operator
    queued = propagate(view, "labels", "pred", prompt_tag="prompt", gt_field="gt", model="demo", device="cpu",
                       max_prompts=1, delegate=True)
    assert queued.delegated and not dataset.has_field("pred")
    op_id = queued.result["id"]

    reported = []
    original = DelegatedOperationService.set_progress

    def record(self, doc_id, progress):
        reported.append((doc_id, progress.progress, progress.label))
        return original(self, doc_id, progress)

    monkeypatch.setattr(DelegatedOperationService, "set_progress", record)
    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    doc = service.get(op_id)
    assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
    summary = doc.result.result
    dataset.reload()

    targets = view.exclude(prompt_ids(dataset)).values("id")
    assert summary["targets"] == len(targets) == 6 and dataset.count("pred") == 6
    assert set(dataset.exists("pred").values("id")) == set(targets)
    fractions = [p for i, p, _ in reported if i == doc.id]
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert doc.status.progress == 1.0 and "Done" in doc.status.label
    assert "mean_confidence" in str(doc.metadata["outputs_schema"])  # resolve_output ran for the App
    iou, miou = direct_iou(dataset, targets, "pred", "gt")
    evaluation = summary["evaluation"]
    assert evaluation["samples"] == 6 and evaluation["eval_key"] == "pred_eval"
    assert evaluation["miou"] == pytest.approx(miou, rel=1e-12) == summary["miou"]
    assert evaluation["iou"] == pytest.approx({"background": iou[0], "nucleus": iou[1]}, rel=1e-12)


# ------------------------------------------------------------------------------------------- sharding


def _shard_ids(service, ops):
    import fiftyone as fo
    from fiftyone.core.view import DatasetView

    from bson import ObjectId

    out = []
    for op_id in ops:
        request = service.get(ObjectId(op_id)).context.request_params
        dataset = fo.load_dataset(request["dataset_name"])
        out.append(DatasetView._build(dataset, request["view"]).values("id"))
    return out


@pytest.mark.parametrize("delegate", [False, True], ids=["queued-now", "queued-by-a-delegated-run"])
def test_two_shards_cover_the_view_exactly_once(dataset, delegate):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    view = dataset.skip(4).limit(8)  # tile 5 is a prompt: 7 targets
    targets = view.exclude(prompt_ids(dataset)).values("id")
    params = demo(label_field="labels", output_field="pred", prompt_tag="prompt", num_shards=2)
    result = run(view, params, delegate=delegate)
    service = DelegatedOperationService()
    if delegate:
        assert not dataset.has_field("pred")
        service.execute_queued_operations(dataset_name=dataset.name)  # the parent queues the shards
        parent = service.get(result.result["id"])
        assert parent.run_state == ExecutionRunState.COMPLETED, parent.result
        summary = parent.result.result
    else:
        message = requests(result, "notify")[-1]["params"]["message"]
        assert "scheduled 2 operations for 7 samples" in message and "fiftyone delegated launch" in message
        shards = service.list_operations(dataset_name=dataset.name, run_state=ExecutionRunState.QUEUED)
        summary = {"shards": [str(op.id) for op in shards]}
    assert len(summary["shards"]) == 2
    parts = _shard_ids(service, summary["shards"])
    assert sorted(len(p) for p in parts) == [3, 4]
    assert set(parts[0]).isdisjoint(parts[1]) and sorted(parts[0] + parts[1]) == sorted(targets)
    dataset.reload()
    assert dataset.has_field("pred") and dataset.count("pred") == 0  # declared once, before the workers
    assert dataset.mask_targets["pred"] == dataset.mask_targets["labels"]

    service.execute_queued_operations(dataset_name=dataset.name)
    from bson import ObjectId

    for op_id in summary["shards"]:
        doc = service.get(ObjectId(op_id))
        assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
        assert doc.result.result["targets"] in (3, 4)
    dataset.reload()
    assert sorted(dataset.exists("pred").values("id")) == sorted(targets)
    for path, pred in zip(*dataset.select(targets).values(["filepath", "pred"])):
        assert pred.get_mask().shape == image_of(path).shape[:2]


# ------------------------------------------------------------------------------- prompts and targets


def test_selection_is_the_prompts_unless_it_is_the_target(dataset):
    from fiftyone.operators.constants import ViewTarget

    prompt = prompt_ids(dataset)[0]  # tile 0; tile 5 has labels too but is not selected
    view = dataset.limit(3)
    result = run(view, demo(label_field="labels", output_field="pred"), selected=[prompt])
    assert any("Predicted 2/2" in r["params"]["label"] for r in requests(result, "set_progress"))
    assert sorted(dataset.exists("pred").values("id")) == sorted(view.skip(1).values("id"))
    # the selection as the target: the prompts are every sample with labels
    chosen = dataset.skip(3).limit(1).values("id")
    run(dataset.view(), {**demo(label_field="labels", output_field="pred2"),
                         "view_target": ViewTarget.SELECTED_SAMPLES}, selected=chosen)
    assert dataset.exists("pred2").values("id") == chosen


def test_each_target_uses_its_most_similar_prompts(dataset):
    import fiftyone as fo

    prompts = dataset.match_tags("prompt")
    twins = [fo.Sample(filepath=path) for path in prompts.values("filepath")]  # same images, unlabelled
    twin_ids = dataset.add_samples(twins, progress=False)
    run(dataset.select(twin_ids), demo(label_field="labels", output_field="pred", prompt_tag="prompt",
                                        max_prompts=1))
    used = dataset.select(twin_ids, ordered=True).values("pred.prompt_ids")
    assert used == [[i] for i in prompts.values("id")]


def test_spatial_ensemble_and_tiles_reach_the_core(dataset, monkeypatch):
    """ensemble, tile and halo (issue 14): prompts prepared as asked, targets segmented in tiles."""
    import fiftyone.operators as foo

    from seggpt_plugins.engine import SegGPT
    from seggpt_plugins.runner import Runner

    calls = []
    for owner, name in ((SegGPT, "prepare_prompts"), (Runner, "__init__")):
        original = getattr(owner, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, {k: kwargs[k] for k in ("ensemble", "tile", "halo") if k in kwargs}))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    targets = dataset.match_tags("prompt", bool=False).limit(3)
    result = run(targets, demo(label_field="labels", output_field="pred", prompt_tag="prompt", max_prompts=2,
                               ensemble="spatial", tile="64", halo=8))  # the App's text field
    assert result.error is None, result.error
    assert ("prepare_prompts", {"ensemble": "spatial", "tile": (64, 64)}) in calls  # the runner's tile: (h, w)
    assert ("__init__", {"ensemble": "spatial", "tile": 64, "halo": 8}) in calls
    dataset.reload()
    assert dataset.count("pred") == 3
    for path, pred in zip(*targets.values(["filepath", "pred"])):
        mask = pred.get_mask()
        assert mask.shape == image_of(path).shape[:2] == (TILE, TILE) and set(np.unique(mask)) <= {0, 1}
    iou, _ = direct_iou(dataset, targets.values("id"), "pred", "gt")
    assert iou[1] > 0.2, iou  # small tiles for the demo model: rougher, but the nuclei are found

    calls.clear()  # from Python: tile as a number or "auto"
    result = foo.get_operator(URI)(targets, "labels", "pred2", prompt_tag="prompt", max_prompts=2, model="demo",
                                   device="cpu", ensemble="both", tile="auto")
    assert result.error is None, result.error
    assert ("prepare_prompts", {"ensemble": "both", "tile": "auto"}) in calls
    assert ("__init__", {"ensemble": "both", "tile": "auto", "halo": 32}) in calls
    assert dataset.count("pred2") == 3


def test_quality_full_reaches_the_core_and_scores_the_confidence_field(dataset, monkeypatch):
    """quality "full": the runner reads the mirrored image too, and the confidence field holds that estimate."""
    import fiftyone.operators as foo

    from seggpt_plugins.fiftyone.options import Options
    from seggpt_plugins.runner import Runner

    qualities = []
    original = Runner.__init__

    def spy(self, *args, **kwargs):
        qualities.append(kwargs.get("quality", "fast"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "__init__", spy)
    targets = dataset.match_tags("prompt", bool=False).limit(3)
    confidences = {}
    for quality in ("fast", "full"):
        result = foo.get_operator(URI)(targets, "labels", f"pred_{quality}", prompt_tag="prompt", max_prompts=2,
                                       model="demo", device="cpu", quality=quality)
        assert result.error is None, result.error
        confidences[quality] = targets.values(f"pred_{quality}_confidence")
        assert all(0 < c < 1 for c in confidences[quality]), confidences
    assert qualities == ["fast", "full"]
    assert confidences["full"] != confidences["fast"]  # another estimate: the mirrored image's agreement leads
    assert Options.from_params({"label_field": "labels"}).quality == "fast"


@pytest.mark.parametrize("params, expected", [
    ({"ensemble": "mean"}, "Path: ensemble. Reason: must be one of ('feature', 'spatial', 'both'), got 'mean'"),
    ({"tile": "big"}, "Path: tile. Reason: expected 'auto' or a number of pixels >= 2"),
    ({"tile": "1"}, "Path: tile. Reason: expected 'auto' or a number of pixels >= 2"),
    ({"halo": -1}, "Path: halo. Reason: must be >= 0, got -1"),
    ({"tile": "40", "halo": 20}, "Path: halo. Reason: a 40x40 tile with a halo of 20 leaves no core"),
    ({"quality": "best"}, "Path: quality. Reason: must be one of ('fast', 'full'), got 'best'"),
])
def test_bad_ensemble_and_tile_are_refused(base, params, expected):
    from seggpt_plugins.fiftyone.options import Options, ParamError

    _fails(base.view(), demo(label_field="labels", output_field="out", **params), expected)
    assert not base.has_field("out")
    with pytest.raises(ParamError) as info:
        Options.from_params({"label_field": "labels", **params})
    assert set(info.value.errors) == {expected.split(".")[0].removeprefix("Path: ")}


def test_ensemble_and_tile_options_default_to_feature_without_tiles():
    from seggpt_plugins.fiftyone.options import Options

    opts = Options.from_params({"label_field": "labels"})
    assert (opts.ensemble, opts.tile, opts.halo) == ("feature", None, 32)
    opts = Options.from_params({"label_field": "labels", "ensemble": "spatial", "tile": 256, "halo": 0})
    assert (opts.ensemble, opts.tile, opts.halo) == ("spatial", 256, 0)
    assert Options.from_params({"label_field": "labels", "tile": " Auto "}).tile == "auto"
    assert Options.from_params({"label_field": "labels", "tile": ""}).tile is None
    assert Options.from_params({"label_field": "labels", "tile": "0"}).tile is None


# ---------------------------------------------------------------------------------- masks on disk


def test_masks_on_disk_under_mask_dir(dataset, tmp_path):
    view = dataset.limit(4)
    run(view, demo(label_field="labels", output_field="pred", prompt_tag="prompt", mask_dir=str(tmp_path)))
    targets = view.exclude(prompt_ids(dataset))
    for sample_id, path, pred in zip(*targets.values(["id", "filepath", "pred"])):
        assert pred.mask is None and pred.mask_path == str(tmp_path / "pred" / f"{sample_id}.png")
        assert image_of(pred.mask_path).shape == image_of(path).shape[:2]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(f"{i}.png" for i in targets.values("id"))


def test_rgb_masks_stay_rgb(dataset):
    import fiftyone as fo

    color = (255, 109, 4)
    for sample in dataset.match_tags("prompt"):
        mask = np.zeros(sample["labels"].mask.shape + (3,), np.uint8)
        mask[sample["labels"].mask > 0] = color
        sample["labels_rgb"] = fo.Segmentation(mask=mask)
        sample.save()
    dataset.mask_targets["labels_rgb"] = {"#ff6d04": "nucleus"}
    dataset.save()
    view = dataset.limit(3)
    run(view, demo(label_field="labels_rgb", output_field="pred_rgb", prompt_tag="prompt"))
    assert dataset.mask_targets["pred_rgb"] == {"#ff6d04": "nucleus"}
    inter = union = 0
    for path, pred, gt in zip(*view.exclude(prompt_ids(dataset)).values(["filepath", "pred_rgb", "gt"])):
        mask = pred.get_mask()
        assert mask.shape == image_of(path).shape[:2] + (3,) and mask.dtype == np.uint8
        colors = {tuple(c) for c in np.unique(mask.reshape(-1, 3), axis=0)}
        assert colors == {(0, 0, 0), color}
        fg, truth = np.all(mask == color, axis=-1), gt.get_mask() > 0
        inter, union = inter + (fg & truth).sum(), union + (fg | truth).sum()
    assert inter / union > 0.5


# ------------------------------------------------------------------------------------------ Detections


@pytest.mark.parametrize("on_disk", [False, True], ids=["inline", "mask_dir"])
def test_detections_in_detections_out(dataset, tmp_path, on_disk):
    view = dataset.limit(4)
    params = demo(label_field="instances", output_field="pred_instances", prompt_tag="prompt",
                  embedding_type="instance")
    if on_disk:
        params["mask_dir"] = str(tmp_path)
    run(view, params)
    assert dataset.get_field("pred_instances").document_type.__name__ == "Detections"
    assert dataset.classes["pred_instances"] == ["nucleus"]
    targets = view.exclude(prompt_ids(dataset))
    found, inter, union = 0, 0, 0
    for sample_id, path, dets, gt in zip(*targets.values(["id", "filepath", "pred_instances", "gt"])):
        height, width = image_of(path).shape[:2]
        canvas = np.zeros((height, width), np.uint8)
        for det in dets.detections:
            assert det.label == "nucleus" and 0 < det.confidence <= 1
            x, y, w, h = det.bounding_box
            assert 0 <= x and 0 <= y and x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
            mask = det.get_mask()
            assert mask.shape == (round(h * height), round(w * width))
            if on_disk:
                assert det.mask is None and det.mask_path.startswith(str(tmp_path / "pred_instances" / sample_id))
            det.to_segmentation(mask=canvas, target=1)
        found += len(dets.detections)
        fg = gt.get_mask() > 0
        inter += (canvas.astype(bool) & fg).sum()
        union += (canvas.astype(bool) | fg).sum()
    assert found >= 10 and inter / union > 0.4


def test_detections_codec_round_trip(tiles):
    """Instance encoding of prompts and decoding of a painting are inverse (no model involved)."""
    from seggpt_plugins.engine import Prediction

    from seggpt_plugins.fiftyone.codecs import DetectionsCodec

    codec = DetectionsCodec("instances", "instance")
    prompts = [detections_of(t[2]) for t in tiles[:3]]
    label = prompts[1]
    label.detections[0].label = "mitosis"
    codec.prepare(prompts)
    assert codec.instance_ids and codec.classes == ["mitosis", "nucleus"]
    assert codec.widths.tolist() == [1, max(len(p.detections) for p in prompts)]
    encoded = codec.encode(label, TILE, TILE, "prompt")
    ids = [int(i) for i in np.unique(encoded) if i]
    assert len(ids) == len(label.detections)  # every object its own id
    assert sorted(codec.class_of(i) for i in ids) == sorted(d.label for d in label.detections)

    pred = Prediction(labels=encoded, scores=np.full(encoded.shape, 0.5, np.float32), painting=None)
    staged, meta = codec.decode(pred)
    decoded = codec.label(staged, meta, None)
    assert len(decoded.detections) == len(label.detections)
    for det in decoded.detections:
        region = det.to_segmentation(frame_size=(TILE, TILE), target=1).mask.astype(bool)
        under = np.unique(encoded[region])
        assert len(under) == 1 and codec.class_of(int(under[0])) == det.label
        assert det.confidence == pytest.approx(0.5)
    targets = {1: "nucleus", 2: "mitosis"}
    np.testing.assert_array_equal(decoded.to_segmentation(frame_size=(TILE, TILE), mask_targets=targets).mask,
                                  label.to_segmentation(frame_size=(TILE, TILE), mask_targets=targets).mask)

    semantic = DetectionsCodec("instances", "semantic")
    semantic.prepare(prompts)
    assert not semantic.instance_ids and set(np.unique(semantic.encode(label, TILE, TILE, "p"))) == {0, 1, 2}


# ------------------------------------------------------------------------------------------- bad input


def _fails(view, params, *expected):
    import fiftyone.operators.executor as foe

    with pytest.raises(foe.ExecutionError) as info:
        run(view, params)
    for text in expected:
        assert text in str(info.value), str(info.value)[-800:]


@pytest.mark.parametrize("params, expected", [
    ({"label_field": "nope"}, ["Path: label_field. Reason: the dataset has no field 'nope'"]),
    ({"label_field": "filepath"}, ["'filepath' holds StringField; expected Segmentation, or Detections"]),
    ({"label_field": "labels", "output_field": "labels"}, ["Path: output_field. Reason: must differ from the Label "
                                                           "field ('labels')"]),
    ({"label_field": "labels", "output_field": "gt", "gt_field": "gt"}, ["must differ from the Ground truth field"]),
    ({"label_field": "labels", "output_field": "gt_instances"}, ["exists and holds Detections"]),
    ({"label_field": "labels", "prompt_tag": "nobody"}, ["no sample of the dataset is tagged 'nobody'"]),
    ({"label_field": "labels", "embedding_type": "panoptic"}, ["Path: embedding_type. Reason: must be one of"]),
    ({"label_field": "labels", "max_prompts": 0}, ["Path: max_prompts. Reason: must be >= 1, got 0"]),
    ({"label_field": "labels", "mask_dir": "relative/dir"}, ["Path: mask_dir. Reason: must be an absolute path"]),
    ({"label_field": "labels", "precision": "int4"}, ["Path: precision. Reason: must be one of auto, float32, "
                                                      "bfloat16, int8, got 'int4'"]),
    ({"label_field": "instances", "gt_field": "gt"}, ["evaluation uses evaluate_segmentations"]),
    ({"label_field": "labels", "gt_field": "gt_instances"}, ["'gt_instances' holds Detections; evaluation needs"]),
])
def test_bad_parameters_are_refused_with_a_clear_message(base, params, expected):
    _fails(base.view(), demo(**{"output_field": "out", **params}), *expected)
    assert not base.has_field("out") and not base.has_field("out_confidence")


def test_precision_reaches_the_model(dataset):
    """The Precision setting loads the model as it says: int8 linear layers on the CPU."""
    from seggpt_plugins import model_cache

    view = dataset.select(prompt_ids(dataset) + dataset.match_tags("prompt", bool=False).limit(2).values("id"))
    result = run(view, demo(label_field="labels", output_field="out", prompt_tag="prompt", precision="int8"))
    assert result.error is None, result.error
    model = model_cache.cached("demo", "cpu", quantize="int8")
    assert model is not None and model.quantize == "int8"
    dataset.reload()
    assert dataset.count("out") == 2


def test_form_marks_bad_fields_for_the_app(base):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    op = foo.get_operator(URI)
    ctx = ExecutionContext(request_params={"dataset_name": base.name, "params": {
        "label_field": "filepath", "output_field": "out"}})
    form = op.resolve_input(ctx).type.properties
    assert form["label_field"].invalid and "expected Segmentation" in form["label_field"].error_message
    ctx = ExecutionContext(request_params={"dataset_name": base.name, "params": {
        "label_field": "labels", "output_field": "out", "prompt_tag": "prompt", "num_shards": 2}})
    form = op.resolve_input(ctx).type.properties
    assert not any(p.invalid for p in form.values())
    assert form["plan"].view.label.startswith("2 prompt samples (samples tagged 'prompt') -> 14 target samples in 2 "
                                              "shards. Schedule it: a worker runs it (`fiftyone delegated launch`)")
    assert op.resolve_execution_options(ctx).default_choice_to_delegated


def test_no_prompts_and_prompts_without_masks(dataset):
    import fiftyone as fo

    fresh = fo.Dataset()
    fresh.add_samples([fo.Sample(filepath=s.filepath) for s in dataset.limit(2)], progress=False)
    fresh.add_sample_field("labels", fo.EmbeddedDocumentField, embedded_doc_type=fo.Segmentation)
    _fails(fresh.view(), demo(label_field="labels", output_field="out"),
           "no prompt samples: no samples with 'labels' filled")
    fresh.delete()

    dataset.skip(2).limit(1).tag_samples("prompt")  # tagged, but no labels
    _fails(dataset.view(), demo(label_field="labels", output_field="out", prompt_tag="prompt"),
           "1 of the 3 prompt samples (samples tagged 'prompt') has no 'labels' label to learn from: tile_000_256.png")
    dataset.skip(2).limit(1).untag_samples("prompt")

    boxes = dataset.match_tags("prompt").limit(1)  # Detections without instance masks
    for sample in boxes:
        sample["boxes"] = fo.Detections(detections=[fo.Detection(label="nucleus", bounding_box=[.1, .1, .2, .2])])
        sample.save()
    _fails(dataset.view(), demo(label_field="boxes", output_field="out"), "has no instance mask")
    assert not dataset.has_field("out")


def test_unreadable_media_leaves_no_partial_field(dataset, tmp_path, monkeypatch):
    """The bad image comes after earlier targets were predicted and staged: nothing reaches the dataset."""
    view = dataset.limit(6)  # targets: tiles 1, 2, 3, 4 (batch 1)
    broken = view.skip(4).first()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    broken.filepath = str(bad)
    broken.save()
    mask_dir = tmp_path / "masks"
    import fiftyone.operators.executor as foe

    with pytest.raises(foe.ExecutionError) as info:
        run(view, demo(label_field="labels", output_field="out", prompt_tag="prompt", batch_size=1,
                       mask_dir=str(mask_dir)))
    assert f"{bad}: not a readable image file" in str(info.value) and broken.id not in str(info.value)
    dataset.reload()
    assert not dataset.has_field("out") and not dataset.has_field("out_confidence")
    assert list((mask_dir / "out").iterdir()) == []  # the staged masks were removed


def test_failed_commit_is_undone(dataset, monkeypatch):
    """A database failure after some chunks were written: the written values and new fields are removed."""
    plugin = plugin_module("commit")
    monkeypatch.setattr(plugin, "COMMIT_CHUNK", 1)

    def fail(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(plugin, "_declare_targets", fail)
    import fiftyone.operators.executor as foe

    with pytest.raises(foe.ExecutionError, match="the database went away"):
        run(dataset.limit(4), demo(label_field="labels", output_field="out", prompt_tag="prompt"))
    dataset.reload()
    assert not dataset.has_field("out") and not dataset.has_field("out_confidence")


def test_shard_split_is_exact():
    from seggpt_plugins.fiftyone.plan import split

    for n in range(0, 30):
        for shards in range(1, 6):
            parts = split(list(range(n)), shards)
            assert sum(parts, []) == list(range(n))
            assert all(parts) and len(parts) == max(1, min(shards, n)) if n else parts == []
            if n:
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_most_similar_prompts_first(tiles):
    from seggpt_plugins.prompts import describe, most_similar

    pool = np.stack([describe(np.repeat(t[1][..., None], 3, -1)) for t in tiles])
    for k, t in enumerate(tiles):
        assert most_similar(describe(np.repeat(t[1][..., None], 3, -1)), pool, 1) == (k,)
    assert most_similar(pool[0], pool, 99) == tuple(range(len(tiles)))
    flipped = np.repeat(tiles[3][1][::-1, ::-1, None], 3, -1)
    assert len(most_similar(describe(flipped), pool, 3)) == 3


# ------------------------------------------------------------------------------ commit: kills and recovery

KILL_SCRIPT = """
import json, sys
import fiftyone as fo, fiftyone.operators as foo
dataset = fo.load_dataset(sys.argv[1])
ids = json.loads(sys.argv[3])
view = dataset.select(ids) if ids else dataset.view()
foo.execute_operator("{uri}", dict(view=view, params=json.loads(sys.argv[2])))
"""


def _kill_during_commit(dataset, params, step, tmp_path, ids=()):
    """Run the operator on the dataset (or these samples) in another process, SIGKILL it when its commit
    reaches `step`."""
    import json
    import signal
    import time

    marker = tmp_path / f"at-{step}"
    env = {**os.environ, "SEGGPT_FIFTYONE_PAUSE_AT": f"{step}:{marker}"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(uri=URI), dataset.name, json.dumps(params),
                             json.dumps(list(ids))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach '{step}': {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    dataset.reload()


def _journal(dataset):
    from fiftyone.core.odm import get_db_conn

    from seggpt_plugins.fiftyone import commit

    db = get_db_conn()
    entries = list(db[commit.JOURNAL].find({"dataset_id": str(dataset._doc.id)}))
    pending = db[commit.PENDING].count_documents({"run": {"$in": [e["_id"] for e in entries]}})
    return entries, pending


def test_kill_while_staging_leaves_the_old_state_and_is_undone(dataset, tmp_path):
    """Killed while its values were being staged: the dataset has the old state (no new field, no value),
    and the next run on the dataset removes the staged values, the staging folder and the empty fields."""
    params = demo(label_field="labels", output_field="out", prompt_tag="prompt", batch_size=4)
    _kill_during_commit(dataset, params, "staging", tmp_path)
    assert dataset.count("out") == 0 if dataset.has_field("out") else True
    assert not dataset.has_field("out_confidence") or dataset.count("out_confidence") == 0
    entries, pending = _journal(dataset)
    assert len(entries) == 1 and entries[0]["state"] == "staging" and pending == 14
    staging = Path(entries[0]["staging"])
    assert staging.is_dir() and any(staging.iterdir())  # the killed run's staged PNGs

    # any later run on the dataset (here one with nothing to do) recovers first
    run(dataset.limit(1), demo(label_field="labels", output_field="other", prompt_tag="prompt"))
    dataset.reload()
    assert _journal(dataset) == ([], 0) and not staging.exists()
    assert not dataset.has_field("out") and not dataset.has_field("out_confidence")


def test_kill_after_the_move_is_finished_by_the_next_run(dataset, tmp_path):
    """Existing predictions are replaced (skip_existing off, masks on disk); the run is killed after the
    one database command that moves labels and confidences, before the mask files are moved: every sample
    has its new label with its new confidence, and the next run moves the files and cleans up."""
    view = dataset.limit(6)
    masks = tmp_path / "masks"
    run(view, demo(label_field="labels", output_field="pred", prompt_tag="prompt", mask_dir=str(masks)))
    targets = view.exclude(prompt_ids(dataset))
    old_ids = targets.values("pred._id")
    old_files = {p: Path(p).read_bytes() for p in targets.values("pred.mask_path")}
    old_confidence = targets.values("pred_confidence")
    (masks / "pred" / ".staging-leftover").mkdir()  # a staging folder of no known run (e.g. an old version)

    params = demo(label_field="labels", output_field="pred", prompt_tag="prompt", mask_dir=str(masks),
                  skip_existing=False, max_prompts=2)
    _kill_during_commit(dataset, params, "moved", tmp_path, ids=view.values("id"))
    new = dict(zip(targets.values("id"), zip(targets.values("pred._id"), targets.values("pred_confidence"),
                                             targets.values("pred.prompt_ids"))))
    assert len(new) == 4 and all(label_id not in old_ids and len(used) == 2 and conf is not None
                                 for label_id, conf, used in new.values())
    assert [c for _, c, _ in new.values()] != old_confidence  # both changed in the same update
    entries, pending = _journal(dataset)
    assert len(entries) == 1 and entries[0]["state"] == "moving"
    staging = Path(entries[0]["staging"])
    assert sorted(p.name for p in staging.iterdir()) == sorted(f"{i}.png" for i in new)  # not moved yet

    run(dataset.limit(1), demo(label_field="labels", output_field="pred", prompt_tag="prompt", mask_dir=str(masks)))
    dataset.reload()
    assert _journal(dataset) == ([], 0) and not staging.exists()
    assert sorted(p.name for p in (masks / "pred").iterdir()) == sorted(f"{i}.png" for i in new)  # no leftovers
    assert dict(zip(targets.values("id"), zip(targets.values("pred._id"), targets.values("pred_confidence"),
                                              targets.values("pred.prompt_ids")))) == new
    changed = [Path(p).read_bytes() != old_files[p] for p in targets.values("pred.mask_path")]
    assert any(changed)  # the new masks (2 prompts instead of 1) are in place
    for path, pred in zip(*targets.values(["filepath", "pred"])):
        assert pred.get_mask().shape == image_of(path).shape[:2]


# ------------------------------------------------------------------------- fields that are not ours

def test_output_field_not_written_by_the_operator_is_refused(dataset):
    view = dataset.limit(3)
    before = {i: m.get_mask().copy() for i, m in zip(view.values("id"), view.values("gt"))}
    _fails(view, demo(label_field="labels", output_field="gt", prompt_tag="prompt", skip_existing=False),
           "'gt' exists and was not written by this operator", "turn on Overwrite field")
    for sample_id, label in zip(view.values("id"), view.values("gt")):
        np.testing.assert_array_equal(label.get_mask(), before[sample_id])
    # fields the operator creates carry its mark, so later runs may write into them
    run(view, demo(label_field="labels", output_field="pred", prompt_tag="prompt"))
    assert dataset.get_field("pred").info["written_by"] == URI == dataset.get_field("pred_confidence").info[
        "written_by"]
    run(view, demo(label_field="labels", output_field="pred", prompt_tag="prompt", skip_existing=False))
    # explicitly allowed: written, and marked as the operator's from then on
    result = run(view, demo(label_field="labels", output_field="gt", prompt_tag="prompt", skip_existing=False,
                            overwrite_field=True))
    assert result.error is None
    used = view.skip(1).values("gt.prompt_ids")  # predictions now (tile 0 is a prompt: left alone)
    assert len(used) == 2 and all(len(u) == 1 and u[0] in prompt_ids(dataset) for u in used)
    assert dataset.get_field("gt").info["written_by"] == URI


def test_missing_prompt_mask_file_is_named_before_model_work(dataset, tmp_path, monkeypatch):
    import fiftyone as fo

    from seggpt_plugins.fiftyone import segment

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(segment, "get_model", no_model)
    sample = dataset.match_tags("prompt").first()
    path = tmp_path / "prompt_mask.png"
    from PIL import Image

    Image.fromarray(sample["labels"].get_mask()).save(path)
    sample["labels"] = fo.Segmentation(mask_path=str(path))
    sample.save()
    path.unlink()
    _fails(dataset.view(), demo(label_field="labels", output_field="out", prompt_tag="prompt"),
           "Path: label_field", f"the mask file {path} of the 'labels' label of the prompt "
           f"{Path(sample.filepath).name} does not exist")
    assert not dataset.has_field("out")


# ----------------------------------------------------------------------------- palette and EXIF images

def test_palette_and_exif_rotated_images_are_read_as_shown(dataset, tiles, tmp_path):
    """A palette PNG is segmented as its RGB version; an EXIF-rotated JPEG gives a mask of the rotated
    (displayed) size, equal to the prediction for the upright pixels."""
    import fiftyone as fo
    from PIL import Image, ImageOps

    grey = tiles[3][1][:, :96]  # 128 x 96: not square, so a rotation changes the shape
    palette = Image.fromarray(np.stack([grey, 255 - grey, grey // 2], -1)).quantize(64)
    palette.save(tmp_path / "palette.png")
    palette.convert("RGB").save(tmp_path / "palette_rgb.png")

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.fromarray(np.ascontiguousarray(np.rot90(grey))).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rotated.jpg") as img:
        stored = img.size
        shown = ImageOps.exif_transpose(img).convert("RGB")
    shown.save(tmp_path / "upright.png")
    assert stored[::-1] == shown.size

    names = ["palette.png", "palette_rgb.png", "rotated.jpg", "upright.png"]
    ids = dataset.add_samples([fo.Sample(filepath=str(tmp_path / n)) for n in names], progress=False)
    run(dataset.select(ids), demo(label_field="labels", output_field="pred", prompt_tag="prompt"))
    preds = dict(zip(names, dataset.select(ids, ordered=True).values("pred")))
    pal, pal_rgb = preds["palette.png"].get_mask(), preds["palette_rgb.png"].get_mask()
    assert pal.shape == (128, 96)
    np.testing.assert_array_equal(pal, pal_rgb)
    rotated, upright = preds["rotated.jpg"].get_mask(), preds["upright.png"].get_mask()
    assert rotated.shape == (shown.height, shown.width) != (stored[1], stored[0])
    np.testing.assert_array_equal(rotated, upright)


# ------------------------------------------------------------------------------ COCO export (issue 13)


def test_coco_export_of_the_cli_imports_into_fiftyone(fo_env, tiles):
    """`seggpt segment --output instances --format coco` -> fo.Dataset.from_dir(COCO detection): one
    detection per object, whose masks are the objects of the exported instance maps."""
    import fiftyone as fo
    from PIL import Image

    folder = fo_env / "coco_export"
    (folder / "data").mkdir(parents=True)
    prompt_path, _, prompt_instances = tiles[PROMPT_TILES[0]]
    Image.fromarray((prompt_instances > 0).astype(np.uint8)).save(folder / "prompt_mask.png")
    targets = [tiles[k] for k in (3, 9)]
    for path, image, _ in targets:
        Image.fromarray(image).save(folder / "data" / Path(path).name)
    (folder / "names.txt").write_text("1 nucleus\n")
    result = subprocess.run([str(SEGGPT), "segment", "--model", "demo", "--prompt", prompt_path,
                             str(folder / "prompt_mask.png"), str(folder / "data"), "--out", str(folder / "out"),
                             "--output", "instances", "--format", "png", "coco", "--split-touching",
                             "--label-names", str(folder / "names.txt")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    imported = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(folder / "data"),
                                   labels_path=str(folder / "out" / "coco.json"), label_types=["segmentations"],
                                   label_field="seggpt", progress=False)
    try:
        assert len(imported) == len(targets)
        for sample in imported:
            instance_map = np.asarray(Image.open(folder / "out" / f"{Path(sample.filepath).stem}_instances.png"))
            detections = sample["seggpt"].detections
            assert len(detections) == len(np.unique(instance_map)) - 1 > 3
            assert {d.label for d in detections} == {"nucleus"}
            canvas = np.zeros(instance_map.shape, np.int64)
            for k, detection in enumerate(detections, 1):
                detection.to_segmentation(mask=canvas, target=k)
            assert np.array_equal(canvas > 0, instance_map > 0)
    finally:
        imported.delete()


# ------------------------------------------------------------------ the review loop in the App (issue 22)


def form(dataset, params, selected=None, view=None):
    """The App form (resolve_input) for these params: {property name: Property}."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    request = {"dataset_name": dataset.name, "params": dict(params)}
    if selected:
        request["selected"] = list(selected)
    if view is not None:
        request["view"] = view._serialize()
    return foo.get_operator(URI).resolve_input(ExecutionContext(request_params=request)).type.properties


def test_confidence_field_is_indexed_for_the_apps_sort_by(immediate):
    """Item 1: the App's "Sort by" lists indexed fields: the confidence field is one, described as the
    review order, and ascending order puts the lowest predicted IoU first."""
    dataset, _, _ = immediate
    assert "pred_confidence" in dataset.list_indexes()
    assert dataset.get_field("pred_confidence").description == "predicted IoU (lower: review first)"
    ordered = dataset.exists("pred").sort_by("pred_confidence").values("pred_confidence")
    assert ordered == sorted(ordered) and len(ordered) == 14


def test_output_is_switched_on_and_coloured_apart_from_the_source(immediate):
    """Item 2: the run switches the new field on (with its source) and colours it apart from the source."""
    dataset, result, _ = immediate
    active = requests(result, "set_active_fields")[-1]["params"]["fields"]
    assert active[-2:] == ["labels", "pred"]
    entries = {e["path"]: e for e in dataset.app_config.color_scheme.fields}
    pred, labels = entries["pred"], entries["labels"]
    assert [c["intTarget"] for c in pred["maskTargetsColors"]] == [1] == [c["intTarget"] for c in
                                                                         labels["maskTargetsColors"]]
    colours = lambda e: {e["fieldColor"]} | {c["color"] for c in e["maskTargetsColors"]}  # noqa: E731
    assert colours(pred).isdisjoint(colours(labels))


def test_colours_keep_what_the_user_set(dataset):
    """A source field with colours of its own keeps them; the output avoids them."""
    import fiftyone as fo

    from seggpt_plugins.fiftyone.app import PREDICTION_COLORS, colour
    from seggpt_plugins.fiftyone.options import Options

    dataset.app_config.color_scheme = fo.ColorScheme(fields=[
        {"path": "labels", "fieldColor": PREDICTION_COLORS[0],
         "maskTargetsColors": [{"intTarget": 1, "color": PREDICTION_COLORS[0]}]}])
    dataset.save()
    colour(dataset, Options(label_field="labels", output_field="pred"), "Segmentation")
    entries = {e["path"]: e for e in dataset.app_config.color_scheme.fields}
    assert entries["labels"]["fieldColor"] == PREDICTION_COLORS[0]  # untouched
    assert entries["pred"]["maskTargetsColors"] == [{"intTarget": 1, "color": PREDICTION_COLORS[1]}]


def test_scheduled_run_is_named_and_listed_in_the_form(dataset):
    """Item 3: a scheduled run has the operator's label (as `fiftyone delegated list` shows it), and the
    form lists it with its id and state: queued (with the command that runs it), then done."""
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService

    view = dataset.limit(4)
    queued = foo.get_operator(URI)(view, "labels", "pred", prompt_tag="prompt", model="demo", device="cpu",
                                   delegate=True)
    assert queued.delegated and queued.result["label"] == "Propagate labels with SegGPT -> pred"
    op_id = str(queued.result["id"])
    props = form(dataset, demo(label_field="labels", output_field="pred2", prompt_tag="prompt"))
    assert props["runs"].view.label == "Scheduled runs on this dataset (newest first)"
    assert (f"Propagate labels with SegGPT -> pred ({op_id}): queued, waiting for a worker (`fiftyone delegated "
            "launch`)") in props["runs"].view.description
    DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    props = form(dataset, demo(label_field="labels", output_field="pred2", prompt_tag="prompt"))
    assert f"-> pred ({op_id}): done" in props["runs"].view.description
    assert dataset.count("pred") == 3 and "pred_confidence" in dataset.list_indexes()


def test_model_is_offered_and_checked_in_the_form(base, tmp_path, monkeypatch):
    """Item 4: the models available here are offered (demo, SegGPT weights in the Hugging Face cache, local
    folders), and anything else is refused in the form, at once, in the App's words."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--seggpt-small" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "seggpt"}')
    (cache / "models--someone--seggpt-small" / "refs").mkdir()
    (cache / "models--someone--seggpt-small" / "refs" / "main").write_text("0" * 40)
    other = cache / "models--someone--bert" / "snapshots" / ("1" * 40)
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"model_type": "bert"}')
    (cache / "models--someone--bert" / "refs").mkdir()
    (cache / "models--someone--bert" / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    params = demo(label_field="labels", output_field="out", prompt_tag="prompt")
    props = form(base, params)
    offered = [c.value for c in props["model"].view.choices]
    assert offered == ["auto", "demo", "someone/seggpt-small"]
    assert not props["model"].invalid

    folder = tmp_path / "model"
    folder.mkdir()
    for model, expected in [("BAAI/seggpt-vit-large", "'BAAI/seggpt-vit-large' is not downloaded on this machine"),
                            (str(folder), f"the folder {folder} has no config.json"),
                            (str(tmp_path / "nowhere"), "no folder or file"),
                            ("someone/bert", "'someone/bert' is not a SegGPT model (its config says 'bert')"),
                            ("someone/seggpt-small", None)]:
        model_field = form(base, {**params, "model": model})["model"]
        if expected is None:
            assert not model_field.invalid, model_field.error_message
        else:
            assert model_field.invalid and expected in model_field.error_message
    import time

    started = time.monotonic()
    _fails(base.view(), {**params, "model": "BAAI/seggpt-vit-large"}, "Path: model. Reason: 'BAAI/seggpt-vit-large'")
    assert time.monotonic() - started < 10  # refused by the form's check, not after a download attempt
    assert not base.has_field("out")


def test_failed_run_says_it_stopped_in_the_apps_words(dataset, monkeypatch):
    """Item 4: a failure while loading the model replaces the progress line ('Loading model ...') by
    'SegGPT stopped' and a message for the App (no command-line options), naming the Model field."""
    import fiftyone.operators.executor as foe

    from seggpt_plugins.errors import ModelSourceError
    from seggpt_plugins.fiftyone import segment

    def broken(*args, **kwargs):
        raise ModelSourceError("could not load SegGPT weights 'x' from the Hugging Face hub: offline. "
                               "Alternatives: --model demo (the small model)")

    monkeypatch.setattr(segment, "get_model", broken)
    with pytest.raises(foe.ExecutionError) as info:
        run(dataset.limit(3), demo(label_field="labels", output_field="out", prompt_tag="prompt"))
    assert "model: could not load SegGPT weights 'x'" in str(info.value) and "--model" not in str(info.value)
    assert not dataset.has_field("out")


def test_failed_run_replaces_the_progress_line(dataset, monkeypatch):
    from seggpt_plugins.errors import ModelSourceError
    from seggpt_plugins.fiftyone import segment

    def broken(*args, **kwargs):
        raise ModelSourceError("could not load it. Alternatives: --model demo")

    monkeypatch.setattr(segment, "get_model", broken)
    import fiftyone.operators as foo

    op = foo.get_operator(URI)
    from fiftyone.operators.executor import ExecutionContext, Executor

    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": demo(
        label_field="labels", output_field="out", prompt_tag="prompt")}, executor=Executor())
    messages = []
    with pytest.raises(Exception):
        for message in op.execute(ctx):
            messages.append(message.body.to_json())
    names = [m["operator_uri"] for m in messages]
    assert names[-2:] == ["show_output", "notify"]
    assert any(m["params"].get("label", "").startswith("Loading model") for m in messages[:-2])
    shown = messages[-2]["params"]["outputs"]["type"]["properties"]["stopped"]["view"]
    assert shown["label"] == "SegGPT stopped" and "could not load it" in shown["description"]
    assert messages[-1]["params"]["variant"] == "error" and "Alternatives" not in messages[-1]["params"]["message"]


def test_evaluation_stores_miou_for_the_panel_and_the_info(immediate):
    """Item 5: the mIoU (background counted) and per-class IoU are stored with the evaluation: custom
    metrics of its results (the Model Evaluation panel lists them) and its config (get_evaluation_info)."""
    from seggpt_plugins.fiftyone.evaluation import iou_from_confusion

    dataset, result, _ = immediate
    results = dataset.load_evaluation_results("pred_eval")
    iou, miou = iou_from_confusion(results.pixel_confusion_matrix, results.classes)  # as stored (see above)
    assert f"mIoU {miou:.3f} (background counted)" in requests(result, "notify")[-1]["params"]["message"]
    config = dataset.get_evaluation_info("pred_eval").config
    assert config.miou == pytest.approx(miou, rel=1e-12) and config.miou_counts_background is True
    assert config.class_iou == pytest.approx(iou, rel=1e-12) and set(iou) == {"background", "nucleus"}
    metrics = results.metrics()
    assert metrics["miou"] == pytest.approx(miou) and metrics["iou_nucleus"] == pytest.approx(iou["nucleus"])
    entry = results.custom_metrics["@seggpt/seggpt/miou"]
    assert entry["label"] == "mIoU (background counted)" and entry["lower_is_better"] is False


def test_form_essentials_first_and_advanced_behind_a_switch(base):
    """Item 6: which samples, what to learn from, where to write and the model up front; the rest behind
    Advanced settings; labels are the parameters' names."""
    props = form(base, demo(label_field="labels", output_field="out", prompt_tag="prompt"))
    fields = [name for name in props if name not in ("plan", "runs", "problems")]
    assert fields == ["view_target", "label_field", "prompt_tag", "output_field", "model", "advanced"]
    assert (props["label_field"].view.label, props["output_field"].view.label) == ("Label field", "Output field")
    advanced = form(base, demo(label_field="labels", output_field="out", prompt_tag="prompt", advanced=True))
    assert {"max_prompts", "batch_size", "device", "precision", "num_shards", "gt_field", "tile",
            "quality"} <= set(advanced)
    assert (advanced["gt_field"].view.label, advanced["max_prompts"].view.label) == ("Ground truth field",
                                                                                     "Max prompts")
    # an error in a hidden setting opens the section
    props = form(base, demo(label_field="labels", output_field="out", prompt_tag="prompt", halo=-1))
    assert props["halo"].invalid


def test_schedule_is_the_main_button_for_large_views(base, monkeypatch):
    """Item 6: above IMMEDIATE_LIMIT targets the App offers Schedule first, and the plan says why."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    plugin = plugin_module("operators")
    params = demo(label_field="labels", output_field="out", prompt_tag="prompt")
    ctx = ExecutionContext(request_params={"dataset_name": base.name, "params": params})
    assert not foo.get_operator(URI).resolve_execution_options(ctx).default_choice_to_delegated
    monkeypatch.setattr(plugin, "IMMEDIATE_LIMIT", 10)
    assert foo.get_operator(URI).resolve_execution_options(ctx).default_choice_to_delegated
    assert "Schedule it: a worker runs it (`fiftyone delegated launch`)" in form(base, params)["plan"].view.label


def test_form_defaults_to_the_field_the_prompts_have(dataset):
    """Item 6: the default label field is the one with masks on the prompts and not filled everywhere
    (not the alphabetically first 'gt'); SegGPT's own outputs are not offered to learn from."""
    assert form(dataset, {})["label_field"].default == "labels"
    assert form(dataset, {"prompt_tag": "prompt"})["label_field"].default == "labels"
    selected = dataset.match_tags("prompt").values("id")
    assert form(dataset, {}, selected=selected)["label_field"].default == "labels"

    run(dataset.limit(3), demo(label_field="labels", output_field="pred", prompt_tag="prompt"))
    offered = [c.value for c in form(dataset, {"label_field": "labels"})["label_field"].view.choices]
    assert "pred" not in offered and "labels" in offered

    only_instances = dataset.match_tags("prompt").limit(1)
    for sample in only_instances:
        sample["labels"] = None
        sample.save()
    assert form(dataset, {}, selected=only_instances.values("id"))["label_field"].default == "instances"


def test_messages_name_files_not_sample_ids(dataset):
    """Item 7: one prompt: 'the prompt sample ... has'; file names instead of sample ids."""
    view = dataset.limit(3)
    view.skip(1).limit(1).tag_samples("only")
    _fails(view, demo(label_field="labels", output_field="out", prompt_tag="only"),
           "the prompt sample (samples tagged 'only') has no 'labels' label to learn from: tile_000_128.png")


def test_cli_fiftyone_and_label_studio_give_the_same_objects_and_scores(fo_env, nuclei2d, tmp_path, demo_model):
    """One pipeline (issue 28): one instance-labelled example and three targets through the CLI, this operator
    and the Label Studio backend give the same objects, per-object scores and per-image confidence."""
    pytest.importorskip("flask")
    pytest.importorskip("label_studio_sdk")
    from .same_answer import check_same_answer

    check_same_answer(nuclei2d, fo_env, tmp_path, demo_model)


# --------------------------------------------------------------- adapting the model (issue 31, item 3)

ADAPT_URI = "@seggpt/seggpt/adapt_seggpt"


def quick_adapt(**params):
    """Six quick steps that beat the demo model on the held-out corner of the prompt tiles."""
    return {"label_field": "labels", "model": "demo", "device": "cpu", "time_limit": 600, "steps": 6,
            "eval_every": 2, "batch_size": 2, "learning_rate": 1e-3, **params}


@pytest.fixture
def models_dir(fo_env, tmp_path, monkeypatch):
    folder = tmp_path / "adapted"
    monkeypatch.setenv("SEGGPT_ADAPTED_DIR", str(folder))
    return folder


def test_adapted_model_is_offered_and_used_by_propagate(dataset, models_dir):
    """Immediate: the labelled samples of the view (the two prompt tiles) adapt the demo model, with progress;
    the model folder it saves is offered by the propagate form, and propagating with it uses its weights."""
    import json

    import fiftyone.operators as foo

    view = dataset.limit(8)  # tiles 0 and 5 have 'labels'
    result = foo.execute_operator(ADAPT_URI, dict(view=view, params=quick_adapt(name="nuclei")))
    assert result.error is None, result.error
    folder = models_dir / "nuclei"
    info = json.loads((folder / "adaptation.json").read_text())
    assert info["improved"] and info["examples"] == 2 and info["fingerprint"] != info["base_fingerprint"]
    assert info["fiftyone"] == {"dataset": dataset.name, "label_field": "labels", "samples": 2}
    progress = [r["params"] for r in requests(result, "set_progress")]
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(p["label"].startswith("Adapting to 2 labelled samples: step ") for p in progress)
    note = requests(result, "notify")[-1]["params"]
    assert note["variant"] == "success" and note["message"].startswith("Adapted to 2 labelled samples in ")
    assert f"saved as {folder}: choose it as the Model of 'Propagate labels with SegGPT'" in note["message"]

    choices = {c.value: c.description for c in form(dataset, demo(label_field="labels", output_field="pred",
                                                                  prompt_tag="prompt"))["model"].view.choices}
    assert choices[str(folder)].startswith(f"adapted to 2 samples of '{dataset.name}' (labels) from demo: "
                                           "held-out IoU ")
    adapted = run(dataset.limit(4), demo(label_field="labels", output_field="pred", prompt_tag="prompt",
                                         model=str(folder)), delegate=True)
    base = run(dataset.limit(4), demo(label_field="labels", output_field="base", prompt_tag="prompt"), delegate=True)
    from fiftyone.operators.delegated import DelegatedOperationService

    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    summaries = [service.get(r.result["id"]).result.result for r in (adapted, base)]
    assert summaries[0]["model_fingerprint"] == info["fingerprint"]
    assert summaries[1]["model_fingerprint"] == info["base_fingerprint"]
    assert dataset.count("pred") == 3

    # the same name again: refused in the form's words, the model kept
    _adapt_fails(view, quick_adapt(name="nuclei"), f"Path: name. Reason: a model named 'nuclei' exists in "
                 f"{models_dir}; choose another name (it is never overwritten)")
    assert json.loads((folder / "adaptation.json").read_text()) == info


def test_adapt_delegated_reports_progress_and_saves_under_a_new_name(dataset, models_dir, monkeypatch):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    import fiftyone.operators as foo

    queued = foo.get_operator(ADAPT_URI)(dataset.limit(8), "labels", **{k: v for k, v in quick_adapt().items()
                                                                          if k != "label_field"}, delegate=True)
    assert queued.delegated and not models_dir.exists()
    reported = []
    original = DelegatedOperationService.set_progress

    def record(self, doc_id, progress):
        reported.append((progress.progress, progress.label))
        return original(self, doc_id, progress)

    monkeypatch.setattr(DelegatedOperationService, "set_progress", record)
    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    doc = service.get(queued.result["id"])
    assert doc.run_state == ExecutionRunState.COMPLETED, doc.result
    summary = doc.result.result
    [folder] = list(models_dir.iterdir())
    assert summary["model"] == str(folder) and folder.name.startswith(f"{dataset.name}-labels-")
    fractions = [f for f, _ in reported]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(label.startswith("Adapting to 2 labelled samples: step 6 / 6") for _, label in reported)


def test_adapt_stopped_in_the_app_saves_nothing(dataset, models_dir):
    """An immediate run the App stops (its generator closed) stops the training and saves no model: the
    propagate operator's models stay as they were."""
    import threading
    import time

    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext, Executor

    request = {"dataset_name": dataset.name, "params": quick_adapt(steps=300, name="stopped")}
    messages = foo.get_operator(ADAPT_URI).execute(ExecutionContext(request_params=request, executor=Executor()))
    for message in messages:
        if "Adapting to 2 labelled samples: step" in str(message.to_json()):
            break
    else:
        pytest.fail("no adapting progress")
    messages.close()
    for _ in range(1200):  # the training thread ends at the next step
        if not any(t.name == "seggpt-adapt" for t in threading.enumerate()):
            break
        time.sleep(0.1)
    assert not any(t.name == "seggpt-adapt" for t in threading.enumerate())
    assert not (models_dir / "stopped").exists()


def _adapt_fails(view, params, *expected):
    import fiftyone.operators as foo
    import fiftyone.operators.executor as foe

    with pytest.raises(foe.ExecutionError) as info:
        foo.execute_operator(ADAPT_URI, dict(view=view, params=params))
    for text in expected:
        assert text in str(info.value), str(info.value)[-800:]


@pytest.mark.parametrize("params, expected", [
    ({}, "Path: label_field. Reason: nothing to adapt to: no samples of the view with 'labels' filled. Label one or "
         "a few samples (masks or instance masks), then adapt"),
    ({"steps": 0}, "Path: steps. Reason: must be >= 1, got 0"),
    ({"models_dir": "relative/models"}, "Path: models_dir. Reason: must be an absolute folder"),
    ({"name": "../up"}, "Path: name. Reason: '../up' is not a usable folder name"),
])
def test_adapt_refuses_bad_input_before_any_training(base, models_dir, monkeypatch, params, expected):
    from seggpt_plugins import SegGPT

    monkeypatch.setattr(SegGPT, "adapt", lambda *a, **k: pytest.fail("training started"))
    view = base.limit(8) if params else base.match_tags("prompt", bool=False)  # labelled samples, or none
    _adapt_fails(view, quick_adapt(**params), expected)
    assert not models_dir.exists()
