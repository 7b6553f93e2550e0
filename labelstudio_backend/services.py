"""What one worker process shares between requests: the model, the project state, caches and metrics.

The model is loaded in the worker (after gunicorn forks; never in the master) by a background thread,
through the core's one-model-per-process cache (`seggpt_plugins.model_cache.get_model`), so `/health` answers
at once and says LOADING, UP or ERROR.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from .adapting import ProjectAdaptations
from .media import MediaFetcher
from .netguard import BlockedAddress, HostPolicy
from .references import ByteLRU, ReferenceStore
from .settings import Settings
from .state import MemoryState, SqliteState

log = logging.getLogger("seggpt_plugins.labelstudio")

DOWNLOAD_THREADS = 16  # downloads and decoding, shared by the requests of a process (a bounded pool)


class ModelNotReady(RuntimeError):
    pass


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: Counter = Counter()
        self.started = time.time()
        self.last_predict: dict = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def snapshot(self) -> dict:
        with self._lock:
            return {"uptime_s": round(time.time() - self.started, 1), "pid": os.getpid(),
                    "counters": dict(self.counters), "last_predict": dict(self.last_predict)}


class Services:
    """Shared by all requests of one worker process."""

    def __init__(self, settings: Settings, model=None):
        self.settings = settings
        self.state = SqliteState(settings.state_dir) if settings.state_dir else MemoryState()
        self.store = ReferenceStore(settings.max_references, self.state)
        cache = int(settings.cache_mb * (1 << 20))
        self.images = ByteLRU(cache * 3 // 4)
        self.masks = ByteLRU(cache // 4)
        self.metrics = Metrics()
        self.inference_lock = threading.Lock()
        self.downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="download")
        self._model = model
        self._model_error: str | None = None
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._fetchers: dict = {}
        self._lock = threading.Lock()
        self.model_tag = None
        self.label_configs: dict[int, str] = {}  # project -> its labeling config, as /setup or /predict last gave it
        self.adaptations = ProjectAdaptations(settings.adapt_seconds, lambda: self.model(wait=24 * 3600.0),
                                              self._load_source, settings.state_dir, self.metrics,
                                              steps=settings.adapt_steps)
        if model is not None:
            self._after_load(model)

    # --------------------------------------------------------------------------------------- model

    def start_loading(self) -> None:
        """Load the model in a background thread of this (worker) process."""
        with self._lock:
            if self._loaded.is_set() or self._loader is not None:
                return
            self._loader = threading.Thread(target=self._load, name="seggpt-model-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        from seggpt_plugins.loading import DefaultModelWarning
        from seggpt_plugins.model_cache import get_model

        started = time.time()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DefaultModelWarning)
                model = get_model(self.settings.model, self.settings.device, self.settings.dtype,
                                  self.settings.quantize)
            for warning in caught:
                log.warning("%s", warning.message)
            self._model = model
            self._after_load(model)
            log.info("loaded %s in %.1f s (pid %d); model version prefix %s", model, time.time() - started,
                     os.getpid(), self.model_tag)
        except Exception as exc:  # reported by /health and every request (the detail only in the log)
            self._model_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot load the model %r: %s", self.settings.model, self._model_error)
        finally:
            self._loaded.set()

    def _load_source(self, source: str):
        """A model (e.g. a project's adapted one) loaded as the served model was: device, dtype, quantization."""
        from seggpt_plugins.engine import SegGPT  # not the process's one-model cache: the served model stays in it

        auto = ("auto", "none")
        return SegGPT.from_pretrained(source, device=self.settings.device,
                                      dtype=None if self.settings.dtype in auto else self.settings.dtype,
                                      quantize=None if self.settings.quantize in auto else self.settings.quantize)

    def _after_load(self, model) -> None:
        self.model_tag = self.tag_of(model)
        self._loaded.set()

    def tag_of(self, model) -> str:
        """A model's part of the backend's model version: its name and weights' fingerprint."""
        return f"{model_name(getattr(model, 'source', None) or self.settings.model)}-{model_fingerprint(model)}"

    def project_tag(self, project_id: int) -> str | None:
        """The model-version part of the model a project's predictions come from: its adapted model's when
        this process holds one, else the served model's (None while it loads)."""
        adapted = self.adaptations.known(project_id)
        if adapted is None:
            return self.model_tag
        return f"{model_name(self.settings.model)}-adapted-{model_fingerprint(adapted)}"  # wherever it was loaded from

    def model_status(self) -> tuple[str, str | None]:
        """("UP" | "LOADING" | "ERROR", a short public reason): reads two attributes, takes no lock."""
        if self._model is not None:
            return "UP", None
        if self._model_error is not None:
            return "ERROR", f"the model {self.settings.model!r} failed to load (the server log says why)"
        return "LOADING", None

    def model(self, wait: float = 0.0):
        if self._model is None and not self._loaded.is_set():
            self.start_loading()
            self._loaded.wait(max(wait, 0.0))
        if self._model is not None:
            return self._model
        if self._model_error is not None:
            raise ModelNotReady(f"the model {self.settings.model!r} failed to load (the server log says why)")
        raise ModelNotReady(f"the model {self.settings.model!r} is still loading; try again in a moment")

    # ------------------------------------------------------------------------------- Label Studio API

    def api_for(self, record) -> tuple[str, str] | None:
        """(Label Studio URL, API key) for reading tasks.

        The configured key goes only to the configured URL (Settings refuses a key without a URL). Without
        a configured key, the token /setup carried goes to the URL /setup reported (the caller's own pair),
        and only if that URL passes the address policy (a public host, or one the operator allowed).
        """
        if self.settings.api_key:
            return (self.settings.label_studio_url.rstrip("/"), self.settings.api_key) \
                if self.settings.label_studio_url else None
        base = self.settings.label_studio_url or record.hostname
        if not base or not record.access_token:
            return None
        if not self.settings.label_studio_url and not self._reachable(base):
            return None
        return base.rstrip("/"), record.access_token

    def _reachable(self, url: str) -> bool:
        try:
            HostPolicy((), self.settings.allowed_hosts).check_url(url)
            return True
        except BlockedAddress as exc:
            log.warning("the Label Studio URL that /setup reported is not used: %s (set LABEL_STUDIO_URL)", exc)
            return False

    def connection_name(self, project_id: int, record, host: str | None, timeout: float) -> str | None:
        """The Name of the project's model connection to this backend (Settings > Model), which predictions
        carry: connecting makes it the project's prelabeling choice, and Label Studio's Prediction score column
        averages only the predictions named as that choice (data_manager/managers.py, annotate_predictions_score).

        Read through the API (the connection whose URL names `host`, the Host of Label Studio's request) and
        kept in the state; when Label Studio cannot be asked, the name found last. None: no such connection
        (predictions then carry the backend's own version).
        """
        api = self.api_for(record)
        if api is None:
            return record.name
        try:
            found = pick_connection(self.store.connections(project_id, *api, timeout=timeout), host=host)
        except Exception as exc:  # an HTTP error status, or httpx's transport errors
            log.info("project %s: cannot read the project's model connections (%s: %s); predictions keep the name "
                     "%r", project_id, type(exc).__name__, str(exc)[:200], record.name)
            return record.name
        if found != record.name:
            self.state.set_name(project_id, found)
            if found:
                log.info("project %s: predictions are named %r, the Name of its model connection", project_id, found)
            else:
                log.info("project %s: no model connection's URL names %s: predictions are named by the backend's "
                         "version", project_id, host)
        return found

    def fetcher_for(self, record) -> MediaFetcher:
        """The image downloader for a project: Label Studio's URL and key as api_for gives them."""
        api = self.api_for(record)
        base = api[0] if api else self.settings.label_studio_url
        key = api[1] if api else None
        trusted = bool(self.settings.label_studio_url) and base == self.settings.label_studio_url.rstrip("/")
        with self._lock:
            fetcher = self._fetchers.get((base, key, trusted))
            if fetcher is None:
                if len(self._fetchers) >= 32:  # URLs and tokens from /setup: keep a bounded few
                    self._fetchers.clear()
                fetcher = self._fetchers[(base, key, trusted)] = MediaFetcher(
                    base, key, max_bytes=int(self.settings.max_download_mb * (1 << 20)),
                    max_pixels=self.settings.max_image_pixels, allowed_hosts=self.settings.allowed_hosts,
                    trust_base=trusted)
            return fetcher


def pick_connection(connections: list, host: str | None = None) -> str | None:
    """The title of this backend's connection among a project's model connections (dicts with "title", "url",
    "model_version"): with `host` (in /setup), the one whose URL names it; without (seggpt labelstudio
    predict), the one whose version is its own title, as `serve` answers. None unless that is one name."""
    titled = [c for c in connections if isinstance(c, dict) and isinstance(c.get("title"), str) and c["title"]]
    if host:
        ours = [c for c in titled if _netloc(c.get("url")) == _netloc(f"//{host}")]
    else:
        ours = [c for c in titled if c.get("model_version") == c["title"]]
    names = {c["title"] for c in ours}
    return names.pop() if len(names) == 1 else None


VERSION_NAME = re.compile(r"seggpt-[A-Za-z0-9_.-]+-(r\d+-[0-9a-f]{8}|norefs)")  # SegGPTBackend.model_version


def older_own_prediction(model_version, name: str, names=()) -> bool:
    """Whether a prediction named `model_version` is one of this backend's that a prediction named `name`
    replaces: named by a version of this backend (`seggpt-<model>-<weights>-r<N>-<hash>`) or by one of
    `names` (the Name of the project's connection to this backend), and not `name` itself. Other backends'
    predictions (other names) are not."""
    if not isinstance(model_version, str) or model_version == name:
        return False
    return model_version in names or bool(VERSION_NAME.fullmatch(model_version))


def _netloc(url) -> str:
    """host[:port] of a URL, lower case, without a default port."""
    try:
        parts = urlsplit(str(url or ""))
        port = parts.port
    except ValueError:
        return ""
    host = (parts.hostname or "").lower()
    return host if port in (None, 80, 443) else f"{host}:{port}"


def model_name(source: str) -> str:
    name = Path(str(source).rstrip("/")).name or str(source)
    name = re.sub(r"\.(pth|pt|bin|safetensors)$", "", name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "model"


def model_fingerprint(model) -> str:
    """The weights' fingerprint (the core's SegGPT.fingerprint: the same at every precision), else a hash of
    the source name."""
    fingerprint = getattr(model, "fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint:
        return fingerprint
    return hashlib.sha256(str(getattr(model, "source", "")).encode()).hexdigest()[:6]
