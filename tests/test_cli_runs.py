"""Runs that never throw away work (issue 29): a bad file fails alone, the input folder is never an output
folder, and what can be checked is checked before the model loads."""

import time

import numpy as np
import pytest
from PIL import Image

from seggpt_plugins.cli import main
from seggpt_plugins.cli import segment as segment_command


@pytest.fixture
def folder(tmp_path, nuclei2d):
    """Four real nuclei tiles in in/, a truncated PNG and an empty one among them, the example beside."""
    image, truth = nuclei2d
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    for k in range(4):
        Image.fromarray(scaled[128:192, 64 * k:64 * k + 64]).save(tmp_path / "in" / f"t{k}.png")
    data = (tmp_path / "in" / "t3.png").read_bytes()
    (tmp_path / "in" / "t3.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "in" / "t4.png").write_bytes(b"")
    Image.fromarray(scaled[:64, :64]).save(tmp_path / "ex.png")
    Image.fromarray((truth[:64, :64] > 0).astype(np.uint8)).save(tmp_path / "ex_mask.png")
    return tmp_path


def run(folder, *extra, out="out"):
    return main(["segment", str(folder / "in"), "--prompt", str(folder / "ex.png"), str(folder / "ex_mask.png"),
                 "--out", str(folder / out) if not str(out).startswith("/") else out, "--model", "demo",
                 "--device", "cpu", *map(str, extra)])


def test_bad_files_fail_alone_and_a_rerun_retries_only_them(folder, capsys):
    assert run(folder) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["t0_labels.png", "t1_labels.png", "t2_labels.png"]
    assert "t3.png: not a readable image" in err and "t4.png: an empty file" in err
    assert "2 of 5 image(s) failed" in err and "--skip-existing" in err and "Traceback" not in err
    Image.open(folder / "in" / "t0.png").save(folder / "in" / "t3.png")  # the user mends one
    assert run(folder, "--skip-existing") == 1
    captured = capsys.readouterr()
    assert "skipping 3 target(s)" in captured.err and "1 of 2 image(s) failed" in captured.err
    assert (folder / "out" / "t3_labels.png").exists() and not (folder / "out" / "t4_labels.png").exists()


def test_run_wide_files_hold_the_good_inputs(folder, capsys):
    import json

    assert run(folder, "--output", "instances", "--format", "png", "coco") == 1
    coco = json.loads((folder / "out" / "coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["t0.png", "t1.png", "t2.png"]


@pytest.mark.parametrize("engine", [[], ["--engine", "local"]])
def test_the_input_folder_is_not_an_output_folder(folder, capsys, engine):
    for out in ("in", "in/labels"):
        assert run(folder, *engine, out=out) == 2
        assert "inside the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in (folder / "in").iterdir()) == [f"t{k}.png" for k in range(5)]


@pytest.mark.parametrize("engine", [[], ["--engine", "local"]])
def test_an_example_inside_the_target_folder_is_not_a_target(folder, capsys, engine):
    for name in ("ex.png", "ex_mask.png"):
        (folder / "in" / name).write_bytes((folder / name).read_bytes())
    for k in (3, 4):
        (folder / "in" / f"t{k}.png").unlink()
    assert main(["segment", str(folder / "in"), "--prompt", str(folder / "in" / "ex.png"),
                 str(folder / "in" / "ex_mask.png"), "--out", str(folder / "out"), "--model", "demo", "--device",
                 "cpu", *engine]) == 0
    written = {p.name for p in (folder / "out").rglob("*_labels.png")}
    assert written == {"t0_labels.png", "t1_labels.png", "t2_labels.png"}


def _refuse_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


@pytest.mark.parametrize("engine", [[], ["--engine", "local"]])
@pytest.mark.parametrize("case, message", [
    ("small mask", "small.png): mask size 32x32 differs from its image size 64x64"),  # the mask named too
    ("many labels", "more than the 124"),
    ("empty example", "an empty file (0 bytes)"),
    ("background only", "every example mask is all background"),
    ("proc out", "cannot write there: /proc is on a proc pseudo-filesystem"),  # (was 'No such file')
    ("threads 0", "--threads must be a whole number >= 1"),
])
def test_checks_before_the_model_loads(folder, capsys, monkeypatch, engine, case, message):
    monkeypatch.setattr(segment_command, "load_model", _refuse_model)
    monkeypatch.setattr("seggpt_plugins.scale.predictor.SegGPTPredictor.__init__", _refuse_model)
    prompt, extra, out = ["ex.png", "ex_mask.png"], [], "out"
    if case == "small mask":
        Image.fromarray(np.ones((32, 32), np.uint8)).save(folder / "small.png")
        prompt[1] = "small.png"
    elif case == "many labels":
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 300).astype(np.uint16)).save(folder / "many.png")
        prompt[1] = "many.png"
    elif case == "empty example":
        (folder / "empty.png").write_bytes(b"")
        prompt[0] = "empty.png"
    elif case == "background only":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "zero.png")
        prompt[1] = "zero.png"
    elif case == "proc out":
        out = "/proc/seggpt-out"
    else:
        extra = ["--threads", "0"]
    started = time.monotonic()
    code = main(["segment", str(folder / "in"), "--prompt", *(str(folder / p) for p in prompt), "--out",
                 out if out.startswith("/") else str(folder / out), "--model", "demo", "--device", "cpu",
                 *extra, *engine])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (folder / "out").exists()
    assert time.monotonic() - started < 60  # a guard against a hang only, not a timing claim


