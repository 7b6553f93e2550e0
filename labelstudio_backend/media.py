"""Task images: resolved against Label Studio, downloaded with its API key, size-limited, decoded in memory.

What a task's image field may hold, and where it is fetched from:

- `/data/upload/...`, `upload/...`, `/data/local-files/?d=...`, `/storage-data/uploaded/?filepath=...`: from
  Label Studio (`LABEL_STUDIO_URL`) with the API key;
- `s3://`, `gs://`, `azure-blob://`: through Label Studio's presign endpoint for the task, with the API key;
- `http(s)://` on Label Studio's own host: with the API key; on any other host: the task's own URL, without it.

Nothing else is read: no local file paths, no `file://`, no `..` in paths, no other hosts with the key, and
no private, loopback or link-local address but Label Studio's own and the operator's allow-list (netguard).
The API key is a legacy token (`Authorization: Token ...`) or a personal access token: a JWT refresh token
that is exchanged at `/api/token/refresh/` for short-lived access tokens (`Authorization: Bearer ...`).
"""

from __future__ import annotations

import base64
import logging
import posixpath
import socket
import threading
import time
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np

from .netguard import BlockedAddress, HostPolicy, guarded_adapter
from .params import task_id_of

log = logging.getLogger("seggpt_plugins.labelstudio")

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LABEL_STUDIO_PREFIXES = ("/data/", "/storage-data/", "/tasks/")
MAX_REDIRECTS = 5
REFRESH_MARGIN_S = 30  # refresh a PAT access token this long before it expires


class MediaError(ValueError):
    """A task's image cannot be used: the message says which URL and why."""


class OutOfTime(MediaError):
    """A download not started or cut because the request's time budget is spent: the task is left for the next
    retrieval, not failed."""


