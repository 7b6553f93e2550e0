"""SegGPT.adapt and `seggpt adapt`: a model fine-tuned on a few labelled examples, with a held-out square for
early stopping, saved as a model directory with a new fingerprint."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

from .conftest import SAMPLES, random_net


def scene(seed: int, size: int = 64):
    """Bright disks on a dark noisy background (uint8) and their mask (0/1)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 10, (size, size))
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(6):
        cy, cx = rng.integers(6, size - 6, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(4, 8)) ** 2
        image[disk] += 150
        mask[disk] = 1
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def base():
    from seggpt_plugins import SegGPT

    return SegGPT(random_net(seed=1, image_size=[128, 64], patch_size=8, pretrain_image_size=64), device="cpu")


@pytest.fixture(scope="module")
def adapted_run(base):
    """One run on the tiny random net, cancelled at the first evaluation worse than the best one after the
    held-out IoU rose above 0: its last weights are not its best."""
    from seggpt_plugins.adapt import AdaptSettings

    image, mask = scene(0)
    seen = []

    def worse_than_best() -> bool:
        scored = [p for p in seen if p.held_out_iou is not None]
        return bool(scored) and scored[-1].best_iou > 0 and scored[-1].held_out_iou < scored[-1].best_iou

    settings = AdaptSettings(lr=1e-2, eval_every=5, patience=100, warmup=5, batch_size=8)
    adapted = base.adapt([image], [mask], time_limit=None, steps=150, settings=settings, progress=seen.append,
                         cancel=worse_than_best)
    return adapted, seen, (image, mask)


def test_adapt_keeps_the_best_held_out_state(adapted_run):
    from seggpt_plugins.adapt import held_out_iou, read_examples, split_examples

    adapted, seen, (image, mask) = adapted_run
    info = adapted.adaptation
    assert info["stopped"] == "cancelled" and info["improved"]
    scores = [p.held_out_iou for p in seen if p.held_out_iou is not None]
    assert scores[-1] < max(scores)  # the run ended on weights worse than its best
    assert info["held_out_iou_best"] == pytest.approx(max(scores), abs=1e-4)
    assert info["held_out_iou_best"] > info["held_out_iou_before"]
    regions, held = split_examples(read_examples([image], [mask]))
    assert held_out_iou(adapted, regions, held, np.array([1])) == pytest.approx(max(scores), abs=1e-4)
    assert info["steps"] == seen[-1].step and info["best_step"] < info["steps"]


def test_adapted_model_saves_loads_back_with_a_new_fingerprint(adapted_run, base, tmp_path):
    from seggpt_plugins import InputError, SegGPT

    adapted, _, (image, mask) = adapted_run
    assert adapted.fingerprint != base.fingerprint
    assert base.fingerprint == SegGPT(random_net(seed=1, image_size=[128, 64], patch_size=8,
                                                 pretrain_image_size=64), device="cpu").fingerprint  # base untouched
    out = adapted.save_pretrained(tmp_path / "adapted")
    loaded = SegGPT.from_pretrained(out, device="cpu")
    assert loaded.fingerprint == adapted.fingerprint
    assert json.loads((out / "adaptation.json").read_text())["fingerprint"] == adapted.fingerprint
    assert not (out / "quality.json").exists()  # its base (built in memory) had no estimate fitted for it
    target, _ = scene(5)
    assert np.array_equal(loaded.segment(target, image, mask, quality=None)[0].labels,
                          adapted.segment(target, image, mask, quality=None)[0].labels)
    with pytest.raises(InputError, match="exists and is not empty"):
        adapted.save_pretrained(out)


def test_adapt_stops_at_the_time_limit_and_the_step_cap(base, monkeypatch):
    import seggpt_plugins.adapt as adapt_module
    from seggpt_plugins.adapt import AdaptSettings

    class Clock:  # every reading 1 s later: the limit is met after a known number of readings
        now = 0.0

        @classmethod
        def monotonic(cls):
            cls.now += 1.0
            return cls.now

    monkeypatch.setattr(adapt_module, "time", Clock)
    image, mask = scene(0)
    settings = AdaptSettings(eval_every=100, batch_size=2)
    timed = base.adapt([image], [mask], time_limit=12, steps=100, settings=settings)
    assert timed.adaptation["stopped"] == "time_limit"
    assert 0 < timed.adaptation["steps"] < 10
    # the steps it ran were scored once at the end, past the limit, not thrown away unscored
    assert [h["step"] for h in timed.adaptation["history"]] == [0, timed.adaptation["steps"]]
    capped = base.adapt([image], [mask], time_limit=None, steps=3, settings=settings)
    assert capped.adaptation["stopped"] == "steps" and capped.adaptation["steps"] == 3


def test_adapt_cancel_stops_between_steps(base):
    from seggpt_plugins.adapt import AdaptSettings

    image, mask = scene(0)
    calls = []
    adapted = base.adapt([image], [mask], time_limit=None, steps=50, settings=AdaptSettings(batch_size=2),
                         cancel=lambda: calls.append(1) or len(calls) > 2)
    assert adapted.adaptation["stopped"] == "cancelled" and adapted.adaptation["steps"] == 2


