"""`seggpt labelstudio serve`: the Label Studio ML backend under gunicorn.

Importing this module loads argparse only (`seggpt --help` stays instant). The gunicorn master never
imports torch: each worker makes the Flask app after the fork and loads its own model in the background.
"""

from __future__ import annotations

import argparse
import os

from .bulk_cli import register_predict

ENV_HELP = """environment (used when the flag is not given):
  LABEL_STUDIO_URL        Label Studio's URL, e.g. http://localhost:8080
  LABEL_STUDIO_API_KEY    an access token (legacy token or personal access token) to read tasks and images
  SEGGPT_MODEL            model source (default: auto: the hub weights if cached, else demo)
  SEGGPT_DEVICE           cuda, mps or cpu
  BASIC_AUTH_USER / BASIC_AUTH_PASS   require HTTP basic auth from Label Studio
  SEGGPT_ALLOWED_HOSTS    comma-separated private hosts that may serve task images (as --allow-host)
  SEGGPT_SERVER_NAMES     comma-separated names this backend is reached by (as --server-name)
  SEGGPT_STATE_DIR        where project settings and references persist (as --state-dir)
  SEGGPT_MAX_PROMPTS, SEGGPT_BATCH_SIZE, SEGGPT_PREDICT_TIMEOUT, SEGGPT_MAX_REFERENCES, SEGGPT_CACHE_MB,
  SEGGPT_MAX_DOWNLOAD_MB, SEGGPT_MAX_IMAGE_PIXELS, SEGGPT_MIN_AREA, SEGGPT_POLYGON_TOLERANCE,
  SEGGPT_ENSEMBLE (feature, spatial, both), SEGGPT_TILE (pixels or auto), SEGGPT_HALO: defaults of the
  extra_params of the same names
  SEGGPT_QUALITY          fast (default) or full: the predictions' scores; full ranks a run's images better
                          for review and reads each image mirrored too (twice the time)

Label Studio side, for a backend on the same machine: SSRF_PROTECTION_ENABLED=false ML_BLOCK_LOCAL_IP=false;
a prediction call is cut after ML_TIMEOUT_PREDICT seconds (default 100)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("labelstudio", help="Label Studio ML backend (pre-annotation with SegGPT)",
                                   description="Label Studio ML backend: masks proposed from the project's own "
                                               "annotated tasks.")
    commands = parser.add_subparsers(dest="labelstudio_command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the ML backend over HTTP (gunicorn)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENV_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                       "another address needs basic auth, or --insecure)")
    serve.add_argument("--port", type=int, default=9090, help="port (default: %(default)s)")
    serve.add_argument("--model", default=None, help="hub id, transformers directory, Painter .pth, 'demo' or "
                       "'auto' (default: $SEGGPT_MODEL, else the hub weights if cached, else demo)")
    serve.add_argument("--device", default=None, help="cuda, mps or cpu (default: $SEGGPT_DEVICE or the best available)")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: $SEGGPT_DTYPE, else bf16 "
                       "on CUDA and on CPUs that compute it in hardware, else fp32)")
    serve.add_argument("--quantize", choices=["int8"], default=None,
                       help="CPU: int8 linear layers, the fastest CPU path (default: $SEGGPT_QUANTIZE, else none)")
    serve.add_argument("--workers", type=int, default=1, help="processes, one model each (default: %(default)s)")
    serve.add_argument("--threads", type=int, default=4, help="request threads per process; inference is "
                       "serialised per process, the threads keep /health answering (default: %(default)s)")
    serve.add_argument("--label-studio-url", default=None, help="Label Studio's URL (default: $LABEL_STUDIO_URL)")
    serve.add_argument("--api-key", default=None, help="Label Studio access token (default: $LABEL_STUDIO_API_KEY; "
                       "prefer the variable: flags show in the process list)")
    serve.add_argument("--basic-auth-user", default=None, help="HTTP basic auth user (default: $BASIC_AUTH_USER)")
    serve.add_argument("--basic-auth-pass", default=None, help="HTTP basic auth password (default: $BASIC_AUTH_PASS)")
    serve.add_argument("--max-prompts", type=int, default=None, help="references per target (default: 4)")
    serve.add_argument("--batch-size", type=int, default=None, help="targets per forward pass (default: 8)")
    serve.add_argument("--predict-timeout", type=float, default=None, help="seconds one /predict may take; tasks "
                       "not reached get no prediction and are done by the next retrieval (default: 90, under "
                       "Label Studio's ML_TIMEOUT_PREDICT=100)")
    serve.add_argument("--allow-host", action="append", default=None, metavar="HOST",
                       help="a private host (name, name:port, IP or network) that may serve task images; "
                       "repeatable (default: $SEGGPT_ALLOWED_HOSTS; Label Studio's own host is always allowed)")
    serve.add_argument("--server-name", action="append", default=None, metavar="NAME",
                       help="a name Label Studio reaches this backend by (the Host header), e.g. "
                       "host.docker.internal; repeatable (default: $SEGGPT_SERVER_NAMES)")
    serve.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without basic auth")
    serve.add_argument("--adapt-seconds", type=float, default=None, metavar="S",
                       help="after each annotation, adapt the model to the project's references for at most S "
                       "seconds in the background (Label Studio's fit on webhooks; the next predictions use it "
                       "when it does better; saved in the state directory) (default: $SEGGPT_ADAPT_SECONDS, else 0: off)")
    serve.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                       help="and for at most N steps (the learning-rate schedule spans them) "
                       "(default: $SEGGPT_ADAPT_STEPS, else 300)")
    serve.add_argument("--state-dir", default=None, help="where project settings and references persist "
                       "(default: $SEGGPT_STATE_DIR or ~/.local/state/seggpt-labelstudio)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=cmd_serve)
    register_predict(commands)

    def usage(args) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=usage)


def cmd_serve(args) -> int:
    import logging
    import sys

    from .netguard import is_loopback
    from .settings import Settings, default_state_dir

    def fail(message: str) -> int:
        print(f"seggpt labelstudio serve: {message}", file=sys.stderr)
        return 2

    if not 0 < args.port < 65536:
        return fail(f"--port must be 1..65535, got {args.port}")
    if args.workers < 1 or args.threads < 1:
        return fail("--workers and --threads must be >= 1")
    try:
        import flask  # noqa: F401
        import gunicorn  # noqa: F401
        import label_studio_sdk  # noqa: F401
    except ImportError as exc:
        return fail(f"{exc.name} is missing; install the extra (pip install -e '.[labelstudio]' in a clone of seggpt-plugins)")
    try:
        settings = Settings.from_env(
            label_studio_url=args.label_studio_url, api_key=args.api_key, model=args.model, device=args.device,
            dtype=args.dtype, quantize=args.quantize, basic_auth_user=args.basic_auth_user, basic_auth_pass=args.basic_auth_pass,
            max_prompts=args.max_prompts, batch_size=args.batch_size, predict_timeout=args.predict_timeout,
            state_dir=args.state_dir, adapt_seconds=args.adapt_seconds, adapt_steps=args.adapt_steps,
            allowed_hosts=args.allow_host, server_names=args.server_name,
            bind_host=args.host)
    except ValueError as exc:
        return fail(str(exc))
    if not is_loopback(args.host) and not settings.basic_auth_user and not args.insecure:
        return fail(f"--host {args.host} accepts other machines: set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the "
                    "same in Label Studio's model connection), or pass --insecure")
    settings.state_dir = os.path.abspath(os.path.expanduser(settings.state_dir or default_state_dir()))
    try:
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the state directory {settings.state_dir}: {exc.strerror or exc}")
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("seggpt_plugins.labelstudio").setLevel(level)
    if level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Label Studio API call otherwise
    log = logging.getLogger("seggpt_plugins.labelstudio")
    if not is_loopback(args.host) and not settings.basic_auth_user:
        log.warning("listening on %s without basic auth (--insecure): anyone who reaches this port can use the "
                    "backend", args.host)
    if not settings.label_studio_url or not settings.api_key:
        log.warning("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not both set: the Label Studio URL and token "
                    "that /setup reports are used, if that URL is a public host or allowed (--allow-host)")
    log.info("settings: %s", settings.public())
    if args.workers > 1 and not os.environ.get("SEGGPT_THREADS"):
        # every worker would otherwise run as many CPU threads as the machine has cores: N times too many
        from seggpt_plugins.loading import cpu_count

        os.environ["SEGGPT_THREADS"] = str(max(1, cpu_count() // args.workers))
    _Gunicorn(settings, {
        "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
        "workers": args.workers,
        "worker_class": "seggpt_plugins.labelstudio.worker.HealthFirstWorker",  # gthread + /health threads
        "threads": args.threads,
        "timeout": 120,  # gthread workers heartbeat while requests run: this only catches hung workers
        "graceful_timeout": int(settings.predict_timeout + 15),  # SIGTERM: in-flight predictions finish
        "keepalive": 5,
        "preload_app": False,  # never import torch (or touch CUDA) in the master before forking
        "loglevel": args.log_level,
        "errorlog": "-",
        "accesslog": "-" if args.log_level == "debug" else None,
        "proc_name": "seggpt-labelstudio",
        "control_socket_disable": True,  # gunicorn >= 25: one shared ~/.gunicorn/gunicorn.ctl would clash
    }).run()
    return 0


def _application_class():
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):
        def __init__(self, settings, options):
            self.settings = settings
            self.options = options
            super().__init__()

        def load_config(self):
            for key, value in self.options.items():
                if value is not None and key in self.cfg.settings:  # newer settings are skipped on older gunicorn
                    self.cfg.set(key, value)

        def load(self):  # runs in each worker after the fork (preload_app is off)
            from .server import create_app

            return create_app(self.settings)

    return Application


def _Gunicorn(settings, options):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _application_class()(settings, options)