class Watchdog:
    """Shuts a download's sockets at its deadline. A socket timeout restarts with every byte received, so a
    server that sends one byte at a time would otherwise hold a download (headers or body) for as long as it
    likes; shut down, the socket's blocked read returns at once and the download ends in OutOfTime."""

    def __init__(self, deadline: float | None):
        self.fired = False
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer = None
        if deadline is not None:
            self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _jwt_claims(token: str) -> dict | None:
    """The claims of a JWT without checking its signature (Label Studio checks it), or None for other tokens."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except Exception:
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """The Authorization header for Label Studio: a legacy token, or a PAT exchanged for access tokens."""

    def __init__(self, base_url: str, api_key: str, session_factory, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key.strip()
        claims = _jwt_claims(self.api_key)
        self.kind = "pat" if claims is not None and claims.get("token_type") == "refresh" else "legacy"
        if claims is not None and claims.get("token_type") == "access":
            self.kind = "access"  # a short-lived access token given directly: used as it is
        self._session_factory = session_factory
        self._timeout = timeout
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self) -> dict[str, str]:
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.api_key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._expires - REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = self._session_factory().post(url, json={"refresh": self.api_key}, timeout=self._timeout,
                                                    allow_redirects=False)
        except Exception as exc:
            raise MediaError(f"cannot reach Label Studio at {self.base_url} to refresh the access token: {exc}") from None
        if response.status_code != 200:
            raise MediaError(f"Label Studio refused the personal access token (POST /api/token/refresh/ -> "
                             f"{response.status_code}); check LABEL_STUDIO_API_KEY")
        try:
            access = response.json()["access"]
        except Exception:
            raise MediaError("Label Studio's /api/token/refresh/ answered without an access token") from None
        claims = _jwt_claims(access) or {}
        self._access = access
        self._expires = float(claims.get("exp", time.time() + 240))


class MediaFetcher:
    """Resolve and download task images under the rules in the module docstring."""

    def __init__(self, base_url: str | None, api_key: str | None, *, max_bytes: int, max_pixels: int,
                 timeout: float = 30.0, allowed_hosts=(), trust_base: bool = True):
        """base_url: Label Studio; trust_base: it is the operator's (LABEL_STUDIO_URL), so it may be on a private
        address; a URL that /setup reported is not (it is checked as any other host). allowed_hosts: the
        operator's allow-list of private hosts that serve task images (see netguard)."""
        self.base_url = base_url.rstrip("/") if base_url else None
        self._base = urlsplit(self.base_url) if self.base_url else None
        if self._base is not None and (self._base.scheme not in ("http", "https") or not self._base.netloc):
            raise MediaError(f"LABEL_STUDIO_URL must be an http(s) URL such as http://localhost:8080, got {base_url!r}")
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self.timeout = timeout
        self.policy = HostPolicy([self.base_url] if trust_base else [], allowed_hosts)
        self._local = threading.local()
        self.auth = LabelStudioAuth(self.base_url, api_key, self._session, timeout) if (self.base_url and api_key) else None

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc credentials picked up from the environment
            session.headers["User-Agent"] = "seggpt-labelstudio-backend"
            # every connection (redirects too) checked where it goes; its socket shown to the download's watchdog
            adapter = guarded_adapter(self.policy, on_response=self._watch_socket)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _watch_socket(self, sock) -> None:
        watchdog = getattr(self._local, "watchdog", None)
        if watchdog is not None:
            watchdog.watch(sock)

    # ------------------------------------------------------------------------------------------ resolve

    def _is_label_studio(self, parts) -> bool:
        return (self._base is not None and parts.scheme == self._base.scheme
                and parts.netloc.lower() == self._base.netloc.lower())

    def resolve(self, value, task_id=None) -> tuple[str, bool]:
        """(absolute URL, send the API key?) for a task's image field, or MediaError."""
        if not isinstance(value, str) or not value.strip():
            raise MediaError(f"the image field holds {type(value).__name__} {str(value)[:80]!r}, not a URL")
        url = value.strip()
        shown = url[:200]
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id_of(task_id) is None:
                raise MediaError(f"{shown}: a cloud storage URI needs the task's id (an integer, got "
                                 f"{str(task_id)[:40]!r}) to be presigned by Label Studio")
            base = self._need_base(shown)
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{base}/tasks/{task_id_of(task_id)}/presign/?fileuri={fileuri}", True
        if scheme in ("http", "https"):
            if not parts.netloc:
                raise MediaError(f"{shown}: no host in the URL")
            _check_no_traversal(parts, shown)
            # the key goes only to Label Studio's own media paths
            return url, self._is_label_studio(parts) and parts.path.startswith(LABEL_STUDIO_PREFIXES)
        if scheme or parts.netloc:
            raise MediaError(f"{shown}: only http(s) URLs, Label Studio paths and s3/gs/azure-blob URIs are "
                             "fetched (never local files)")
        if url.startswith("upload/"):
            url = "/data/" + url
        if not url.startswith("/") or url.startswith("//"):
            raise MediaError(f"{shown}: not a Label Studio path (/data/upload/..., /data/local-files/?d=...); "
                             "local file paths are never read")
        if not url.startswith(LABEL_STUDIO_PREFIXES):
            raise MediaError(f"{shown}: only Label Studio media paths ({', '.join(LABEL_STUDIO_PREFIXES)}) are fetched")
        _check_no_traversal(urlsplit(url), shown)
        base = self._need_base(shown)
        absolute = urljoin(base + "/", url.lstrip("/"))
        if not self._is_label_studio(urlsplit(absolute)):  # cannot happen after the checks above; kept as a guard
            raise MediaError(f"{shown}: resolves outside Label Studio")
        return absolute, True

    def _need_base(self, shown: str) -> str:
        if self.base_url is None:
            raise MediaError(f"{shown}: a Label Studio file, but the backend does not know Label Studio's URL; "
                             "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)")
        return self.base_url

    # ----------------------------------------------------------------------------------------- download

    def fetch_bytes(self, value, task_id=None, deadline: float | None = None) -> bytes:
        """The file's bytes; with a deadline (time.monotonic()), the whole download ends by then: its sockets
        are shut at the deadline however slowly the server sends (OutOfTime)."""
        url, keyed = self.resolve(value, task_id)
        if keyed and self.auth is None:
            raise MediaError(f"{str(value)[:200]}: a Label Studio file, but no API key is set; "
                             "set LABEL_STUDIO_API_KEY (Account & Settings > Access Token in Label Studio)")
        with Watchdog(deadline) as watchdog:
            self._local.watchdog = watchdog
            try:
                data = self._download(url, keyed, deadline)
            except OutOfTime:
                raise
            except Exception as exc:  # a read the watchdog cut ends in whatever the HTTP stack makes of it
                if watchdog.fired:
                    raise OutOfTime(f"{_shown(url)}: the download did not finish within the request's time "
                                    "budget") from None
                if isinstance(exc, MediaError):
                    raise
                raise MediaError(f"{_shown(url)}: download failed ({type(exc).__name__}: {exc})") from None
            finally:
                self._local.watchdog = None
            if watchdog.fired:  # a body without a length ends quietly when its socket is shut: not all of it
                raise OutOfTime(f"{_shown(url)}: the download did not finish within the request's time budget")
        return data

    def _download(self, url: str, keyed: bool, deadline: float | None) -> bytes:
        for attempt in (0, 1):
            response = self._get(url, keyed, deadline)
            if response.status_code == 401 and keyed and attempt == 0 and self.auth.kind == "pat":
                response.close()
                self.auth.invalidate()  # an access token that expired early: refresh once and retry
                continue
            break
        with response:
            if response.status_code in (401, 403):
                raise MediaError(f"{_shown(url)}: Label Studio refused the download ({response.status_code}); "
                                 "check LABEL_STUDIO_API_KEY" if keyed else
                                 f"{_shown(url)}: the server refused the download ({response.status_code})")
            if response.status_code != 200:
                raise MediaError(f"{_shown(url)}: download failed with HTTP {response.status_code}")
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise MediaError(f"{_shown(url)}: {int(length)} bytes is more than the limit of {self.max_bytes} "
                                 "(raise SEGGPT_MAX_DOWNLOAD_MB)")
            kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind in ("text/html", "application/json"):
                raise MediaError(f"{_shown(url)}: got {kind}, not an image (a login page or an error?)")
            chunks, size = [], 0
            for chunk in response.iter_content(chunk_size=1 << 16):
                if deadline is not None and time.monotonic() > deadline:
                    raise OutOfTime(f"{_shown(url)}: the download did not finish within the request's time budget")
                size += len(chunk)
                if size > self.max_bytes:
                    raise MediaError(f"{_shown(url)}: more than the limit of {self.max_bytes} bytes "
                                     "(raise SEGGPT_MAX_DOWNLOAD_MB)")
                chunks.append(chunk)
        return b"".join(chunks)

    def _timeout(self, url: str, deadline: float | None) -> tuple[float, float]:
        if deadline is None:
            return 5.0, self.timeout
        left = deadline - time.monotonic()
        if left <= 0.05:
            raise OutOfTime(f"{_shown(url)}: not fetched: the request's time budget is spent")
        return min(5.0, left), min(self.timeout, left)

    def _get(self, url: str, keyed: bool, deadline: float | None = None):
        """GET with redirects followed by hand: the key never leaves Label Studio's host, only http(s)."""
        import requests

        session = self._session()
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self.policy.check_url(url)  # the clear message; the connection itself is checked again
            except BlockedAddress as exc:
                raise MediaError(f"{_shown(url)}: not fetched: {exc}") from None
            headers = self.auth.header() if keyed else {}
            try:
                response = session.get(url, headers=headers, timeout=self._timeout(url, deadline), stream=True,
                                       allow_redirects=False)
            except requests.RequestException as exc:
                if isinstance(exc, requests.Timeout) and deadline is not None and time.monotonic() > deadline - 0.1:
                    raise OutOfTime(f"{_shown(url)}: the download did not finish within the request's time "
                                    "budget") from None
                raise MediaError(f"{_shown(url)}: download failed ({type(exc).__name__}: {exc})") from None
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            target = urljoin(url, response.headers["Location"])
            response.close()
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https"):
                raise MediaError(f"{_shown(url)}: redirected to a {parts.scheme or 'relative'} URL, which is not fetched")
            keyed = keyed and self._is_label_studio(parts)
            url = target
        raise MediaError(f"{_shown(url)}: more than {MAX_REDIRECTS} redirects")

    def fetch_image(self, value, task_id=None, budget: "PixelBudget | None" = None,
                    deadline: float | None = None) -> np.ndarray:
        """The decoded image; with a budget, its pixels are taken from it before decoding (the caller gives
        them back with `budget.give(image.shape[0] * image.shape[1])` when it lets the image go)."""
        data = self.fetch_bytes(value, task_id, deadline)
        name = str(value)[:200]
        if budget is None:
            return decode_image(data, self.max_pixels, name=name)
        pixels = image_pixels(data, name)
        budget.take(pixels, name)
        try:
            return decode_image(data, self.max_pixels, name=name)
        except BaseException:
            budget.give(pixels)
            raise


