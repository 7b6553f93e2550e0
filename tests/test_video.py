"""Videos, animated GIFs, TIFF stacks and frame folders: lazy frame sources, propagation through them, and
`seggpt propagate VIDEO --prompt-frame N MASK` end to end (videos encoded here with PyAV)."""

import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import tifffile
from PIL import Image

from seggpt_plugins.cli import main
from seggpt_plugins.errors import InputError
from seggpt_plugins.video import open_frames, propagate_video

from .conftest import SAMPLES


def moving_scene(n=12, h=80, w=96, seed=0):
    """Two bright disks (ids 1 and 2) crossing a noisy background: (frames (N, H, W, 3) uint8, masks (N, H, W))."""
    rng = np.random.default_rng(seed)
    background = rng.normal(60, 8, (h, w)).clip(0, 255)
    yy, xx = np.mgrid[:h, :w]
    frames, masks = [], []
    for t in range(n):
        image, mask = background.copy(), np.zeros((h, w), np.uint8)
        for k, (y0, x0, vy, vx, r) in enumerate([(20, 15, 0.5, 2.5, 9), (55, 75, -0.8, -2.0, 11)], 1):
            disk = (yy - y0 - vy * t) ** 2 + (xx - x0 - vx * t) ** 2 < r * r
            image[disk], mask[disk] = 200, k
        frames.append(np.repeat(image[..., None], 3, -1).astype(np.uint8))
        masks.append(mask)
    return np.stack(frames), np.stack(masks)


def encode(path, frames, codec="libx264", rate=25, options=None, times_ms=None, pix_fmt="yuv420p"):
    """Write frames (N, H, W, 3) uint8 with PyAV; `times_ms`: each frame's time (a variable rate)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options or {}
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[k], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decoded_reference(path):
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


@pytest.fixture(scope="module")
def scene():
    return moving_scene()


@pytest.fixture
def clip(tmp_path, scene):
    """The scene as H.264 (keyframes every 4 frames, B-frames) and frame 6's mask as a PNG."""
    frames, masks = scene
    encode(tmp_path / "clip.mp4", frames, options={"crf": "10", "g": "4", "bf": "2"})
    Image.fromarray(masks[6]).save(tmp_path / "m6.png")
    return tmp_path / "clip.mp4", tmp_path / "m6.png"


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("name, codec, options, pix_fmt", [
    ("h264.mp4", "libx264", {"g": "5", "bf": "2"}, "yuv420p"),
    ("h264.mkv", "libx264", {"g": "7"}, "yuv420p"),
    ("vp9.webm", "libvpx-vp9", {}, "yuv420p"),
    ("mpeg4.avi", "mpeg4", {"g": "6", "bf": "2"}, "yuv420p"),
    ("mjpeg.mov", "mjpeg", {}, "yuvj420p"),
])
def test_any_frame_in_any_order_is_the_frame_a_plain_decode_gives(tmp_path, name, codec, options, pix_fmt):
    frames = moving_scene(n=30)[0]
    path = encode(tmp_path / name, frames, codec=codec, options=options, pix_fmt=pix_fmt)
    reference = decoded_reference(path)
    height, width = frames.shape[1:3]
    with open_frames(path, cache_bytes=4 * height * width * 3) as video:  # a cache of 4 frames
        assert len(video) == video.count == 30 and video.size == (height, width) and video.fps == 25
        assert np.allclose(video.times, np.arange(30) / 25)
        order = list(range(29, -1, -1)) + [3, 17, 0, 29, 12, 13, 14]
        assert all(np.array_equal(video[i], reference[i]) for i in order)
        assert video.stats["decoded"] <= 30 * 30 // 4  # backwards: about one keyframe interval per cache-full
        assert len(video.reader._cache) <= 4
        assert [f.index for f in video.iter_frames()] == list(range(30))


def test_variable_frame_rate_keeps_each_frames_time(tmp_path):
    frames = moving_scene(n=10)[0]
    times = [0, 15, 55, 70, 110, 125, 300, 310, 320, 500]
    path = encode(tmp_path / "vfr.mkv", frames, times_ms=times, options={"g": "3"})
    with open_frames(path) as video:
        assert len(video) == 10
        assert np.allclose(video.times, np.array(times) / 1000)
        assert [round(f.time, 3) for f in video.iter_frames()] == [t / 1000 for t in times]


