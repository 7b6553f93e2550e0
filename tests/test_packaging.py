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


# ------------------------------------------------------------------------------- what each extra installs

ADAPTERS = {"labelstudio_backend": "labelstudio", "napari_plugin": "napari", "fiftyone_op": "fiftyone"}
INSTALLED_AS = {"seggpt_plugins.labelstudio": "labelstudio_backend", "seggpt_plugins.napari": "napari_plugin",
                "seggpt_plugins.fiftyone": "fiftyone_op"}
DISTRIBUTIONS = {"PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml", "skimage": "scikit-image",
                 "jwt": "pyjwt", "bson": "pymongo", "qtpy": "qtpy"}  # import name -> distribution, where they differ
OTHER_EXTRAS = {  # imports a command reaches only with an option that asks for another extra
    ("seggpt_plugins.scale.pipeline", "ray"): "--engine ray: the [ray] extra",
    ("seggpt_plugins.scale.sources", "fsspec"): "s3:// and other remote inputs: the [ray] extra",
}


def _normal(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _module_file(module: str) -> Path | None:
    for installed, folder in INSTALLED_AS.items():
        if module == installed or module.startswith(installed + "."):
            module = folder + module[len(installed):]
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, optional) for every import of a module, at any depth; optional: inside a
    try whose handler catches ImportError. `from package import name` also names package.name, and the
    package's lazy `_LAZY` table resolves names it loads on first use."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                "ImportError" in ast.unparse(h.type or ast.Name("BaseException")) for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        optional = id(node) in guarded
        if isinstance(node, ast.Import):
            found += [(alias.name, optional) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.append((base, optional))
            found += [(f"{base}.{alias.name}", optional) for alias in node.names
                      if base.split(".")[0] in ("seggpt_plugins", "labelstudio_backend", "napari_plugin",
                                                "fiftyone_op")]
    return found


def _lazy_table(path: Path) -> dict:
    import ast

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _third_party_imports(folder: str) -> dict[tuple[str, str], None]:
    """{(module, top-level import name)} over the adapter's modules and every core module they reach."""
    import sys

    todo = [(f"{folder}.{p.relative_to(ROOT / folder).with_suffix('').as_posix().replace('/', '.')}"
             .removesuffix(".__init__"), p) for p in sorted((ROOT / folder).rglob("*.py"))]
    seen, found = set(), {}
    while todo:
        module, path = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name, optional in _imports(module, path):
            top = name.split(".")[0]
            if top in ("seggpt_plugins", *ADAPTERS):
                parent, _, attr = name.rpartition(".")
                target = _module_file(name)
                if target is None and parent and (parent_file := _module_file(parent)) is not None:
                    lazy = _lazy_table(parent_file).get(attr)
                    name, target = (f"{parent}.{lazy}", _module_file(f"{parent}.{lazy}")) if lazy else (parent,
                                                                                                       parent_file)
                if target is not None:
                    todo.append((name, target))
            elif top and top not in sys.stdlib_module_names and top != "__future__" and not optional:
                found[(module, top)] = None
    return found


def _provided(requirements: list[str]) -> set[str]:
    """The normalized names of the distributions these requirements install, with what they require."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    provided, todo = set(), [(Requirement(r), ("",)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = _normal(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in provided:
            continue
        provided.update({key, name})
        try:
            todo += [(Requirement(r), ("", *req.extras)) for r in requires(req.name) or ()]
        except PackageNotFoundError:
            pass
    return {p for p in provided if isinstance(p, str)}


@pytest.mark.parametrize("folder", sorted(ADAPTERS))
def test_each_extra_installs_what_its_adapter_imports(folder):
    """Issue 32 item 1: `pip install '.[labelstudio]'` left `seggpt labelstudio predict` without pyarrow. Every
    third-party import of an adapter (and of the core modules it reaches) is a distribution that the base
    dependencies or the adapter's extra install."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    provided = _provided(project["dependencies"] + project["optional-dependencies"][ADAPTERS[folder]])
    missing = sorted(f"{module} imports {top} (distribution {DISTRIBUTIONS.get(top, top)})"
                     for module, top in _third_party_imports(folder)
                     if (module, top) not in OTHER_EXTRAS and _normal(DISTRIBUTIONS.get(top, top)) not in provided)
    assert not missing, f"[{ADAPTERS[folder]}] does not install: " + "; ".join(missing)