@pytest.mark.parametrize("engine", [[], ["--engine", "local"]])
def test_label_names_missing_instance_ids_name_the_file_and_suggest_instances(folder, capsys, monkeypatch, engine):
    """An instance-labelled example with --label-names (which reads its ids as classes): the one line names the
    names file and suggests --example-ids instances (was: '--label-names names no class for label id(s)')."""
    monkeypatch.setattr(segment_command, "load_model", _refuse_model)
    monkeypatch.setattr("seggpt_plugins.scale.predictor.SegGPTPredictor.__init__", _refuse_model)
    objects = np.zeros((64, 64), np.uint8)
    for k in range(8):  # eight nuclei apart, each its own id
        objects[4 + 30 * (k // 4):16 + 30 * (k // 4), 4 + 15 * (k % 4):14 + 15 * (k % 4)] = k + 1
    Image.fromarray(objects).save(folder / "objects.png")
    (folder / "names.txt").write_text("1 nucleus\n")
    code = main(["segment", str(folder / "in"), "--prompt", str(folder / "ex.png"), str(folder / "objects.png"),
                 "--out", str(folder / "out"), "--model", "demo", "--device", "cpu", "--output", "instances",
                 "--label-names", str(folder / "names.txt"), *engine])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{folder / 'names.txt'} (--label-names): no name for label id(s) [2, 3, 4, 5, 6, 7, 8]" in err, err
    assert "look instance-labelled" in err and "--example-ids instances" in err, err


def test_propagate_refuses_an_all_background_annotation_before_the_model(tmp_path, capsys, monkeypatch):
    import tifffile

    from seggpt_plugins.cli import propagate as propagate_command

    monkeypatch.setattr(propagate_command, "load_model", _refuse_model)
    tifffile.imwrite(tmp_path / "stack.tif", np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8))
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "z2.png")
    args = ["propagate", str(tmp_path / "stack.tif"), "--prompt-slice", "2", str(tmp_path / "z2.png"), "--model",
            "demo", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "labels.tif")]) == 2
    assert "every example mask is all background" in capsys.readouterr().err
    assert main([*args, "--out", "/proc/seggpt/labels.tif"]) == 2
    assert "/proc/seggpt: cannot" in capsys.readouterr().err


def test_propagate_names_the_mask_file_and_suggests_instances_before_the_model(tmp_path, capsys, monkeypatch):
    """propagate's checks say what segment's say: a wrong-size --prompt mask names its file, and --label-names
    that miss the ids of an instance-labelled slice read as classes suggest --example-ids instances."""
    import tifffile

    from seggpt_plugins.cli import propagate as propagate_command

    monkeypatch.setattr(propagate_command, "load_model", _refuse_model)
    tifffile.imwrite(tmp_path / "stack.tif", np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8))
    objects = np.zeros((64, 64), np.uint8)
    for k in range(8):  # eight nuclei apart, each its own id
        objects[4 + 30 * (k // 4):16 + 30 * (k // 4), 4 + 15 * (k % 4):14 + 15 * (k % 4)] = k + 1
    Image.fromarray(objects).save(tmp_path / "z2.png")
    Image.fromarray(objects[:32, :32]).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ex.png")
    (tmp_path / "names.txt").write_text("1 nucleus\n")
    args = ["propagate", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "labels.tif"), "--model", "demo",
            "--device", "cpu"]
    assert main([*args, "--prompt", str(tmp_path / "ex.png"), str(tmp_path / "small.png")]) == 2
    err = capsys.readouterr().err
    assert "small.png): mask size 32x32 differs from its image size 64x64" in err and len(err.strip().splitlines()) == 1
    slice_args = [*args, "--prompt-slice", "2", str(tmp_path / "z2.png"), "--output", "instances",
                  "--label-names", str(tmp_path / "names.txt")]
    assert main([*slice_args, "--example-ids", "classes"]) == 2
    err = capsys.readouterr().err
    assert "names.txt (--label-names): no name for label id(s) [2, 3, 4, 5, 6, 7, 8]" in err, err
    assert "--example-ids instances" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "labels.tif").exists()


def test_the_scaled_engine_lists_its_failures_too(folder, capsys):
    assert run(folder, "--engine", "local") == 1
    err = capsys.readouterr().err
    assert "failed: " in err and "t3.png: not a readable image" in err and "t4.png" in err
    assert "2 input(s) failed" in err and "retries only them" in err


def test_a_model_name_that_is_nowhere_is_called_a_possible_typo(folder, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(segment_command, "load_model", _refuse_model)
    assert main(["segment", str(folder / "in"), "--prompt", str(folder / "ex.png"), str(folder / "ex_mask.png"),
                 "--out", str(folder / "out"), "--model", "demoo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--model demoo" in err and "a typo?" in err and len(err.strip().splitlines()) == 1


def test_a_target_that_is_only_the_example_is_named_before_the_model(tmp_path, capsys, monkeypatch):
    """Every target is also the --prompt image (excluded from the targets): one line, not a StopIteration."""
    monkeypatch.setattr(segment_command, "load_model", _refuse_model)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ex.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 1
    Image.fromarray(mask).save(tmp_path / "ex_mask.png")
    assert main(["segment", str(tmp_path / "ex.png"), "--prompt", str(tmp_path / "ex.png"),
                 str(tmp_path / "ex_mask.png"), "--out", str(tmp_path / "out"), "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert "no targets left" in err and "ex.png" in err and len(err.strip().splitlines()) == 1, err
