"""FiftyOne adapter of seggpt-plugins: this folder is both a FiftyOne plugin (`fiftyone.yml` + `register`)
and a Python package (`seggpt_plugins.fiftyone.cli` adds `seggpt fiftyone install`).

FiftyOne imports this file as a module from the plugin folder; nothing heavy is imported here, so that
`seggpt --help` (which imports `seggpt_plugins.fiftyone.cli`) stays instant.
"""


def register(p):
    """Called by FiftyOne with its plugin context."""
    from .operators import PropagateLabels

    p.register(PropagateLabels)
