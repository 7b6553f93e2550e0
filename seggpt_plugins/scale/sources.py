"""Where a run's inputs come from: files, folders, globs, manifests, object stores; listed lazily.

    check_sources(["data/", "s3://bucket/tiles/", "list.csv"])     # before any work: each source usable
    for item in iter_sources(sources):                              # one Item at a time
        item.uri, item.stem                                         # where to read it, its output name
    data = read_bytes(item.uri)

A folder (or an object-store prefix ending in "/") is searched recursively for image files, and a
glob ("data/**/*.png", "s3://b/x/*.tif") is expanded; their stems are relative to the folder (or the
glob's fixed part), so the output tree mirrors the input tree. A manifest (.csv, .jsonl, .parquet)
lists one input a row in a `path` or `uri` column (relative paths from the manifest's folder); its
stems are the paths as written, without scheme, leading "/" or suffix. Remote URLs (s3://, gs://, ...)
go through fsspec. Each source's listing is sorted; nothing is decoded here.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from ..errors import InputError
from ..vocabulary import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
MANIFEST_COLUMNS = ("path", "uri")


@dataclass(frozen=True)
class Item:
    """One input: where to read it (a local path or a URL) and its output name relative to --out."""

    uri: str
    stem: str


def is_url(source: str) -> bool:
    """Whether `source` names a remote object (scheme://...), not a local path."""
    return "://" in str(source) and not str(source).startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; InputError when the protocol is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise InputError(f"{url}: cannot open this location ({exc}); for s3:// install s3fs "
                         "(pip install 'seggpt-plugins[ray]')") from None


def read_bytes(uri: str) -> bytes:
    """The bytes of one input (a local file or a remote object)."""
    if is_url(uri):
        fs, path = filesystem(uri)
        return fs.cat_file(path)
    return Path(uri).read_bytes()


def is_manifest(source: str) -> bool:
    return str(source).lower().endswith(MANIFEST_SUFFIXES) and not glob.has_magic(str(source))


def check_sources(sources: Iterable[str]) -> list[str]:
    """Each source exists and names something to read (a manifest has its column), before any work."""
    sources = [str(s) for s in sources]
    if not sources:
        raise InputError("no targets given")
    for source in sources:
        if is_manifest(source):
            next(_manifest_rows(source), None)  # opens it and finds the column
        elif glob.has_magic(source):
            if next(iter(_glob(source)), None) is None:
                raise InputError(f"{source}: matches no file")
        elif is_url(source):
            fs, path = filesystem(source)
            if not fs.exists(path):
                raise InputError(f"{source}: no such object or prefix")
        elif not Path(source).exists():
            raise InputError(f"{source}: no such file or folder")
    return sources


def iter_sources(sources: Iterable[str], exclude: Iterable[str] = ()) -> Iterator[Item]:
    """Every input of `sources`, in order (each folder, prefix and glob sorted), one Item at a time; the
    files of `exclude` (the run's examples, found in a target folder) are left out."""
    left_out = {_same_key(x) for x in exclude}
    for source in map(str, sources):
        if is_manifest(source):
            items = _manifest_items(source)
        elif glob.has_magic(source):
            items = _glob_items(source)
        elif is_url(source):
            items = _remote_items(source)
        elif Path(source).is_dir():
            items = _folder_items(Path(source))
        else:
            items = iter([Item(source, Path(source).stem)])
        yield from (item for item in items if not left_out or _same_key(item.uri) not in left_out)


def _same_key(location) -> str:
    """One spelling per file: local paths resolved, URLs as given."""
    location = str(location)
    return location if is_url(location) else str(Path(location).resolve())


def local_targets(targets: list[str], exclude: Iterable[str] = ()) -> list[tuple[Path, str]]:
    """(file, output stem) of local files, folders and globs, as `seggpt segment` takes them (less `exclude`)."""
    check_sources(targets)
    found = [(Path(item.uri), item.stem) for item in iter_sources(targets, exclude)]
    if not found:
        raise InputError(f"no targets left: every image of {', '.join(map(str, targets))} is also an example "
                         "(--prompt); give other images to segment")
    return found


def _hidden(parts) -> bool:
    return any(part.startswith(".") for part in parts)


def _folder_items(folder: Path) -> Iterator[Item]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not _hidden(p.relative_to(folder).parts))
    if not files:
        raise InputError(f"{folder}: a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for file in files:
        yield Item(str(file), str(file.relative_to(folder).with_suffix("")))


def _remote_items(url: str) -> Iterator[Item]:
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    if fs.isfile(path):
        yield Item(url, PurePosixPath(path).stem)
        return
    root = path.rstrip("/")
    keys = sorted(k for k in fs.find(root) if PurePosixPath(k).suffix.lower() in IMAGE_SUFFIXES
                  and not _hidden(PurePosixPath(k).relative_to(root).parts))
    if not keys:
        raise InputError(f"{url}: a prefix with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for key in keys:
        yield Item(f"{protocol}://{key}", str(PurePosixPath(key).relative_to(root).with_suffix("")))


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        fs, path = filesystem(pattern)
        protocol = pattern.split("://", 1)[0]
        return sorted(f"{protocol}://{k}" for k in fs.glob(path) if fs.isfile(k))
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _glob_items(pattern: str) -> Iterator[Item]:
    files = _glob(pattern)
    if not files:
        raise InputError(f"{pattern}: matches no file")
    scheme = pattern.split("://", 1)[0] + "://" if is_url(pattern) else ""
    fixed = PurePosixPath(pattern[len(scheme):].split("*")[0].split("?")[0].split("[")[0])
    # the glob's fixed part when the pattern ends in "/" or "*" and it is a folder, else its parent
    folder = fixed if pattern.endswith(("/", "*")) and _is_dir(scheme + str(fixed)) else fixed.parent
    for file in files:
        path = PurePosixPath(file[len(scheme):])
        stem = path.relative_to(folder).with_suffix("") if path.is_relative_to(folder) else path.stem
        yield Item(file, str(stem))


def _is_dir(location: str) -> bool:
    if is_url(location):
        fs, inside = filesystem(location)
        return fs.isdir(inside)
    return Path(location).is_dir()


def _manifest_rows(manifest: str) -> Iterator[str]:
    """The path/uri column of a manifest, row by row (CSV and JSONL streamed; Parquet by row groups)."""
    import csv
    import io
    import json

    name = manifest.lower()
    if not is_url(manifest) and not Path(manifest).is_file():
        raise InputError(f"{manifest}: no such manifest file")
    try:
        if is_url(manifest):
            fs, path = filesystem(manifest)
            opened = fs.open(path, "rb")
        else:
            opened = open(manifest, "rb")
    except OSError as exc:
        raise InputError(f"{manifest}: cannot be read ({exc})") from None
    with opened as raw:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(raw)
            except Exception as exc:
                raise InputError(f"{manifest}: not a readable Parquet file ({exc})") from None
            column = next((c for c in MANIFEST_COLUMNS if c in table.schema_arrow.names), None)
            if column is None:
                raise InputError(f"{manifest}: needs a 'path' or 'uri' column, has {table.schema_arrow.names}")
            for batch in table.iter_batches(columns=[column], batch_size=4096):
                yield from (str(v) for v in batch.column(0).to_pylist() if v)
        elif name.endswith(".csv"):
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            column = next((c for c in MANIFEST_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise InputError(f"{manifest}: needs a 'path' or 'uri' column in its header line, has "
                                 f"{reader.fieldnames}")
            yield from (row[column] for row in reader if row.get(column))
        else:
            for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise InputError(f"{manifest}, line {number}: not a JSON object") from None
                value = next((row[c] for c in MANIFEST_COLUMNS if isinstance(row, dict) and row.get(c)), None)
                if value is None:
                    raise InputError(f"{manifest}, line {number}: needs a 'path' or 'uri' field")
                yield str(value)


def _manifest_items(manifest: str) -> Iterator[Item]:
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    for value in _manifest_rows(manifest):
        uri = value if is_url(value) or os.path.isabs(value) else f"{base}/{value}"
        written = PurePosixPath(value.split("://", 1)[-1].lstrip("/"))
        if ".." in written.parts:
            raise InputError(f"{manifest}: {value!r} climbs out of its folder ('..'); its output would too")
        yield Item(uri, str(written.with_suffix("")))
