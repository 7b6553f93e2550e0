"""FiftyOne adapter of seggpt-plugins: this folder is both a FiftyOne plugin (`fiftyone.yml` + `register`)
and the Python package `seggpt_plugins.fiftyone` (`seggpt_plugins.fiftyone.cli` adds `seggpt fiftyone install`).

FiftyOne imports this file as a module of its own name from the plugin folder; `register` imports the
operator by its canonical, absolute name, so every module of the adapter is loaded once per process (one
model cache, one set of constants), whether FiftyOne or Python imported it first. Nothing heavy is
imported here, so that `seggpt --help` (which imports `seggpt_plugins.fiftyone.cli`) stays instant.

Modules: `operators` (propagate_labels: the App form, execution modes, sharding), `adapt_operator`
(adapt_seggpt's form and run), `forms` (form parts both operators share), `progress` (how their runs talk
to the App), `adapting` (the model adapted to the labelled samples of a view), `plan` (checks, prompts and
targets), `options`, `fields`, `models` (the models offered), `codecs` (labels <-> label maps), `segment`
(prediction), `videos` (video datasets: frame labels propagated through each video), `commit` (staging
and the crash-safe commit), `evaluation`, `app` (how the App shows the output), `runs` (where scheduled
runs are), `cli`.
"""


def register(p):
    """Called by FiftyOne with its plugin context."""
    from seggpt_plugins.fiftyone.adapt_operator import AdaptSeggpt
    from seggpt_plugins.fiftyone.operators import PropagateLabels

    p.register(PropagateLabels)
    p.register(AdaptSeggpt)
