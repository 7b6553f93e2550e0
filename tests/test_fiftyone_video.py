"""The FiftyOne operator on video datasets, against a real MongoDB (FiftyOne's bundled mongod).

Three short videos (8 frames of 64x64, H.264 through PyAV) of two discs moving apart, encoded here; the
labels are frame fields: `frames.gt` (Segmentation) and `frames.gt_objects` (Detections with instance
masks) on frames 3 and 6 of the first video, frame 5 of the second; the third has none. The plugin is
installed with the real `seggpt fiftyone install`, as in tests/test_fiftyone_operator.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ._metadata import standard_metadata_finder
from .test_fiftyone_operator import _fails, form, run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEGGPT = Path(sys.executable).with_name("seggpt")
URI = "@seggpt/seggpt/propagate_labels"
SIZE, FRAMES = 64, 8
ANNOTATED = {0: (3, 6), 1: (5,), 2: ()}  # video -> annotated frame numbers (FiftyOne's, from 1)


# ---------------------------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def fo_env(tmp_path_factory):
    """The plugin installed by the real CLI into a private plugins folder; a private database unless this
    process is connected to one already (another FiftyOne test module ran first: its database is reused,
    as FiftyOne connects once per process)."""
    import importlib.util

    if importlib.util.find_spec("fiftyone") is None or importlib.util.find_spec("av") is None:
        pytest.skip("needs the `fiftyone` and `video` extras")
    root = tmp_path_factory.mktemp("fiftyone_video")
    env = {"FIFTYONE_PLUGINS_DIR": str(root / "plugins"), "FIFTYONE_DO_NOT_TRACK": "true",
           "FIFTYONE_SHOW_PROGRESS_BARS": "false"}
    connected = False
    if "fiftyone" in sys.modules:
        import fiftyone.core.odm.database as fodb

        connected = getattr(fodb, "_client", None) is not None
    if not connected:
        env["FIFTYONE_DATABASE_DIR"] = str(root / "db")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    install = subprocess.run([str(SEGGPT), "fiftyone", "install"], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=60)
    assert install.returncode == 0, install.stderr
    with standard_metadata_finder():
        import fiftyone as fo
        import fiftyone.operators  # noqa: F401
    if not connected:
        fo.config.database_dir = env["FIFTYONE_DATABASE_DIR"]
    saved_plugins = fo.config.plugins_dir
    fo.config.plugins_dir = env["FIFTYONE_PLUGINS_DIR"]
    fo.config.show_progress_bars = False
    yield root
    fo.config.plugins_dir = saved_plugins
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def truth(video: int, frame_number: int) -> np.ndarray:
    """Object map of a frame: disc 1 moves right, disc 2 moves down (video k starts them k pixels on)."""
    i = frame_number - 1 + video
    yy, xx = np.mgrid[:SIZE, :SIZE]
    objects = np.zeros((SIZE, SIZE), np.uint8)
    objects[(yy - 18) ** 2 + (xx - (10 + 3 * i)) ** 2 <= 64] = 1
    objects[(yy - (8 + 3 * i)) ** 2 + (xx - 50) ** 2 <= 64] = 2
    return objects


def encode_video(path: Path, video: int) -> Path:
    from seggpt_plugins.video import VideoWriter

    rng = np.random.default_rng(video)
    with VideoWriter(path, fps=10) as out:
        for n in range(1, FRAMES + 1):
            objects = truth(video, n)
            grey = np.where(objects == 1, 220, np.where(objects == 2, 150, 30)) + rng.normal(0, 4, objects.shape)
            out.write(np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return path


def detections_of(objects: np.ndarray):
    import fiftyone as fo

    return fo.Detections(detections=[fo.Detection.from_mask(objects == k, label="disc") for k in (1, 2)])


@pytest.fixture(scope="module")
def base(fo_env):
    import fiftyone as fo

    dataset = fo.Dataset()
    for video, numbers in ANNOTATED.items():
        sample = fo.Sample(filepath=str(encode_video(fo_env / f"clip{video}.mp4", video)))
        for n in numbers:
            objects = truth(video, n)
            sample.frames[n] = fo.Frame(gt=fo.Segmentation(mask=(objects > 0).astype(np.uint8)),
                                        gt_objects=detections_of(objects))
        dataset.add_sample(sample)
    dataset.mask_targets = {"frames.gt": {0: "background", 1: "disc"}}
    dataset.save()
    return dataset


@pytest.fixture
def dataset(base):
    clone = base.clone()
    yield clone
    clone.delete()




def demo(**params):
    return {"model": "demo", "device": "cpu", "max_prompts": 1, "memory": 1, "batch_size": 4, **params}


def annotated_videos(dataset):
    return dataset.limit(2)


def frames_with(sample, field):
    """{frame number: value} of the frames of a video sample where `field` is set."""
    return {n: frame[field] for n, frame in sample.frames.items() if frame.get_field(field) is not None}


def execute_queued(dataset, ids):
    """Run the queued operations (as `fiftyone delegated launch` does); the results of those of `ids`."""
    from bson import ObjectId
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    ops = [service.get(ObjectId(str(i))) for i in ids]
    assert all(op.run_state == ExecutionRunState.COMPLETED for op in ops), [op.result.error for op in ops]
    return [op.result.result for op in ops]


# ------------------------------------------------------------------------------------------- Segmentation


def test_every_other_frame_labelled_as_the_core_propagates_it(dataset, demo_model):
    """Immediate run: every frame but the annotated ones gets a Segmentation and a confidence, frame number
    n holding exactly what the core's propagate_video gives for index n - 1 (the 1-based/0-based mapping);
    then a second run with skip_existing writes only the frames that lost their output."""
    from seggpt_plugins.video import open_frames, propagate_video

    view = annotated_videos(dataset)
    before = {s.id: {n: f["gt"].mask.copy() for n, f in s.frames.items()} for s in view}
    result = run(view, demo(label_field="frames.gt", output_field="frames.seg"))
    assert result.error is None, result.error
    messages = [r["params"] for r in result.executor.to_json()["requests"]]
    labels = [m.get("label", "") for m in messages]
    assert any("Video 1/2 (clip0.mp4): frame" in label for label in labels)
    done = f"{2 * FRAMES - 3} frames written to 'frames.seg' (2 videos)"
    assert any(done in m.get("message", "") for m in messages), messages

    dataset.reload()
    view = annotated_videos(dataset)  # a new view: one made before the run has the frame schema of then
    assert dataset.mask_targets["frames.seg"] == dataset.mask_targets["frames.gt"]
    assert dataset.count("frames.seg") == dataset.count("frames.seg_confidence") == 2 * FRAMES - 3
    for sample in view:
        video = int(Path(sample.filepath).stem[-1])
        written = frames_with(sample, "seg")
        assert sorted(written) == [n for n in range(1, FRAMES + 1) if n not in ANNOTATED[video]]
        for n in ANNOTATED[video]:  # annotated frames untouched
            assert sample.frames[n]["seg"] is None and np.array_equal(sample.frames[n]["gt"].mask, before[sample.id][n])
        confidences = [sample.frames[n]["seg_confidence"] for n in written]
        assert all(0.0 <= c <= 1.0 for c in confidences)
        # the propagation found the discs (the demo model on an easy clip)
        ious = [np.sum((label.mask > 0) & (truth(video, n) > 0)) / np.sum((label.mask > 0) | (truth(video, n) > 0))
                for n, label in written.items()]
        assert np.mean(ious) > 0.5, ious
        if video != 0:
            continue
        with open_frames(sample.filepath) as frames:
            annotations = {n - 1: before[sample.id][n] for n in ANNOTATED[video]}
            expected = {r.index + 1: r.prediction.labels for r in propagate_video(
                demo_model, frames, annotations, memory=1, batch_size=4, seg_type="semantic", max_prompts=1)
                if not r.annotated}
        assert sorted(expected) == sorted(written)
        for n, label in written.items():
            assert label.mask.shape == (SIZE, SIZE)
            assert np.array_equal(label.mask, expected[n]), f"frame {n}"

    # skip existing, per frame
    view = dataset.limit(1)
    sample = view.first()
    ids = {n: label.id for n, label in frames_with(sample, "seg").items()}
    for n in (2, 8):  # two frames lose their output
        sample.frames[n]["seg"] = None
    sample.save()

    result = run(view, demo(label_field="frames.gt", output_field="frames.seg"))
    assert result.error is None
    messages = [r["params"].get("message", "") for r in result.executor.to_json()["requests"]]
    assert any("2 frames written to 'frames.seg' (1 videos)" in m for m in messages), messages
    sample = view.first()
    now = {n: label.id for n, label in frames_with(sample, "seg").items()}
    assert sorted(now) == sorted(ids)
    assert [n for n in now if now[n] != ids[n]] == [2, 8]  # only those two were written again


# ------------------------------------------------------------------------------- instances, delegated, shards


def test_delegated_instances_keep_identity_and_shards_take_whole_videos(dataset):
    """Detections output, queued in 2 shards over 3 videos (the third learns from the tagged prompt video):
    each shard is a set of whole videos, together every video once; every other frame gets Detections
    whose index follows each disc through its video."""
    from bson import ObjectId
    from fiftyone.core.view import DatasetView
    from fiftyone.operators.delegated import DelegatedOperationService

    dataset.limit(1).tag_samples("prompt")
    params = demo(label_field="frames.gt_objects", output_field="frames.objects", prompt_tag="prompt", num_shards=2)
    result = run(dataset.view(), params, delegate=True)
    assert result.delegated and not dataset.has_field("frames.objects")
    shards = execute_queued(dataset, [result.result["id"]])[0]["shards"]
    service = DelegatedOperationService()
    parts = []
    for op_id in shards:
        request = service.get(ObjectId(op_id)).context.request_params
        parts.append(DatasetView._build(dataset, request["view"]).values("id"))
    assert sorted(len(p) for p in parts) == [1, 2]
    assert sorted(parts[0] + parts[1]) == sorted(dataset.values("id"))  # each video in exactly one shard
    summaries = execute_queued(dataset, shards)
    assert sorted(s["videos"] for s in summaries) == [1, 2] and sum(s["targets"] for s in summaries) == 3 * FRAMES - 3

    dataset.reload()
    for sample in dataset:
        video = int(Path(sample.filepath).stem[-1])
        written = frames_with(sample, "objects")
        assert sorted(written) == [n for n in range(1, FRAMES + 1) if n not in ANNOTATED[video]]
        assert all(sample.frames[n]["objects"] is None for n in ANNOTATED[video])
        identity = {1: set(), 2: set()}  # disc -> the indices of the detections that cover it
        found = {1: 0, 2: 0}
        for n, label in written.items():
            assert all(d.label == "disc" and d.index is not None and d.mask is not None for d in label.detections)
            objects = truth(video, n)
            for disc in (1, 2):
                best = max(label.detections, key=lambda d: _overlap(d, objects == disc), default=None)
                if best is not None and _overlap(best, objects == disc) > 0.3:
                    identity[disc].add(best.index)
                    found[disc] += 1
        assert min(found.values()) >= len(written) // 2, found  # the discs are found, mostly
        assert len(identity[1]) == 1 and len(identity[2]) == 1, identity  # one id per disc through the video
        assert identity[1] != identity[2]


def _overlap(detection, disc: np.ndarray) -> float:
    """IoU of a detection's instance mask with a disc."""
    mask = np.zeros(disc.shape, np.uint8)
    detection.to_segmentation(mask=mask, target=1)
    mask = mask > 0
    return float(np.sum(mask & disc) / max(1, np.sum(mask | disc)))


