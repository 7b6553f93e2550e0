"""Label Studio ML backend for SegGPT: masks proposed from the project's own annotated tasks.

    seggpt labelstudio serve --port 9090          # gunicorn; see docs/labelstudio.md

    from seggpt_plugins.labelstudio import create_app     # the Flask app (e.g. for another WSGI server)
    app = create_app()                             # settings from the environment

Importing this package is cheap: Flask, the SDK and torch load on first use.
"""

from importlib import import_module

_LAZY = {"create_app": "server", "SegGPTBackend": "backend", "Services": "services", "Settings": "settings"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
