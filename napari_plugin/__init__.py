"""napari adapter of seggpt-plugins: label one slice (or a few), let SegGPT propose the rest.

The npe2 manifest (``napari.yaml``) contributes the "SegGPT" dock widget and two sample data sets.
Importing this package is cheap: torch and the model load on the first run of the widget.

    viewer.window.add_plugin_dock_widget("seggpt-plugins", "SegGPT")
"""

__all__ = ["SegGPTWidget"]


def __getattr__(name):
    if name == "SegGPTWidget":
        from ._widget import SegGPTWidget

        return SegGPTWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