# ------------------------------------------------------------------------------------------- commit


def test_a_failed_commit_leaves_no_frame_field_and_a_killed_move_is_finished(dataset, monkeypatch, tmp_path):
    """The frames' commit keeps the image commit's guarantees: a failure while staging removes what the run
    created (no field, no frame label); a run that stopped in its move is finished by the next run."""
    from seggpt_plugins.fiftyone import codecs, commit

    view = dataset.limit(1)
    params = demo(label_field="frames.gt", output_field="frames.seg", mask_dir=str(tmp_path))
    original = codecs.SegmentationCodec.label
    calls = []

    def fail_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the disk went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(codecs.SegmentationCodec, "label", fail_third)
    _fails(view, params, "the disk went away")
    dataset.reload()
    assert not dataset.has_field("frames.seg") and not dataset.has_field("frames.seg_confidence")
    assert commit._db()[commit.PENDING].count_documents({}) == 0
    assert commit._db()[commit.JOURNAL].count_documents({"dataset_id": str(dataset._doc.id)}) == 0
    monkeypatch.undo()

    def stop(dataset, run_id):
        raise RuntimeError("killed in the move")

    monkeypatch.setattr(commit, "_move_frames", stop)
    _fails(view, params, "killed in the move")
    dataset.reload()
    assert dataset.count("frames.seg") == 0  # declared, nothing visible yet
    monkeypatch.undo()
    assert any("finished the commit" in line for line in commit.recover(dataset))  # what the next run does first
    dataset.reload()
    expected = FRAMES - len(ANNOTATED[0])
    assert dataset.count("frames.seg") == dataset.count("frames.seg_confidence") == expected
    assert commit._db()[commit.PENDING].count_documents({}) == 0
    paths = [label.mask_path for label in frames_with(dataset.limit(1).first(), "seg").values()]
    assert len(paths) == expected
    assert all(Path(p).parent == tmp_path / "frames.seg" and Path(p).is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "frames.seg").iterdir()) == sorted(Path(p).name for p in paths)


