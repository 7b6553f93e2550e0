"""The `seggpt` command line, end to end on real files."""

import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from seggpt_plugins.cli import main


def seggpt(*args):
    return subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", *map(str, args)], capture_output=True, text=True)


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys; from seggpt_plugins.cli import build_parser; build_parser().format_help(); "
            "import seggpt_plugins; seggpt_plugins.__all__; "
            "print(sorted(m for m in ('torch', 'transformers', 'napari', 'fiftyone', 'flask') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert seggpt("--help").returncode == 0


@pytest.fixture
def tiles(tmp_path, nuclei2d):
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    paths = {}
    for name, (r, c) in {"prompt": (0, 0), "a": (128, 128), "b": (256, 384)}.items():
        Image.fromarray(scaled[r:r + 128, c:c + 128]).save(tmp_path / f"{name}.png")
        Image.fromarray(((truth[r:r + 128, c:c + 128] > 0) * 2).astype(np.uint8)).save(tmp_path / f"{name}_mask.png")
        paths[name] = tmp_path / f"{name}.png"
    return tmp_path, paths


def test_segment_writes_label_pngs_and_overlays(tiles):
    folder, paths = tiles
    out = folder / "out"
    result = seggpt("segment", "--model", "demo", "--prompt", paths["prompt"], folder / "prompt_mask.png",
                    paths["a"], paths["b"], "--out", out, "--overlay", "--scores")
    assert result.returncode == 0, result.stderr
    for name in ("a", "b"):
        labels = np.asarray(Image.open(out / f"{name}_labels.png"))
        truth = np.asarray(Image.open(folder / f"{name}_mask.png"))
        assert labels.shape == (128, 128) and set(np.unique(labels)) <= {0, 2}
        iou = np.logical_and(labels > 0, truth > 0).sum() / np.logical_or(labels > 0, truth > 0).sum()
        assert iou > 0.5  # a real segmentation of real nuclei
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == (128, 128, 3)
        assert tifffile.imread(out / f"{name}_scores.tif").dtype == np.float32
    again = seggpt("segment", "--model", "demo", "--prompt", paths["prompt"], folder / "prompt_mask.png",
                   paths["a"], "--out", out)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert not list(out.glob(".*part"))


@pytest.mark.parametrize("args, message", [
    (["segment", "x.png", "--out", "o"], "at least one --prompt"),
    (["segment", "--prompt", "nope.png", "nope_mask.png", "x.png", "--out", "o", "--model", "demo"], "no such file"),
    (["propagate", "nope.tif", "--out", "o.tif", "--model", "demo"], "no such file"),
    (["segment", "--prompt", "a", "b", "t.png", "--out", "o", "--model", "/no/model/here"], "no such file"),
])
def test_bad_input_is_a_clear_message_not_a_traceback(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_propagate_a_tiff_stack(tmp_path, nuclei3d):
    stack, truth = nuclei3d
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    tifffile.imwrite(tmp_path / "z15.tif", truth[15])
    result = seggpt("propagate", tmp_path / "stack.tif", "--prompt-slice", 15, tmp_path / "z15.tif",
                    "--out", tmp_path / "labels.tif", "--model", "demo", "--memory", 2, "--batch-size", 4)
    assert result.returncode == 0, result.stderr
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == stack.shape
    assert np.array_equal(labels[15], truth[15])  # the annotated slice is the user's, untouched
    assert set(np.unique(labels)) <= set(np.unique(truth[15]))  # only the prompt's ids
    assert all(labels[z].any() for z in range(stack.shape[0]))
    joined = re.search(r"(\d+) of 30 predicted slices joined the memory", result.stdout)  # what it took in
    assert joined and (int(joined[1]) == 30 or "kept out of it (no drift)" in result.stdout), result.stdout


def test_demo_command(tmp_path):
    result = seggpt("demo", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    overlay = np.asarray(Image.open(tmp_path / "demo" / "demo_overlay.png"))
    assert overlay.shape[0] == 256 and overlay.shape[2] == 3
    assert "IoU against ground truth" in result.stdout
    assert seggpt("demo", "--out", tmp_path / "demo").returncode == 2  # no silent overwrite
    assert seggpt("demo", "--out", tmp_path / "demo", "--overwrite").returncode == 0


def test_bad_options_and_broken_examples_are_refused_before_the_model_loads(tiles, capsys, monkeypatch):
    """An intensity range that is no range, a target read as an option's value, a file that is no tuned prompt
    and an example image cut short: each a one-line error, and the model never loads."""
    folder, paths = tiles
    monkeypatch.chdir(folder)
    example = ["--model", "demo", "--prompt", paths["prompt"], folder / "prompt_mask.png"]
    for args, message in [
            (["--intensity-range", "100", "10", paths["a"]], "--intensity-range: LOW must be below HIGH, got 100 10"),
            (["--intensity-range", "nan", "1", paths["a"]], "LOW and HIGH must be finite numbers"),
            (["--format", "tiff", paths["a"]], f"--format: invalid choice: '{paths['a']}'"),
            (["--tile", "64", paths["a"]], f"--tile: '{paths['a']}' is not a tile size")]:
        with pytest.raises(SystemExit) as exit_:
            main(list(map(str, ["segment", *example, "--out", "o", *args])))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err
    (folder / "tuned.pt").write_text("not a tuned prompt")
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 64)
    tifffile.imwrite(folder / "whole.tif", np.asarray(Image.open(paths["prompt"])))
    (folder / "cut.tif").write_bytes((folder / "whole.tif").read_bytes()[:4000])  # its header reads well
    for args, message in [
            (["--model", "demo", "--tuned-prompt", "tuned.pt"], "tuned.pt: not a tuned prompt (a .safetensors file"),
            (["--model", "demo", "--tuned-prompt", "garbage.safetensors"], "garbage.safetensors: cannot read a tuned"),
            (["--model", "demo", "--prompt", "cut.tif", folder / "prompt_mask.png"], "cut.tif: not a readable TIFF")]:
        assert main(list(map(str, ["segment", *args, paths["a"], "--out", "o"]))) == 2
        err = capsys.readouterr().err
        assert message in err and "loaded SegGPT" not in err and "Traceback" not in err
    assert not (folder / "o").exists()


def test_skip_existing_redoes_targets_whose_overlay_or_scores_are_missing(tiles, capsys):
    folder, paths = tiles
    args = list(map(str, ["segment", "--model", "demo", "--prompt", paths["prompt"], folder / "prompt_mask.png",
                          paths["a"], paths["b"], "--out", folder / "out", "--skip-existing"]))
    assert main(args) == 0 and not list((folder / "out").glob("*_overlay.png"))
    assert main([*args, "--overlay"]) == 2  # the labels are there: redoing a target replaces them
    assert "a_labels.png: exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overlay", "--overwrite"]) == 0
    assert sorted(p.name for p in (folder / "out").glob("*_overlay.png")) == ["a_overlay.png", "b_overlay.png"]
    assert main([*args, "--overlay"]) == 0 and "skipping 2 target(s)" in capsys.readouterr().err


