"""The HTTP protocol Label Studio 1.23 speaks to an ML backend, served with Flask 3.

    GET  /health   -> {"status": "UP", "model_status": "UP" | "LOADING", ...}   (500 if the model failed)
    POST /setup    {project, schema, hostname, access_token, extra_params} -> {"model_version"}
    POST /predict  {tasks, project, label_config, params} -> {"results": [one item per task], "model_version"}
    POST /webhook  {action, annotation, task, project, ...} -> 201
    POST /train    (Label Studio's "Start training") -> 201; with --adapt-seconds an adaptation (adapting.py)
    GET  /versions -> {"versions": [...]}
    GET  /metrics  -> counters and cache statistics (JSON)

Errors are JSON `{"error": "..."}` with a 4xx status for bad requests: Label Studio shows that message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import time
from urllib.parse import urlsplit

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .backend import SegGPTBackend
from .labeling import ConfigError
from .netguard import is_loopback
from .params import RequestError, check_params, parse_project_id
from .services import ModelNotReady, Services
from .settings import Settings

log = logging.getLogger("seggpt_plugins.labelstudio")

SETUP_BUDGET_S = 2.5  # Label Studio gives /setup 3 s (ML_TIMEOUT_SETUP): the connection's name, then the listing
SETUP_NAME_TIMEOUT_S = 1.0
ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                     "TASKS_DELETED", "PROJECT_UPDATED", "START_TRAINING"}


def import_request_modules() -> None:
    """Import what the first /setup and /predict read with (the labeling config's parser, the Label Studio
    client) before the model's loader thread starts. Imported beside it, while it imports torch, they made a
    restarted worker's first /setup take about Label Studio's 3 s for it (and Label Studio sends nothing to a
    backend whose /setup fails)."""
    import importlib

    for module in ("label_studio_sdk", "label_studio_sdk.label_interface"):  # LabelStudio, LabelInterface
        importlib.import_module(module)


def create_app(settings: Settings | None = None, services: Services | None = None, load_model: bool = True) -> Flask:
    """The Flask app. Made in each gunicorn worker (after the fork); the model loads in a background thread."""
    settings = settings or (services.settings if services else Settings.from_env())
    services = services or Services(settings)
    if load_model:
        import_request_modules()
        services.start_loading()
    app = Flask(__name__, root_path=os.path.dirname(os.path.abspath(__file__)))
    app.config["MAX_CONTENT_LENGTH"] = body_limit(settings, "/predict")
    app.json.sort_keys = False
    app.extensions["seggpt"] = services

    def error(message: str, status: int):
        services.metrics.add(f"errors_{status}")
        return jsonify({"error": message}), status

    def body() -> dict:
        data = request.get_json(silent=True)  # read up to the route's limit (set in admit), else 413
        if data is None:
            raise RequestError("the request body must be JSON (Content-Type: application/json)")
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    @app.before_request
    def admit():
        """Before anything is read or checked: the body size, then the Host header, then credentials."""
        g.started = time.monotonic()
        services.metrics.add(f"requests_{request.endpoint or 'unknown'}")
        limit = body_limit(settings, request.path)
        request.max_content_length = limit  # a body without Content-Length is cut at the limit too
        if request.content_length is not None and request.content_length > limit:
            return error(f"the request body is {request.content_length} bytes, more than the limit of {limit} for "
                         f"{request.path[:40]} (SEGGPT_MAX_REQUEST_MB); retrieve predictions for fewer tasks at a "
                         "time", 413)
        if not host_allowed(request.host, settings):
            log.warning("refused a request for Host %r (not a name this backend serves; see --server-name)",
                        request.host[:100])
            return error("this backend does not serve that Host name (add it with --server-name)", 421)
        g.authenticated = bool(settings.basic_auth_user) and _basic_auth_ok(
            request.headers.get("Authorization", ""), settings.basic_auth_user, settings.basic_auth_pass)
        if not settings.basic_auth_user or g.authenticated:
            return None
        if request.path == "/webhook" and request.method == "POST":
            # Label Studio's own ML webhook carries no credentials (unless a header is added to it in
            # Settings > Webhooks): its payload is not trusted, it only makes the references be listed again
            return None
        response, status = error("authentication required: this ML backend uses HTTP basic auth (in the Label "
                                 "Studio model connection: Select authentication method > Basic Authentication)",
                                 401)
        response.headers["WWW-Authenticate"] = 'Basic realm="seggpt"'
        return response, status

    @app.errorhandler(RequestError)
    def on_request_error(exc):
        # Label Studio shows only a generic dialog for some 4xx (a refused /setup): the reason is in this log
        project = g.get("project")
        log.warning("%s%s %s refused (HTTP %d): %s", f"project {project}: " if project is not None else "",
                    request.method, request.path[:40], exc.status, str(exc).replace("\n", " "))
        return error(str(exc), exc.status)

    @app.errorhandler(ConfigError)
    def on_config_error(exc):
        return error(str(exc), 422)

    @app.errorhandler(ModelNotReady)
    def on_not_ready(exc):
        return error(str(exc), 503)

    @app.errorhandler(HTTPException)
    def on_http_error(exc):
        if exc.code == 413:
            return error(f"the request body is more than the limit of {body_limit(settings, request.path)} bytes for "
                         f"{request.path[:40]} (SEGGPT_MAX_REQUEST_MB)", 413)
        return error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def on_unexpected(exc):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error("internal error (the server log has the details)", 500)

    @app.get("/")
    @app.get("/health")
    def health():
        """UP (200) as soon as the worker listens, the model loaded or still loading ("model_status"): Label
        Studio checks /health (1 s) and /setup (3 s) before each /predict and sends nothing while they fail,
        and /predict waits for the model within its deadline, so a task opened right after a restart is
        predicted. A model that failed to load is an ERROR (500)."""
        status, problem = services.model_status()
        body = {"status": "UP" if status in ("UP", "LOADING") else status, "model_status": status,
                "model_class": "SegGPTBackend", "model": settings.model, "model_version": services.model_tag}
        if problem:
            body["error"] = problem
        return jsonify(body), 500 if status == "ERROR" else 200

    @app.post("/setup")
    def setup():
        data = body()
        project_id = g.project = parse_project_id(data.get("project"))
        params = check_params(data.get("extra_params"))
        hostname = data.get("hostname") or None
        if hostname is not None and (not isinstance(hostname, str) or urlsplit(hostname).scheme not in ("http", "https")
                                     or not urlsplit(hostname).netloc):
            hostname = None  # not a URL Label Studio can be reached at: ignored
        token = data.get("access_token") if isinstance(data.get("access_token"), str) else None
        services.state.set_setup(project_id, params, hostname, token or None)
        schema = data.get("schema")
        backend = SegGPTBackend(project_id, schema if schema else None, services)
        # predictions carry the connection's Name (the prelabeling choice connecting sets, which the Prediction
        # score column matches exactly), and /setup answers it too: Label Studio skips the tasks that have a
        # prediction of the version /setup answers, and prelabels with those predictions
        if not (backend.record.name and services.model_status()[0] == "LOADING"):
            backend.record.name = services.connection_name(project_id, backend.record, request.host,
                                                           SETUP_NAME_TIMEOUT_S)
        # else: right after a (re)start the worker is busy loading the model and asking Label Studio could take
        # more than its 3 s: the name kept in the state answers, and the next /setup reads it again
        left = SETUP_BUDGET_S - (time.monotonic() - g.started)
        refs = backend.refresh_references(timeout=max(0.5, left))
        if not backend.record.name:  # the answer is the backend's version, which has the weights' fingerprint
            services.model(wait=max(0.0, SETUP_BUDGET_S - (time.monotonic() - g.started)))
        version = backend.model_version(refs)
        name = backend.prediction_name(version)
        log.info("project %s: setup: %d reference(s), params %s, model version %s%s", project_id, len(refs), params,
                 version, f", predictions named {name!r}" if name != version else "")
        return jsonify({"model_version": name})

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("'tasks' must be a non-empty list of Label Studio tasks")
        if not all(isinstance(t, dict) for t in tasks):
            raise RequestError("every item of 'tasks' must be a task object ({\"id\": ..., \"data\": {...}})")
        project_id = g.project = parse_project_id(data.get("project") if data.get("project") is not None
                                                  else tasks[0].get("project"))
        label_config = data.get("label_config")
        if not label_config:
            raise RequestError("'label_config' (the project's labeling config) is required")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        backend = SegGPTBackend(project_id, label_config, services)
        results = backend.predict(tasks, context=params.get("context"), started=g.started)
        services.metrics.add("predict_seconds", round(time.monotonic() - g.started, 3))
        return jsonify({"results": results, "model_version": backend.prediction_name(backend.model_version())})

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise RequestError("a webhook body needs an 'action' (e.g. ANNOTATION_CREATED)")
        services.metrics.add(f"webhook_{action}")
        if action not in ANNOTATION_EVENTS:
            return jsonify({"status": "ignored", "action": action}), 200
        project = data.get("project")
        project = project.get("id") if isinstance(project, dict) else project
        if project is None:
            annotation = data.get("annotation")
            project = annotation.get("project") if isinstance(annotation, dict) else None
        if project is None:
            raise RequestError(f"{action}: the payload names no project")
        backend = SegGPTBackend(parse_project_id(project), None, services)
        if not payload_trusted(backend):  # Label Studio is asked instead: the references are listed again
            return jsonify(backend.fit(action, {}, hint_only=True)), 201
        return jsonify(backend.fit(action, data)), 201

    def payload_trusted(backend) -> bool:
        """A webhook's annotations become prompts only from a client that proved who it is (basic auth), or,
        when Label Studio cannot be asked (no URL and key), from loopback with basic auth off."""
        if g.get("authenticated"):
            return True
        if services.api_for(backend.record) is not None:
            return False
        if settings.basic_auth_user or (settings.bind_host is not None and not is_loopback(settings.bind_host)):
            log.warning("project %s: an unauthenticated webhook is not used, and without LABEL_STUDIO_URL and "
                        "LABEL_STUDIO_API_KEY the references cannot be listed", backend.project_id)
            return False
        return True

    @app.post("/train")
    def train():
        data = request.get_json(silent=True) or {}
        project = data.get("project") if isinstance(data, dict) else None
        if project not in (None, ""):
            backend = SegGPTBackend(parse_project_id(project), None, services)
            answer = backend.fit("START_TRAINING", {})
            if "adaptation" in answer:
                return jsonify({"status": "ok", "detail": answer["adaptation"]}), 201
        return jsonify({"status": "ok", "detail": "SegGPT learns from the annotated tasks in context: nothing to "
                                                  "train (--adapt-seconds adapts it to them); the references will "
                                                  "be listed again"}), 201

    @app.get("/versions")
    def versions():
        data = request.get_json(silent=True) or {}
        project = data.get("project") if isinstance(data, dict) else None
        if project in (None, ""):
            return jsonify({"versions": [f"seggpt-{services.model_tag or settings.model}"]})
        backend = SegGPTBackend(parse_project_id(project), None, services)
        return jsonify({"versions": [backend.prediction_name(backend.model_version())]})

    @app.get("/metrics")
    def metrics():
        status, _ = services.model_status()
        snapshot = services.metrics.snapshot()
        snapshot.update({"model": settings.model, "model_status": status, "model_tag": services.model_tag,
                         "model_busy": services.inference_lock.locked(),  # a request holds the model now
                         "reference_listings": services.store.listings, "image_cache": services.images.stats(),
                         "mask_cache": services.masks.stats()})
        adaptations = services.adaptations
        if adaptations.enabled:  # the project being adapted now, and how each project's last adaptation went
            snapshot["adaptation"] = {"seconds": adaptations.seconds, "running": adaptations.running,
                                      "last": {str(k): v for k, v in adaptations.last.items()}}
        return jsonify(snapshot)

    return app


SMALL_BODY = 64 << 10  # GET requests, /train
SETUP_BODY = 1 << 20  # a labeling config and a few params


def body_limit(settings: Settings, path: str) -> int:
    """The largest body a request to `path` may have: what a real one needs (/webhook less than /predict)."""
    predict = int(settings.max_request_mb * (1 << 20))
    if path == "/predict":
        return predict
    if path == "/webhook":  # one annotation (a brush RLE) and its task
        return max(SMALL_BODY, predict // 4)
    if path == "/setup":
        return min(predict, SETUP_BODY)
    return min(predict, SMALL_BODY)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str, settings: Settings) -> bool:
    """The Host header names this server (DNS rebinding: a page on evil.example whose name now resolves to
    127.0.0.1 sends Host: evil.example). IP literals are fine (no rebinding through them); names must be
    localhost on a loopback or wildcard bind, the bound name, or a --server-name."""
    if settings.bind_host is None:  # not started by `serve` (the test client, another WSGI server)
        return True
    name = _host_name(host_header or "")
    names = {n.lower() for n in settings.server_names}
    bind = settings.bind_host.strip("[]").lower()
    wildcard = bind in ("0.0.0.0", "::", "")
    if name in names or name == bind:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return wildcard or bind == "localhost" or is_loopback(bind)
    return wildcard and not names


def _basic_auth_ok(header: str, user: str, password: str) -> bool:
    if not header.lower().startswith("basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    given_user, _, given_pass = decoded.partition(":")
    ok_user = hmac.compare_digest(given_user.encode(), user.encode())
    ok_pass = hmac.compare_digest(given_pass.encode(), password.encode())
    return ok_user and ok_pass