# ------------------------------------------------------------------------------------------- bad input




def test_sample_fields_on_a_video_dataset_and_a_video_without_prompts(dataset):
    _fails(dataset.view(), demo(label_field="gt", output_field="frames.x"),
           "'gt' is a sample field, but this is a video dataset", "give a frame field as 'frames.gt'")
    _fails(dataset.view(), demo(label_field="frames.gt", output_field="x"),
           "Path: output_field", "'x' is a sample field, but this is a video dataset")
    _fails(dataset.view(), demo(label_field="frames.gt", output_field="frames.x"),
           "1 video has no annotated frame ('frames.gt' set) and there are no prompt videos", "clip2.mp4")
    _fails(dataset.view(), demo(label_field="frames.gt", output_field="frames.x", quality="full"),
           "Path: quality. Reason: video datasets are propagated, which reads the fast estimate only, got 'full'")
    assert not dataset.has_field("frames.x")


def test_frame_fields_on_an_image_dataset(fo_env):
    import fiftyone as fo
    from PIL import Image

    path = fo_env / "still.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    images = fo.Dataset()
    images.add_sample(fo.Sample(filepath=str(path), gt=fo.Segmentation(mask=np.ones((SIZE, SIZE), np.uint8))))
    try:
        _fails(images.view(), demo(label_field="frames.gt", output_field="frames.x"),
               "Path: label_field", "'frames.gt' is a frame field, but this dataset holds images")
    finally:
        images.delete()