def test_a_balanced_foreground_weight_is_read_from_the_training_regions(base):
    from seggpt_plugins import InputError
    from seggpt_plugins.adapt import AdaptSettings, balanced_foreground_weight

    quarter = np.zeros((8, 8), np.uint8)
    quarter[:4, :4] = 1  # a quarter foreground: 3 background pixels per foreground pixel
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert balanced_foreground_weight([(rgb, quarter)]) == pytest.approx(3.0)
    assert balanced_foreground_weight([(rgb, quarter), (rgb, np.zeros_like(quarter))]) == pytest.approx(7.0)
    assert balanced_foreground_weight([(rgb, np.ones_like(quarter))]) == 1.0  # clipped
    assert balanced_foreground_weight([(rgb, np.zeros_like(quarter))]) == 10.0  # nothing to balance
    image, mask = scene(0)
    capped = base.adapt([image], [mask], time_limit=None, steps=1,
                        settings=AdaptSettings(batch_size=2, foreground_weight="balanced"))
    assert 1.0 <= capped.adaptation["foreground_weight"] <= 10.0
    assert capped.adaptation["settings"]["foreground_weight"] == "balanced"
    with pytest.raises(InputError, match="foreground weight must be a positive number or 'balanced', got 'heavy'"):
        base.adapt([image], [mask], settings=AdaptSettings(foreground_weight="heavy"))


def test_adapt_refuses_bad_examples(base):
    from seggpt_plugins import InputError

    image, mask = scene(0)
    with pytest.raises(InputError, match="differs from its image size"):
        base.adapt([image], [mask[:32]])
    with pytest.raises(InputError, match="all background"):
        base.adapt([image], [np.zeros_like(mask)])
    with pytest.raises(InputError, match="too small"):
        base.adapt([image[:10, :10]], [mask[:10, :10]])
    with pytest.raises(InputError, match="one mask per image"):
        base.adapt([image, image], [mask])


# ------------------------------------------------------------------------------------------------ CLI


def _run(argv, capsys):
    from seggpt_plugins.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture()
def example_files(tmp_path):
    from PIL import Image

    image, mask = scene(0)
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:32]).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(tmp_path / "empty.png")
    return tmp_path