def test_start_stop_every_choose_frames_by_their_index_in_the_file(clip):
    video = open_frames(clip[0], start=2, stop=11, every=3)
    assert list(video.indices) == [2, 5, 8] and len(video) == 3
    assert np.allclose(video.times, [0.08, 0.2, 0.32])
    assert video.position(5) == 1
    with pytest.raises(InputError, match="frame 4 is not among the chosen frames"):
        video.position(4)
    with pytest.raises(InputError, match="frame 12 is past the end of .*clip.mp4, which has 12 frames"):
        video.position(12)
    assert len(open_frames(clip[0], stop=1000)) == 12  # a stop past the end is the end
    with pytest.raises(InputError, match="start frame 12 is past the end"):
        open_frames(clip[0], start=12)


def test_animated_gif_tiff_stack_and_frame_folder(tmp_path, scene):
    frames = scene[0][:5]
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(tmp_path / "anim.gif", save_all=True, append_images=pictures[1:], duration=[40, 80, 40, 40, 40],
                     loop=0)
    with open_frames(tmp_path / "anim.gif") as gif:
        assert len(gif) == 5 and gif.size == (80, 96)
        assert np.allclose(gif.times, [0, 0.04, 0.12, 0.16, 0.2])
        assert all(np.abs(gif[i].astype(int) - frames[i]).max() < 16 for i in (4, 0, 3, 1, 2))  # palette rounding

    stack = tifffile.imread(SAMPLES / "nuclei3d.tif")
    with open_frames(SAMPLES / "nuclei3d.tif", every=10) as tiff:
        assert list(tiff.indices) == [0, 10, 20, 30] and np.array_equal(tiff[2], stack[20])

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (0, 1, 2, 10):  # natural order: frame2 before frame10
        Image.fromarray(frames[min(i, 4)]).save(folder / f"frame{i}.png")
    with open_frames(folder) as images:
        assert [p.name for p in images.reader.files] == ["frame0.png", "frame1.png", "frame2.png", "frame10.png"]
        assert np.array_equal(images[3], frames[4])


# ------------------------------------------------------------------------------------------ lazy propagation


def test_propagation_over_a_video_decodes_frames_as_it_goes(tmp_path, model64):
    """Both ways from frame 20 of 40, with a cache of 3 frames and keyframes every 5: frames are decoded on
    demand, a bounded number of times each, and never all held."""
    frames = moving_scene(n=40)[0]
    path = encode(tmp_path / "long.mp4", frames, options={"g": "5", "bf": "0"})
    mask = moving_scene(n=40)[1][20]
    video = open_frames(path, cache_bytes=3 * 80 * 96 * 3, check=False)
    seen = []
    for result in propagate_video(model64, video, {20: mask}, memory=2, batch_size=2, intensity_range=(0, 255)):
        seen.append(result.index)
        assert len(video.reader._cache) <= 3
        if len(seen) == 3:
            assert video.stats["decoded"] < 20  # not the whole video up front
    assert sorted(seen) == list(range(40)) and seen[0] == 20
    assert video.stats["decoded"] <= 4 * 40


def test_napari_lazy_tyx_layer_is_read_plane_by_plane(model64):
    """A TYX dask layer (e.g. a long video opened in napari) through the widget's PlaneStack and the core's
    propagate: planes are read when their turn comes, each about once, not the whole stack at once."""
    da = pytest.importorskip("dask.array")
    import dask

    from seggpt_plugins.napari._stack import PlaneStack

    frames, masks = moving_scene(n=24)
    reads = []

    def read(i):
        reads.append(i)
        return frames[i, ..., 0]

    layer = da.stack([da.from_delayed(dask.delayed(read)(i), frames.shape[1:3], np.uint8) for i in range(24)])
    planes = PlaneStack(layer, leading=1, axis=0, position=(0,))
    predictions = model64.propagate(planes, annotations={12: masks[12]}, memory=2, batch_size=2,
                                    intensity_range=(0.0, 255.0))
    next(predictions)
    assert len(reads) <= 4  # the first plane (its size), the annotated one, one batch of the two runs
    done = 1 + sum(1 for _ in predictions)
    assert done == 23 and sorted(set(reads)) == list(range(24)) and len(reads) <= 24 + 2


