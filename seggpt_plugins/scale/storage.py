"""A run's output folder, on local disk or an object store: each file whole or not at all.

    store = Store("out/")  or  Store("s3://bucket/labels/")
    store.put("a/b_labels.png", data)        # local: temp file + rename (io.atomic_write); remote: one PUT
    store.get("a/b_labels.png")              # bytes, or None when absent
    store.put_file("coco.json", local_path)  # a file assembled on local disk, moved/uploaded into place

Object stores write an object in one request, so a reader never sees half of it; on local disk the
rename gives the same. That is what makes per-input outputs safe to resume (see `records`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError
from .sources import filesystem, is_url


class Store:
    """The folder (or prefix) `root`; paths given to the methods are relative to it, with "/"."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/") if is_url(str(root)) else str(Path(root))
        self.remote = is_url(self.root)
        if self.remote:
            self.fs, self._base = filesystem(self.root)
            self._base = self._base.rstrip("/")
        elif Path(self.root).exists() and not Path(self.root).is_dir():
            raise InputError(f"{self.root}: is a file; --out names the output folder")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self._base}/{rel}" if self.remote else str(Path(self.root) / rel)

    def put(self, rel: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self._path(rel), data)
            return
        from ..io import atomic_write

        def write(tmp):
            with open(tmp, "wb") as file:
                file.write(data)

        atomic_write(self._path(rel), write, overwrite=True)

    def put_file(self, rel: str, local: str | os.PathLike) -> None:
        """Move a finished local file into place (uploaded, for an object store)."""
        if self.remote:
            self.fs.put_file(str(local), self._path(rel))
            Path(local).unlink(missing_ok=True)
            return
        from ..io import current_umask

        target = Path(self._path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(local, 0o666 & ~current_umask())
        try:
            os.replace(local, target)
        except OSError:  # another filesystem: copy beside the target, then rename
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
            Path(local).unlink(missing_ok=True)

    def get(self, rel: str) -> bytes | None:
        try:
            if self.remote:
                return self.fs.cat_file(self._path(rel))
            return Path(self._path(rel)).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, rel: str = "") -> bool:
        path = self._path(rel) if rel else (self._base if self.remote else self.root)
        return self.fs.exists(path) if self.remote else Path(path).exists()

    def is_empty(self) -> bool:
        """Whether the folder holds nothing yet (or does not exist)."""
        if self.remote:
            return not self.fs.exists(self._base) or not self.fs.find(self._base, maxdepth=None, withdirs=False)
        return not Path(self.root).exists() or next(Path(self.root).iterdir(), None) is None

    def remove_partial(self) -> int:
        """Remove the temporary `.NAME....part` files a killed run left beside its outputs (local disk only:
        an object store never shows half an object); how many."""
        if self.remote or not Path(self.root).is_dir():
            return 0
        stale = [p for p in Path(self.root).rglob(".*.part") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def remove(self, rel: str) -> None:
        """Remove a file or a whole folder under the root (nothing when absent)."""
        path = self._path(rel)
        if self.remote:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache()
        elif Path(path).is_dir():
            shutil.rmtree(path)
        else:
            Path(path).unlink(missing_ok=True)
