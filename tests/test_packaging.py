"""The built wheel: one import namespace, the entry points, the data files, and that it works installed."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SOURCES = ("pyproject.toml", "README.md", "LICENSE", "seggpt_plugins", "napari_plugin", "labelstudio_backend",
           "fiftyone_op")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a clean copy of the sources: setuptools packs whatever a stale build/ folder holds, which
    would hide a package missing from pyproject's list."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=skip)
        else:
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("seggpt_plugins-*.whl")
    return path


def test_every_path_in_the_wheel_is_under_the_project_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"seggpt_plugins", info}
    for expected in ("seggpt_plugins/napari/napari.yaml", "seggpt_plugins/napari/_widget.py",
                     "seggpt_plugins/labelstudio/server.py", "seggpt_plugins/fiftyone/fiftyone.yml",
                     "seggpt_plugins/fiftyone/operators.py", "seggpt_plugins/demo/model/model.safetensors",
                     "seggpt_plugins/demo/samples/nuclei2d.tif",
                     "seggpt_plugins/demo/samples/LICENSE-stardist.txt"):
        assert expected in names, expected
    # every package of the source tree (a folder with an __init__.py) ships, under its import name
    folders = {"seggpt_plugins": "seggpt_plugins", "napari_plugin": "seggpt_plugins/napari",
               "labelstudio_backend": "seggpt_plugins/labelstudio", "fiftyone_op": "seggpt_plugins/fiftyone"}
    for folder, installed in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            module = init.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{module}" in names, f"{folder}/{module} is missing from the wheel"


def test_the_wheel_declares_the_entry_points(wheel):
    archive = zipfile.ZipFile(wheel)
    text = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "seggpt = seggpt_plugins.cli:main" in text
    assert "seggpt-plugins = seggpt_plugins.napari:napari.yaml" in text
    assert "labelstudio = seggpt_plugins.labelstudio.cli:register" in text
    assert "fiftyone = seggpt_plugins.fiftyone.cli:register" in text


def test_the_installed_wheel_imports_its_adapters_and_reads_its_manifest(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = (
        "import json, sys; from importlib import resources; from importlib.metadata import distributions\n"
        "import seggpt_plugins.napari, seggpt_plugins.labelstudio, seggpt_plugins.fiftyone.cli as fo\n"
        f"root = {str(target)!r}\n"
        "eps = [e for d in distributions(path=[root]) for e in d.entry_points]\n"
        "print(json.dumps({'files': [m.__file__ for m in (seggpt_plugins.napari, seggpt_plugins.labelstudio, fo)],\n"
        "  'manifest': 'seggpt-plugins' in resources.files('seggpt_plugins.napari').joinpath('napari.yaml').read_text(),\n"
        "  'plugin_dir': str(fo.PLUGIN_DIR), 'entry_points': sorted(e.value for e in eps)}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert all(f.startswith(str(target)) for f in found["files"]), found["files"]
    assert found["manifest"]
    assert found["plugin_dir"] == str(target / "seggpt_plugins" / "fiftyone")
    assert (Path(found["plugin_dir"]) / "fiftyone.yml").is_file()
    assert "seggpt_plugins.napari:napari.yaml" in found["entry_points"]