def touching_discs(n=6, h=48, w=64):
    """A stack annotated on frame 0 with two discs apart (ids 1, 2) and predicted frames where they overlap,
    painted as one id, with a 9 px fragment apart: (stack (N, H, W) uint8, annotation, [Predictions of 1..])."""
    from seggpt_plugins.prediction import Prediction

    yy, xx = np.mgrid[:h, :w]
    stack, labels = np.zeros((n, h, w), np.uint8), np.zeros((n, h, w), np.uint8)
    for t in range(n):
        for k, cx in enumerate((22 + t, 42 - t), 1):
            disc = (yy - 24) ** 2 + (xx - cx) ** 2 < 10 ** 2
            stack[t][disc], labels[t][disc] = 200, k if t == 0 else 1
        if t:
            labels[t, 2:5, 2:5] = 1
    predictions = [Prediction(labels[t].copy(), np.full((h, w), 0.9, np.float32), index=t) for t in range(1, n)]
    return stack, labels[0], predictions


class ScriptedModel:
    """`propagate` yields the same predicted frames whoever calls it (copies: hosts rewrite their index)."""

    def __init__(self, predictions):
        self.predictions = predictions

    def propagate(self, frames, *args, **options):
        from dataclasses import replace

        return (replace(p, labels=p.labels.copy()) for p in self.predictions)


def napari_propagate(model, stack, annotation):
    """Objects of napari's 'Propagate through stack' (Output instances) work function, {frame: id map}."""
    from types import SimpleNamespace

    from napari.layers import Image as ImageLayer
    from napari.layers import Labels

    from seggpt_plugins.napari._actions import Actions, FormValues

    examples = np.zeros_like(stack)
    examples[0] = annotation
    viewer = SimpleNamespace(dims=SimpleNamespace(point=(0.0, 0.0, 0.0), ndim=3, axis_labels=("0", "1", "2")))
    form = FormValues(image=ImageLayer(stack, contrast_limits=(0, 255)), labels=Labels(examples), axis=0,
                      targets=[], deselected=set(), num_prompts=3, batch_size=1, seg_type="instance",
                      output="instances", ensemble="feature", memory=4, tile=None, halo=32)
    return {key[0]: pred.labels for _, key, pred in Actions(viewer, form).propagate().work(model)}


def test_every_host_finds_a_propagations_objects_by_the_one_rule(tmp_path, monkeypatch):
    """The same propagated frames give the same objects in `seggpt propagate --output instances`,
    `propagate_video` (FiftyOne's videos) and napari's Propagate, each frame's through `Prediction.objects`
    with the host's rule: the CLI's options (--min-area 4 keeps the fragment; split_touching off, as
    FiftyOne: the discs stay one object) and napari's (touching objects split: BENCHMARKS.md section 18)."""
    pytest.importorskip("napari")
    import seggpt_plugins.cli.propagate as cli_propagate
    from seggpt_plugins.instances import ObjectRule
    from seggpt_plugins.napari._actions import OBJECTS as NAPARI
    from seggpt_plugins.prediction import Prediction

    stack, annotation, predictions = touching_discs()
    model = ScriptedModel(predictions)
    rules, objects = [], Prediction.objects

    def spy(self, rule=ObjectRule()):
        rules.append(rule)
        return objects(self, rule)

    monkeypatch.setattr(Prediction, "objects", spy)
    monkeypatch.setattr(cli_propagate, "load_model", lambda args: model)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    tifffile.imwrite(tmp_path / "z0.tif", annotation)

    def cli(*options):
        out = tmp_path / f"cli{''.join(options)}.tif"
        assert main(["propagate", str(tmp_path / "stack.tif"), "--prompt-slice", "0", str(tmp_path / "z0.tif"),
                     "--out", str(out), "--model", "demo", "--output", "instances", *options]) == 0
        return dict(enumerate(tifffile.imread(out)))

    def video(rule):
        with open_frames(tmp_path / "stack.tif") as frames:
            return {r.index: r.instances.map for r in propagate_video(model, frames, {0: annotation}, objects=rule)}

    def by(rule, host):
        rules.clear()
        found = host()
        assert rules == [rule] * len(predictions)  # every predicted frame, by this rule
        return found

    small = ObjectRule(min_area=4)
    runs = {"cli": by(small, lambda: cli("--min-area", "4")), "video": by(small, lambda: video(small)),
            "cli split": by(NAPARI, lambda: cli("--split-touching")), "video split": by(NAPARI, lambda: video(NAPARI))}
    runs["napari"] = by(NAPARI, lambda: napari_propagate(model, stack, annotation))
    assert NAPARI == ObjectRule(split_touching=True)
    for z in range(1, len(stack)):
        assert np.array_equal(runs["cli"][z], runs["video"][z])
        assert np.array_equal(runs["cli split"][z], runs["video split"][z])
        assert np.array_equal(runs["cli split"][z], runs["napari"][z])
        assert len(np.unique(runs["cli"][z])) == 3 and runs["cli"][z][3, 3]  # the discs as one, the fragment
        assert set(np.unique(runs["napari"][z])) == {0, 1, 2}  # the discs apart, each its own id; no fragment