def test_a_tiff_stack_cut_short_is_one_line(tmp_path, nuclei3d):
    stack, truth = nuclei3d
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    tifffile.imwrite(tmp_path / "mask.tif", (truth[15] > 0).astype(np.uint8))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "stack.tif").read_bytes()[:20000])
    result = seggpt("propagate", "--model", "demo", tmp_path / "cut.tif", "--prompt-slice", 15, tmp_path / "mask.tif",
                    "--out", tmp_path / "out.tif")
    assert result.returncode == 2 and "not a readable TIFF" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # (tifffile's own log line kept quiet)


def test_training_and_other_commands_refuse_bad_numbers_and_files_in_one_line(tmp_path, nuclei3d, capsys,
                                                                             monkeypatch):
    """What a second review of the other commands found: each a one-line error before the model loads (and
    tune-prompt writes nothing)."""
    monkeypatch.chdir(tmp_path)
    stack, truth = nuclei3d
    tifffile.imwrite("stack.tif", stack)
    tifffile.imwrite("z10.tif", (truth[10] > 0).astype(np.uint8))
    for folder in ("data", "bad"):
        for sub in ("images", "masks"):
            (tmp_path / folder / sub).mkdir(parents=True)
        tifffile.imwrite(tmp_path / folder / "images" / "t0.tif", stack[10])
        tifffile.imwrite(tmp_path / folder / "masks" / "t0.tif",
                         (truth[10, :32 if folder == "bad" else None] > 0).astype(np.uint8))  # bad: half its rows
    (tmp_path / "not_weights.pth").write_bytes(b"II*\x00" + bytes(200))
    for args, message in [
            (["tune-prompt", "--model", "demo", "--data", "data", "--out", "t.safetensors", "--steps", "0"],
             "--steps must be >= 1, got 0"),
            (["tune-prompt", "--model", "demo", "--data", "data", "--out", "t.safetensors", "--lr", "-5"],
             "--lr must be positive, got -5"),
            (["tune-prompt", "--model", "demo", "--data", "bad", "--out", "t.safetensors", "--steps", "1"],
             "bad/images/t0.tif, mask bad/masks/t0.tif: mask size"),
            (["finetune", "--model", "demo", "--data", "data", "--out", "ft", "--variant", "v2"],
             "--variant v2 names a kind of generated task: not with --data"),
            (["finetune", "--model", "demo", "--data", "data", "--out", "ft", "--batch-size", "0"],
             "--batch-size must be >= 1"),
            (["evaluate", "--model", "demo", "--tasks", "0"], "--tasks must be >= 1, got 0"),
            (["propagate", "stack.tif", "--prompt-slice", "10", "z10.tif", "--prompt-slice", "10", "z10.tif",
              "--out", "o.tif", "--model", "demo"], "--prompt-slice 10: given twice"),
            (["convert", "not_weights.pth", "cv"], "not_weights.pth: not a checkpoint of weights")]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "loaded SegGPT" not in err, err
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "o.tif").exists()
