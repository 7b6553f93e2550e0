"""The CLI under bad input and faults (issue 12): no data loss, no traceback, checks before work, file modes."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def seggpt(*args, umask=None, env=None):
    return subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", *map(str, args)], capture_output=True,
                          text=True, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def folder(tmp_path, nuclei2d):
    """A prompt tile, its mask and two target tiles of real nuclei, as PNGs in one folder."""
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    for name, (r, c) in {"prompt": (0, 0), "a": (128, 128), "b": (256, 384)}.items():
        Image.fromarray(scaled[r:r + 128, c:c + 128]).save(tmp_path / f"{name}.png")
    Image.fromarray((truth[:128, :128] > 0).astype(np.uint8)).save(tmp_path / "prompt_mask.png")
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_clean_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_outputs_into_the_inputs_folder_never_replace_an_input(folder):
    before = snapshot(folder)
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", "--out", folder, "--overwrite", "--overlay")
    assert result.returncode == 0, result.stderr
    after = snapshot(folder)
    assert all(after[name] == data for name, data in before.items())  # every input byte for byte
    assert np.asarray(Image.open(folder / "a_labels.png")).shape == (128, 128)


def test_an_output_that_would_be_an_input_is_refused_before_work(folder):
    (folder / "a_labels.png").write_bytes((folder / "b.png").read_bytes())  # a target named like an output
    before = snapshot(folder)
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", folder / "a_labels.png", "--out", folder, "--overwrite")
    assert_clean_error(result, "a_labels.png", "is an input")
    assert "loaded SegGPT" not in result.stderr  # refused before the model loaded
    assert snapshot(folder) == before


@pytest.mark.parametrize("command", ["segment", "propagate", "demo"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_work(folder, command):
    blocker = folder / "a_file"
    blocker.write_text("not a folder")
    tifffile.imwrite(folder / "stack.tif", np.zeros((4, 32, 32), np.uint8))
    Image.fromarray(np.eye(32, dtype=np.uint8)).save(folder / "z1.png")
    args = {"segment": ["segment", "--prompt", folder / "prompt.png", folder / "prompt_mask.png", folder / "a.png",
                        "--out", blocker / "out"],
            "propagate": ["propagate", folder / "stack.tif", "--prompt-slice", 1, folder / "z1.png",
                          "--out", blocker / "out" / "labels.tif"],
            "demo": ["demo", "--out", blocker / "out"]}[command]
    result = seggpt(*args, "--model", "demo")
    assert_clean_error(result, "is a file")
    assert "loaded SegGPT" not in result.stderr


def test_out_naming_an_existing_file_is_refused(folder):
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", "--out", folder / "b.png")
    assert_clean_error(result, "b.png", "is a file")


@pytest.fixture
def stack(tmp_path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 255, (12, 40, 48), dtype=np.uint8))
    Image.fromarray(np.eye(40, 48, dtype=np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.eye(30, 48, dtype=np.uint8)).save(tmp_path / "small.png")
    return tmp_path


@pytest.mark.parametrize("slice_args, words", [
    ((50, "mask.png"), ["--prompt-slice 50", "12 slices"]),
    ((3, "small.png"), ["--prompt-slice 3", "48x40"]),
    ((3, "missing.png"), ["missing.png", "no such file"]),
])
def test_propagate_slices_are_checked_before_work(stack, slice_args, words):
    result = seggpt("propagate", stack / "stack.tif", "--prompt-slice", slice_args[0], stack / slice_args[1],
                    "--out", stack / "labels.tif", "--model", "demo")
    assert_clean_error(result, *words)
    assert "loaded SegGPT" not in result.stderr and not (stack / "labels.tif").exists()


@pytest.mark.parametrize("flag, value", [("--batch-size", 0), ("--memory", -1), ("--max-prompts", 0)])
def test_numbers_are_checked_before_work(stack, flag, value):
    result = seggpt("propagate", stack / "stack.tif", "--prompt-slice", 3, stack / "mask.png",
                    "--out", stack / "labels.tif", "--model", "demo", flag, value)
    assert_clean_error(result, flag)


def test_a_second_demo_refuses_before_computing(tmp_path):
    assert seggpt("demo", "--out", tmp_path).returncode == 0
    again = seggpt("demo", "--out", tmp_path)
    assert_clean_error(again, "exists")
    assert "loaded SegGPT" not in again.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(folder, umask):
    out = folder / "out"
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", "--out", out, "--scores", umask=umask)
    assert result.returncode == 0, result.stderr
    for path in (out / "a_labels.png", out / "a_scores.tif"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_default_model_is_one_rule_and_offline_fails_fast_with_one_line(folder):
    """No --model: $SEGGPT_MODEL, else the hub weights if cached, else the demo model with a one-line notice."""
    home = folder / "hf"  # an empty Hugging Face cache
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "SEGGPT_MODEL": ""}
    result = seggpt("segment", "--prompt", folder / "prompt.png", folder / "prompt_mask.png", folder / "a.png",
                    "--out", folder / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert "seggpt: warning: using the small demo model" in result.stderr and "warnings.warn" not in result.stderr
    assert "source='demo'" in result.stderr
    hub = seggpt("segment", "--model", "BAAI/seggpt-vit-large", "--prompt", folder / "prompt.png",
                 folder / "prompt_mask.png", folder / "a.png", "--out", folder / "out2", env=env)
    assert_clean_error(hub, "offline", "--model demo")


def test_normal_runs_are_quiet(folder):
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", "--out", folder / "out")
    assert result.returncode == 0 and "Loading weights" not in result.stderr


def test_palette_images_are_segmented_as_what_they_show(folder):
    """A mode-P PNG is read as its RGB colours, not as palette indices; masks keep their indices."""
    grey = Image.open(folder / "a.png")
    grey.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(folder / "a_palette.png")
    assert Image.open(folder / "a_palette.png").mode == "P"
    assert np.array_equal(np.asarray(Image.open(folder / "a_palette.png").convert("L")), np.asarray(grey))
    result = seggpt("segment", "--model", "demo", "--prompt", folder / "prompt.png", folder / "prompt_mask.png",
                    folder / "a.png", folder / "a_palette.png", "--out", folder / "out")
    assert result.returncode == 0, result.stderr
    plain = np.asarray(Image.open(folder / "out" / "a_labels.png"))
    palette = np.asarray(Image.open(folder / "out" / "a_palette_labels.png"))
    assert np.array_equal(plain, palette) and plain.any()


def test_palette_masks_keep_their_label_ids(tmp_path):
    from seggpt_plugins.images import to_mask, to_rgb8

    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 7
    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0] * 7 + [255, 0, 0] + [0, 0, 0] * 248)
    image.save(tmp_path / "mask.png")
    assert np.array_equal(to_mask(tmp_path / "mask.png"), labels)
    assert to_rgb8(tmp_path / "mask.png")[3, 3].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied_to_images(tmp_path):
    from seggpt_plugins.images import decode_image, read_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "rotated.jpg")
    assert shown.shape == (40, 20, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50
    assert np.array_equal(decode_image((tmp_path / "rotated.jpg").read_bytes()), shown)


def test_licences_ship_with_the_repository_and_the_sample_data():
    assert "MIT" in (ROOT / "LICENSE").read_text()
    samples = ROOT / "seggpt_plugins" / "demo" / "samples"
    assert "Redistribution and use in source and binary forms" in (samples / "LICENSE-stardist.txt").read_text()


def test_palette_images_from_bytes_are_rgb_and_palette_masks_keep_ids():
    """The adapters decode downloads and dataset files through the core: the same palette rule there."""
    import io

    from seggpt_plugins.images import decode_image

    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 7
    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0] * 7 + [255, 0, 0] + [0, 0, 0] * 248)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue())[3, 3].tolist() == [255, 0, 0]
    assert np.array_equal(decode_image(buffer.getvalue(), as_mask=True), labels)