# ------------------------------------------------------------------------------------------ the CLI


def test_propagate_a_video_through_the_cli(clip, scene):
    """Frame count and order, the annotated frame untouched, each object's id kept, COCO, review, overlay."""
    av = pytest.importorskip("av")
    video, mask = clip
    out = video.parent / "out"
    result = subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "propagate", str(video), "--prompt-frame",
                             "6", str(mask), "--out", str(out), "--model", "demo", "--memory", "2", "--output",
                             "instances", "--format", "png", "coco", "--review", "--overlay"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    truth = scene[1]
    maps = [np.asarray(Image.open(out / f"{i:06d}_instances.png")) for i in range(12)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i:06d}_instances.png" for i in range(12)] + ["coco.json", "review.jsonl", "overlay.mp4"])
    assert np.array_equal(maps[6], truth[6])  # the annotated frame is the user's mask
    for i, found in enumerate(maps):
        assert {0, 1, 2} <= set(np.unique(found))
        extra = np.isin(found, (0, 1, 2), invert=True)  # a fragment cut off a disk (seen: 16 px, one frame)
        assert extra.sum() < 0.1 * min((truth[i] == k).sum() for k in (1, 2))
        for k in (1, 2):  # each disk keeps its id, on this frame and not on one 4 frames away
            assert iou(found == k, truth[i] == k) > 0.6
            assert iou(found == k, truth[i] == k) > iou(found == k, truth[(i + 4) % 12] == k)
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(f"clip.mp4#frame{i}" for i in range(12))
    rows = [json.loads(line) for line in (out / "review.jsonl").read_text().splitlines()]
    assert sorted(r["frame"] for r in rows) == list(range(12))
    assert [r["annotated"] for r in rows if r["frame"] == 6] == [True]
    with av.open(str(out / "overlay.mp4")) as overlay:
        stream = overlay.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 25
        assert sum(1 for _ in overlay.decode(stream)) == 12