def test_corrupt_video_and_wrong_mask_size_fail_before_the_model(dataset, fo_env, monkeypatch):
    import fiftyone as fo

    from seggpt_plugins import model_cache

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_cache, "get_model", no_model)
    monkeypatch.setattr(sys.modules["seggpt_plugins.fiftyone.segment"], "get_model", no_model)

    broken = fo_env / "broken.mp4"
    data = (fo_env / "clip0.mp4").read_bytes()
    broken.write_bytes(data[:48] + bytes(len(data) - 48))  # the header kept, the rest zeroed
    sample = dataset.first()
    sample.filepath = str(broken)
    sample.save()
    _fails(dataset.limit(2), demo(label_field="frames.gt", output_field="frames.x"), str(broken))
    assert not dataset.has_field("frames.x")

    sample.filepath = str(fo_env / "clip0.mp4")
    sample.frames[4]["gt"] = fo.Segmentation(mask=np.ones((SIZE // 2, SIZE), np.uint8))
    sample.save()
    _fails(dataset.limit(2), demo(label_field="frames.gt", output_field="frames.x"),
           "clip0.mp4: frame 4 of 'frames.gt': the mask is 64x32 (width x height), but the video's frames are 64x64")
    assert not dataset.has_field("frames.x")




def test_form_offers_frame_fields_and_says_what_a_run_will_do(dataset):
    fields = form(dataset, {"advanced": True}, view=dataset.limit(2))
    choices = [c.value for c in fields["label_field"].view.choices]
    assert choices == ["frames.gt", "frames.gt_objects"] and fields["output_field"].default.startswith("frames.")
    assert "memory" in fields
    plan = form(dataset, demo(label_field="frames.gt", output_field="frames.x"), view=dataset.limit(2))["plan"]
    assert plan.view.label == "the annotated frames of each video -> every other frame of 2 videos"
    bad = form(dataset, demo(label_field="frames.gt", output_field="frames.x"))["label_field"]
    assert bad.invalid and "clip2.mp4" in bad.error_message and "no annotated frame" in bad.error_message