@pytest.mark.parametrize("case, message", [
    ("missing", "nothere.png: no such file"),
    ("size", "small_mask.png): mask size 64x32 differs from its image size 64x64"),
    ("empty", "all background"),
    ("exists", "exists and is not empty; pass --overwrite"),
    ("steps", "--steps must be >= 1"),
    ("weight", "--foreground-weight must be a positive number or 'balanced', got '0'"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(example_files, capsys, case, message):
    d = example_files
    mask = {"size": "small_mask.png", "empty": "empty.png", "missing": "nothere.png"}.get(case, "mask.png")
    out = d / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    argv = ["adapt", "--model", str(d / "no_such_model"), "--prompt", str(d / "image.png"), str(d / mask),
            "--out", str(out), "--time-limit", "5"] + {"steps": ["--steps", "0"],
                                                       "weight": ["--foreground-weight", "0"]}.get(case, [])
    code, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err  # the prompt's error, not the (missing) model's
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"


def test_cli_adapts_the_demo_model_and_every_model_option_loads_it(tmp_path, capsys):
    """A few steps of the demo model on a real nuclei tile: the saved model loads through --model (seggpt
    segment), with a new fingerprint when a step beat the base weights on the held-out square, else the base's.
    Without --lr and --foreground-weight the command trains as the core's AdaptSettings does."""
    import tifffile
    from PIL import Image

    from seggpt_plugins import SegGPT

    image, truth = tifffile.imread(SAMPLES / "nuclei2d.tif"), tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    tifffile.imwrite(tmp_path / "tile.tif", image[:128, :128])
    tifffile.imwrite(tmp_path / "tile_mask.tif", truth[:128, :128])
    tifffile.imwrite(tmp_path / "target.tif", image[128:256, 128:256])
    out = tmp_path / "adapted"
    code, err = _run(["adapt", "--model", "demo", "--prompt", str(tmp_path / "tile.tif"),
                      str(tmp_path / "tile_mask.tif"), "--out", str(out), "--steps", "6", "--eval-every", "2",
                      "--batch-size", "2", "--time-limit", "600"], capsys)
    assert code == 0, err
    info = json.loads((out / "adaptation.json").read_text())
    from seggpt_plugins.adapt import AdaptSettings

    assert (info["settings"]["lr"], info["settings"]["foreground_weight"]) == (AdaptSettings.lr, "balanced")
    assert info["steps"] <= 6 and len(info["history"]) >= 2
    assert re.search(rf"adapting: .*\| {info['steps']}/6 \[", err)  # a progress bar per step
    assert (info["held_out_iou_best"] > info["held_out_iou_before"]) == info["improved"]
    loaded = SegGPT.from_pretrained(out, device="cpu")
    base_fingerprint = SegGPT.from_pretrained("demo", device="cpu").fingerprint
    assert loaded.fingerprint == info["fingerprint"] and info["base_fingerprint"] == base_fingerprint
    assert (loaded.fingerprint != base_fingerprint) == info["improved"]  # six steps need not beat the base
    # it carries the demo model's fitted quality estimate, saying whose it is: no uncalibrated warning
    from seggpt_plugins.quality import SHIPPED, UncalibratedQualityWarning, load_models

    carried = json.loads((out / "quality.json").read_text())
    assert carried["fitted_on"].startswith("inherited from demo") and "fit-quality" in carried["fitted_on"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedQualityWarning)
        assert loaded.quality_models().keys() == load_models(SHIPPED).keys()
    assert loaded.quality_models()["fast"].as_dict() == load_models(SHIPPED)["fast"].as_dict()
    code, err = _run(["segment", "--model", str(out), "--prompt", str(tmp_path / "tile.tif"),
                      str(tmp_path / "tile_mask.tif"), str(tmp_path / "target.tif"), "--out", str(tmp_path / "seg")],
                     capsys)
    assert code == 0, err
    written = list((tmp_path / "seg").glob("*.png"))
    assert written and np.asarray(Image.open(written[0])).shape == (128, 128)


# ------------------------------------------------------------------------------ helpers of the host apps


def test_adapt_reads_the_paintings_with_the_margin_its_held_out_square_prefers(nuclei2d):
    """The demo's weights read with no foreground margin paint a halo around real nuclei: adapting without a
    single step (steps=0) with fit_margin still chooses the margin that reads the held-out square best, a new
    model; by default the base's margin is kept."""
    from seggpt_plugins import SegGPT
    from seggpt_plugins.adapt import MARGIN_GAIN, AdaptSettings
    from seggpt_plugins.adapted import summary_line
    from seggpt_plugins.loading import load_network

    image, truth = nuclei2d
    net = load_network("demo")
    net.config.foreground_margin = 0.0
    plain = SegGPT(net, device="cpu")
    assert plain.adapt([image[:128, :128]], [truth[:128, :128]], time_limit=None, steps=0).foreground_margin == 0
    adapted = plain.adapt([image[:128, :128]], [truth[:128, :128]], time_limit=None, steps=0,
                          settings=AdaptSettings(fit_margin=True))
    info = adapted.adaptation
    scores = {float(m): v for m, v in info["margin_held_out_iou"].items()}
    assert adapted.foreground_margin == info["foreground_margin"] > 0 and info["base_foreground_margin"] == 0
    assert scores[0.0] == info["held_out_iou_before"]  # the base weights at their own margin
    assert scores[adapted.foreground_margin] >= scores[0.0] + MARGIN_GAIN
    assert info["improved"] and adapted.fingerprint != plain.fingerprint and info["steps"] == 0
    assert summary_line(info, "1 tile").endswith(
        f"no step of 0 beat the weights, foreground margin 0 -> {adapted.foreground_margin:g})")


def test_adapt_steps_yields_the_progress_and_returns_the_model(base):
    from seggpt_plugins import InputError
    from seggpt_plugins.adapt import AdaptProgress, AdaptSettings
    from seggpt_plugins.adapted import adapt_steps

    image, mask = scene(0)
    steps = adapt_steps(base, [image], [mask], time_limit=None, steps=3, settings=AdaptSettings(batch_size=2))
    seen = []
    while True:
        try:
            seen.append(next(steps))
        except StopIteration as stop:
            adapted = stop.value
            break
    assert all(isinstance(p, AdaptProgress) for p in seen) and [p.step for p in seen][-1] == 3
    assert adapted.adaptation["steps"] == 3
    with pytest.raises(InputError, match="all background"):
        list(adapt_steps(base, [image], [np.zeros_like(mask)]))


def test_adapted_models_are_listed_newest_first_with_one_line_each(adapted_run, tmp_path, monkeypatch):
    import os

    from seggpt_plugins.adapted import adapted_models, adapted_models_dir, summary_line

    monkeypatch.setenv("SEGGPT_ADAPTED_DIR", str(tmp_path / "models"))
    assert adapted_models_dir() == tmp_path / "models" and adapted_models() == []
    adapted, _, _ = adapted_run
    older = adapted.save_pretrained(tmp_path / "models" / "older")
    newer = adapted.save_pretrained(tmp_path / "models" / "newer")
    os.utime(older / "adaptation.json", (1, 1))
    (tmp_path / "models" / "not-a-model").mkdir()
    assert [(path, info["fingerprint"]) for path, info in adapted_models()] == [
        (newer, adapted.fingerprint), (older, adapted.fingerprint)]
    info = adapted.adaptation
    assert summary_line(info, "1 example") == (
        f"Adapted to 1 example in {info['seconds']:.0f} s (held-out IoU {info['held_out_iou_before']:.2f} -> "
        f"{info['held_out_iou_best']:.2f} at step {info['best_step']} of {info['steps']})")
    assert "did not beat the model" in summary_line({**info, "improved": False}, "1 example")
