"""Labelling at scale: one run over folders, globs, manifests or object stores, in-process or on Ray Data.

    from seggpt_plugins.scale import run
    summary = run(["data/"], [("ex.png", "ex_mask.png")], "out/", engine="ray", actors=2)

    from seggpt_plugins.scale import SegGPTPredictor          # for your own Ray Data pipeline
    ds.map_batches(SegGPTPredictor, fn_constructor_kwargs=dict(prompts=[("ex.png", "ex_mask.png")]),
                   compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1, batch_size=8)

Modules, in the order a run meets them: `sources` (what to read, listed lazily), `records` (fetch,
write, the per-input records that make a run resumable, the merge), `predictor` (the model and the
prompts, once per process or actor), `storage` (local or object-store output folders), `pipeline` (the
two engines). Ray is imported only by the "ray" engine.
"""

from importlib import import_module

_LAZY = {
    "run": "pipeline",
    "RunSummary": "pipeline",
    "ENGINES": "pipeline",
    "SegGPTPredictor": "predictor",
    "Item": "sources",
    "iter_sources": "sources",
    "check_sources": "sources",
    "Store": "storage",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