def test_propagate_a_gif_with_start_stop_every(tmp_path, scene, capsys):
    frames, masks = scene
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(tmp_path / "anim.gif", save_all=True, append_images=pictures[1:], duration=40, loop=0)
    Image.fromarray(masks[4]).save(tmp_path / "m4.png")
    out = tmp_path / "out"
    assert main(["propagate", str(tmp_path / "anim.gif"), "--prompt-frame", "4", str(tmp_path / "m4.png"),
                 "--out", str(out), "--model", "demo", "--memory", "1", "--start", "2", "--stop", "9", "--every", "2",
                 "--format", "png"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}_labels.png" for i in (2, 4, 6, 8)]
    assert np.array_equal(np.asarray(Image.open(out / "000004_labels.png")), masks[4])
    assert "4 frames' labels" in capsys.readouterr().out


@pytest.mark.parametrize("output, mask_dtype, dtype", [("labels", np.uint16, np.uint8),
                                                       ("instances", np.uint8, np.uint16)])
def test_the_annotated_frame_is_written_in_the_dtype_of_the_predicted_ones(tmp_path, scene, output, mask_dtype,
                                                                          dtype):
    """One dtype per run (README): labels the smallest for the prompts' largest id, objects uint16, whatever
    the annotation's own dtype (a 16-bit TIFF from Fiji, an 8-bit PNG)."""
    frames, masks = scene
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(frames[i]).save(folder / f"f{i}.png")
    tifffile.imwrite(tmp_path / "m1.tif", masks[1].astype(mask_dtype))
    out = tmp_path / "out"
    assert main(["propagate", str(folder), "--prompt-frame", "1", str(tmp_path / "m1.tif"), "--out", str(out),
                 "--model", "demo", "--memory", "1", "--output", output, "--format", "png", "tiff"]) == 0
    maps = {p.name: tifffile.imread(p) if p.suffix == ".tif" else np.asarray(Image.open(p)) for p in out.iterdir()}
    assert len(maps) == 8 and {m.dtype for m in maps.values()} == {np.dtype(dtype)}
    assert np.array_equal(maps[f"000001_{output}.tif"], masks[1])  # the annotated frame's ids are kept


# ------------------------------------------------------------------------------------------ bad input


def _fails(args, message, capsys, out=None):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    if out is not None:
        assert not out.exists() or not any(out.iterdir())  # no partial output


def test_bad_videos_are_one_line_errors_naming_the_file(tmp_path, scene, capsys):
    pytest.importorskip("av")
    frames, masks = scene
    Image.fromarray(masks[0]).save(tmp_path / "m0.png")
    out = tmp_path / "out"
    run = ["propagate", None, "--prompt-frame", 0, tmp_path / "m0.png", "--out", out, "--model", "demo"]

    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    _fails([*run[:1], tmp_path / "junk.mp4", *run[2:]], "junk.mp4: not a readable video", capsys, out)

    whole = encode(tmp_path / "whole.mkv", moving_scene(n=60)[0]).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(whole[:len(whole) // 2])
    _fails([*run[:1], tmp_path / "cut.mkv", *run[2:]], "cut.mkv: truncated or corrupt", capsys, out)

    mp4 = encode(tmp_path / "whole.mp4", frames).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[:len(mp4) // 2])
    _fails([*run[:1], tmp_path / "cut.mp4", *run[2:]], "cut.mp4: not a readable video", capsys, out)

    avi = encode(tmp_path / "ok.avi", frames, codec="mpeg4").read_bytes()
    (tmp_path / "odd.avi").write_bytes(avi.replace(b"FMP4", b"ZQZQ"))  # a codec tag FFmpeg has no decoder for
    _fails([*run[:1], tmp_path / "odd.avi", *run[2:]], "odd.avi: its video codec cannot be decoded", capsys, out)


def test_bad_prompts_and_options_fail_before_the_model_loads(clip, tmp_path, capsys):
    video, mask = clip
    out = tmp_path / "out"
    base = ["propagate", video, "--out", out, "--model", "/no/model/here"]  # the model is never reached
    _fails([*base, "--prompt-frame", 12, mask], "--prompt-frame 12", capsys, out)
    _fails([*base, "--prompt-frame", 12, mask], "past the end of", capsys, out)
    _fails([*base, "--prompt-frame", 6, mask, "--every", 4], "frame 6 is not among the chosen frames", capsys, out)
    _fails([*base, "--prompt-frame", "six", mask], "frame index must be an integer", capsys, out)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "small.png")
    _fails([*base, "--prompt-frame", 6, tmp_path / "small.png"], "a label mask of 96x80 (width x height) is needed",
           capsys, out)
    _fails([*base, "--prompt-slice", 6, mask], "--prompt-slice is for TIFF stacks", capsys, out)
    _fails([*base, "--prompt-frame", 6, mask, "--every", 0], "--every must be >= 1", capsys, out)
    _fails(["propagate", tmp_path / "none.mp4", "--prompt-frame", 0, mask, "--out", out], "no such file", capsys, out)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((4, 32, 32), np.uint8))
    _fails(["propagate", tmp_path / "stack.tif", "--prompt-slice", 0, mask, "--out", tmp_path / "o.tif", "--every",
            2], "--every: for frames", capsys)


def test_a_frame_failing_mid_run_leaves_no_partial_output(tmp_path, scene, capsys):
    """The folder's headers are fine, frame 3's data is cut: the run stops there and writes nothing."""
    frames, masks = scene
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(frames[i]).save(folder / f"{i:03d}.png")
    data = (folder / "003.png").read_bytes()
    (folder / "003.png").write_bytes(data[:len(data) // 3])
    Image.fromarray(masks[0]).save(tmp_path / "m0.png")
    out = tmp_path / "out"
    _fails(["propagate", folder, "--prompt-frame", 0, tmp_path / "m0.png", "--out", out, "--model", "demo",
            "--memory", "1", "--overlay"], "003.png: not a readable image", capsys)
    assert not out.exists() or not any(out.iterdir())


def test_without_pyav_the_message_says_what_to_install(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(InputError, match=r'pip install "seggpt-plugins\[video\]"'):
        open_frames(clip[0])