class PixelBudget:
    """The decoded pixels one request may hold at once, over all its images (SEGGPT_MAX_REQUEST_PIXELS)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.held = 0
        self._lock = threading.Lock()

    def take(self, pixels: int, name: str = "image") -> None:
        with self._lock:
            if self.held + pixels > self.limit:
                raise MediaError(f"{name}: {pixels} more pixels would pass the limit of {self.limit} decoded pixels "
                                 "per request (SEGGPT_MAX_REQUEST_PIXELS); retrieve predictions for fewer tasks "
                                 "at a time")
            self.held += pixels

    def give(self, pixels: int) -> None:
        with self._lock:
            self.held = max(0, self.held - int(pixels))


def image_pixels(data: bytes, name: str = "image") -> int:
    """Width x height from the image header (nothing is decoded)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.width) * int(img.height)
    except Exception as exc:
        raise MediaError(f"{name}: not a readable image ({type(exc).__name__})") from None


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]


def _check_no_traversal(parts, shown: str) -> None:
    segments = unquote(unquote(parts.path)).replace("\\", "/").split("/")
    values = [v for vs in parse_qs(parts.query).values() for v in vs]
    if ".." in segments or any(".." in unquote(v).replace("\\", "/").split("/") for v in values):
        raise MediaError(f"{shown}: '..' in a path is refused")
    if posixpath.normpath(unquote(parts.path) or "/").startswith("//"):
        raise MediaError(f"{shown}: malformed path")


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> np.ndarray:
    """Image bytes -> array (H, W) or (H, W, C), as the browser shows it: the core's decoder (EXIF orientation,
    palette images as RGB, the pixel limit checked before decoding), its InputError as a MediaError."""
    from seggpt_plugins.errors import InputError
    from seggpt_plugins.images import decode_image as decode

    try:
        array = decode(data, name=name, max_pixels=max_pixels)
    except InputError as exc:
        raise MediaError(str(exc)) from None
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise MediaError(f"{name}: unexpected image shape {array.shape}")
    return array
