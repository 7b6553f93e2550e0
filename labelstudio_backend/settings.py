"""Backend settings: command-line flags, with environment variables as fallbacks. Imports nothing heavy."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from seggpt_plugins.vocabulary import AUTO_MODEL, MIN_OBJECT_AREA, SEG_TYPES


def default_state_dir() -> str:
    """Where project settings and references persist when neither --state-dir nor $SEGGPT_STATE_DIR says."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "seggpt-labelstudio")


def _env(name: str, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected an integer") from None


def _env_float(name: str, default: float) -> float:
    value = _env(name)
    try:
        return float(value) if value is not None else default
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a number") from None


def _env_tile(name: str):
    """A tile setting: None (unset, empty or 0: no tiling), "auto" or a number of pixels."""
    value = (_env(name) or "").strip().lower()
    if value in ("", "0", "none", "off"):
        return None
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected 'auto' or a number of pixels") from None


def _env_list(name: str) -> tuple:
    return tuple(item.strip() for item in (_env(name) or "").split(",") if item.strip())


@dataclass
class Settings:
    label_studio_url: str | None = None  # LABEL_STUDIO_URL
    api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY (legacy token or PAT)
    model: str = AUTO_MODEL  # SEGGPT_MODEL; "auto": the one default rule (seggpt_plugins.loading.resolve_source)
    device: str | None = None  # SEGGPT_DEVICE
    dtype: str | None = None  # SEGGPT_DTYPE: float32, bfloat16, float16; None: the core's choice (loading.pick_dtype)
    quantize: str | None = None  # SEGGPT_QUANTIZE: "int8" = int8 linear layers on the CPU
    basic_auth_user: str | None = None  # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS
    max_prompts: int = 4  # SEGGPT_MAX_PROMPTS: references per target (feature ensemble)
    batch_size: int = 8  # SEGGPT_BATCH_SIZE: targets per forward pass
    seg_type: str = "instance"  # SEGGPT_SEG_TYPE
    predict_timeout: float = 90.0  # SEGGPT_PREDICT_TIMEOUT: seconds; keep below Label Studio's ML_TIMEOUT_PREDICT
    max_references: int = 256  # SEGGPT_MAX_REFERENCES: most recent annotated tasks considered per project
    refresh_seconds: float = 10.0  # SEGGPT_REFRESH_SECONDS: reuse a reference listing this long
    max_download_mb: float = 100.0  # SEGGPT_MAX_DOWNLOAD_MB
    max_image_pixels: int = 1 << 26  # SEGGPT_MAX_IMAGE_PIXELS (67 M)
    cache_mb: float = 1024.0  # SEGGPT_CACHE_MB: reference images and masks kept in memory per worker
    min_area: int = MIN_OBJECT_AREA  # SEGGPT_MIN_AREA: smaller predicted parts join a neighbour or are dropped
    polygon_tolerance: float = 1.0  # SEGGPT_POLYGON_TOLERANCE: polygon simplification (pixels)
    ensemble: str = "feature"  # SEGGPT_ENSEMBLE: feature, spatial or both (a project's extra_params override)
    tile: int | str | None = None  # SEGGPT_TILE: tiles of this many pixels, or "auto"; None: no tiling
    halo: int = 32  # SEGGPT_HALO: pixels each tile overlaps its neighbours by
    quality: str = "fast"  # SEGGPT_QUALITY: the prediction's score; full reads the mirrored image too (2x the time)
    max_request_mb: float = 64.0  # SEGGPT_MAX_REQUEST_MB: largest /predict body (/webhook: a quarter, /setup: 1 MB)
    max_request_pixels: int = 1 << 27  # SEGGPT_MAX_REQUEST_PIXELS: decoded pixels one request holds at once (134 M)
    state_dir: str | None = None  # SEGGPT_STATE_DIR: project settings and references that survive restarts
    adapt_seconds: float = 0.0  # SEGGPT_ADAPT_SECONDS: adapt to a project's annotations for at most this long (0: off)
    adapt_steps: int = 300  # SEGGPT_ADAPT_STEPS: and for at most this many steps (the learning-rate schedule spans them)
    allowed_hosts: tuple = ()  # SEGGPT_ALLOWED_HOSTS (comma-separated): private hosts that may serve task images
    server_names: tuple = ()  # SEGGPT_SERVER_NAMES (comma-separated): Host header names besides the bound address
    bind_host: str | None = None  # the address served on (set by `serve`): the Host header is checked against it

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = dict(
            label_studio_url=_env("LABEL_STUDIO_URL"),
            api_key=_env("LABEL_STUDIO_API_KEY"),
            model=_env("SEGGPT_MODEL", AUTO_MODEL),
            device=_env("SEGGPT_DEVICE"),
            dtype=_env("SEGGPT_DTYPE"),
            quantize=_env("SEGGPT_QUANTIZE"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=_env("BASIC_AUTH_PASS"),
            max_prompts=_env_int("SEGGPT_MAX_PROMPTS", 4),
            batch_size=_env_int("SEGGPT_BATCH_SIZE", 8),
            seg_type=_env("SEGGPT_SEG_TYPE", "instance"),
            predict_timeout=_env_float("SEGGPT_PREDICT_TIMEOUT", 90.0),
            max_references=_env_int("SEGGPT_MAX_REFERENCES", 256),
            refresh_seconds=_env_float("SEGGPT_REFRESH_SECONDS", 10.0),
            max_download_mb=_env_float("SEGGPT_MAX_DOWNLOAD_MB", 100.0),
            max_image_pixels=_env_int("SEGGPT_MAX_IMAGE_PIXELS", 1 << 26),
            cache_mb=_env_float("SEGGPT_CACHE_MB", 1024.0),
            min_area=_env_int("SEGGPT_MIN_AREA", MIN_OBJECT_AREA),
            polygon_tolerance=_env_float("SEGGPT_POLYGON_TOLERANCE", 1.0),
            ensemble=_env("SEGGPT_ENSEMBLE", "feature"),
            tile=_env_tile("SEGGPT_TILE"),
            halo=_env_int("SEGGPT_HALO", 32),
            quality=_env("SEGGPT_QUALITY", "fast"),
            max_request_mb=_env_float("SEGGPT_MAX_REQUEST_MB", 64.0),
            max_request_pixels=_env_int("SEGGPT_MAX_REQUEST_PIXELS", 1 << 27),
            state_dir=_env("SEGGPT_STATE_DIR"),
            adapt_seconds=_env_float("SEGGPT_ADAPT_SECONDS", 0.0),
            adapt_steps=_env_int("SEGGPT_ADAPT_STEPS", 300),
            allowed_hosts=_env_list("SEGGPT_ALLOWED_HOSTS"),
            server_names=_env_list("SEGGPT_SERVER_NAMES"),
        )
        for name in ("allowed_hosts", "server_names"):  # flags add to the variable's list
            values[name] = tuple(dict.fromkeys(values[name] + tuple(overrides.pop(name, None) or ())))
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.max_prompts < 1:
            problems.append(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seg_type not in SEG_TYPES:
            problems.append(f"seg_type must be one of {SEG_TYPES}, got {self.seg_type!r}")
        from seggpt_plugins.ensembles import ENSEMBLES, tile_size
        from seggpt_plugins.loading import DTYPE_NAMES, QUANTIZE_CHOICES
        from seggpt_plugins.quality import QUALITIES
        from seggpt_plugins.errors import InputError

        if self.dtype not in (None, "auto", *DTYPE_NAMES):
            problems.append(f"SEGGPT_DTYPE must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in (None, "none", *QUANTIZE_CHOICES):
            problems.append(f"SEGGPT_QUANTIZE must be int8 (or unset), got {self.quantize!r}")
        if self.ensemble not in ENSEMBLES:
            problems.append(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.quality not in QUALITIES:
            problems.append(f"SEGGPT_QUALITY must be {' or '.join(QUALITIES)}, got {self.quality!r}")
        try:
            tile_size(self.tile, self.halo)
        except InputError as exc:
            problems.append(f"SEGGPT_TILE/SEGGPT_HALO: {exc}")
        if self.adapt_seconds < 0:
            problems.append(f"adapt_seconds must be >= 0 (0: no adaptation), got {self.adapt_seconds}")
        if self.adapt_steps < 1:
            problems.append(f"adapt_steps must be >= 1, got {self.adapt_steps}")
        if self.predict_timeout <= 0:
            problems.append(f"predict_timeout must be > 0 seconds, got {self.predict_timeout}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            problems.append("basic auth needs both a user and a password (BASIC_AUTH_USER and BASIC_AUTH_PASS)")
        if self.api_key and not self.label_studio_url:
            problems.append("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is sent only to the Label "
                            "Studio you name; set LABEL_STUDIO_URL (--label-studio-url) too")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            problems.append(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def public(self) -> dict:
        """The settings without secrets (for logs and /health)."""
        values = asdict(self)
        for secret in ("api_key", "basic_auth_pass"):
            values[secret] = "***" if values[secret] else None
        return values
