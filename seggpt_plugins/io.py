"""Writing outputs safely: whole files or nothing, with the modes the user's umask gives, never over an input.

    write_png(path, labels)                       # temp name in the same folder, then an atomic rename
    check_outputs(outputs, inputs, overwrite)     # before any work: collisions, existing files, inputs
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import InputError
from .images import label_dtype

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_modes(folder) -> None:
    """Give `folder` and everything in it the modes the umask gives new files and folders (libraries such as
    safetensors write 0600)."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_write(path, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    The file gets the mode any new file of the user gets (0666 less the umask), not mkstemp's 0600; an
    interrupted write leaves no partial file; an existing `path` is replaced only with `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_png(path, arr: np.ndarray, overwrite: bool = False) -> Path:
    """Write uint8/uint16 gray or RGB as PNG, atomically (temp name, then rename)."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.dtype not in (np.uint8, np.uint16):
        if arr.size and arr.max() > 65535:
            raise InputError(f"{path}: label ids above 65535 do not fit a PNG; write a TIFF instead")
        arr = arr.astype(label_dtype(int(arr.max()) if arr.size else 0))
    img = Image.fromarray(arr)
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"), overwrite)


def write_tiff(path, arr: np.ndarray, overwrite: bool = False) -> Path:
    """Write an array as a zlib-compressed TIFF, atomically."""
    import tifffile

    return atomic_write(Path(path), lambda tmp: tifffile.imwrite(tmp, np.asarray(arr), compression="zlib"),
                        overwrite)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: Iterable, inputs: Iterable = (), overwrite: bool = False) -> list[Path]:
    """Check a run's output files before any work; returns them as Paths. InputError names the first problem:
    two outputs on one path, an output that is one of the inputs (never written over, even with
    overwrite), an output that exists (without overwrite) or is a folder, a folder that cannot be created
    or written."""
    outputs = [Path(p) for p in outputs]
    inputs = [Path(p) for p in inputs]
    seen: dict[Path, Path] = {}
    for out in outputs:
        key = out.resolve()
        if key in seen:
            raise InputError(f"{out}: two outputs of this run would have this name; rename one of the inputs")
        seen[key] = out
        clash = next((i for i in inputs if _same_file(out, i)), None)
        if clash is not None:
            raise InputError(f"{out}: is an input of this run ({clash}); outputs never replace inputs, choose "
                             "another output folder or name")
        if out.is_dir():
            raise InputError(f"{out}: is a folder; expected a file name here")
        if out.exists() and not overwrite:
            raise InputError(f"{out}: exists; pass --overwrite to replace it")
    for folder in sorted({out.parent for out in outputs}):
        problem = unwritable(folder)
        if problem:
            raise InputError(problem)
    return outputs


def unwritable(folder) -> str | None:
    """Why files could not be created in `folder` (None: they can); creates nothing."""
    probe = Path(folder)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{folder}: cannot be a folder, {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{folder}: cannot write there ({probe} is not writable)"
    return None


STAGING_PREFIX = ".seggpt-staging-"


class OutputSet:
    """A run's output files, written all together or not at all.

        outputs = OutputSet(paths, inputs=..., overwrite=...)   # checked at once (check_outputs)
        with outputs:
            outputs.write_png(path, labels)                       # into a hidden staging folder
        # leaving the block moves every file into place; an error (or Ctrl-C) removes the staging

    Staging folders of runs that were killed (their process is gone) are removed by the next run.
    """

    def __init__(self, paths: Iterable, inputs: Iterable = (), overwrite: bool = False):
        self.paths = check_outputs(paths, inputs, overwrite)
        self.overwrite = overwrite
        self._staged: dict[Path, Path] = {}
        self._folders: dict[Path, Path] = {}

    def __enter__(self) -> "OutputSet":
        return self

    def stage(self, path) -> Path:
        """Where to write declared output `path` now (a file in the hidden staging folder); it is moved
        into place when the block ends without an error."""
        path = Path(path)
        if path not in self.paths:
            raise ValueError(f"{path} is not one of this run's declared outputs")
        folder = self._folders.get(path.parent)
        if folder is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(path.parent)
            folder = self._folders[path.parent] = Path(
                tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=path.parent))
        staged = self._staged[path] = folder / f"{len(self._staged)}-{path.name}"
        return staged

    def write_png(self, path, arr) -> Path:
        return write_png(self.stage(path), arr, overwrite=True)

    def write_tiff(self, path, arr) -> Path:
        return write_tiff(self.stage(path), arr, overwrite=True)

    def __exit__(self, kind, error, traceback) -> bool:
        import shutil

        try:
            if kind is None:
                for final, staged in self._staged.items():
                    if final.exists() and not self.overwrite:  # appeared during the run
                        raise InputError(f"{final}: appeared while this run was working; nothing was written")
                for final, staged in self._staged.items():
                    os.replace(staged, final)
        finally:
            for folder in self._folders.values():
                shutil.rmtree(folder, ignore_errors=True)
        return False


def _remove_stale_staging(folder: Path) -> None:
    """Remove staging folders left in `folder` by runs whose process no longer exists."""
    import shutil

    for staging in folder.glob(f"{STAGING_PREFIX}*"):
        pid = staging.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
