"""How both FiftyOne operators' runs talk to the App (operators.py, adapt_operator.py): progress relayed to the
App or to the delegated operation, a generator run to its end, and a failed immediate run shown as stopped."""

from __future__ import annotations

import fiftyone.operators.types as types

from seggpt_plugins.errors import SegGPTError


def _relay(ctx, steps):
    """Forward (fraction, label) steps as progress: App messages when immediate, ctx.set_progress (stored
    on the delegated operation) when delegated. Returns the steps' summary."""
    while True:
        try:
            fraction, label = next(steps)
        except StopIteration as stop:
            return stop.value
        if ctx.delegated:
            ctx.set_progress(progress=fraction, label=label)
        else:
            yield ctx.ops.set_progress(label=label, progress=fraction)


def _drain(run):
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value


def _stopped(ctx, exc):
    """A failed immediate run: the App's progress line says it stopped (not '0% Loading model' forever),
    and a notification says why."""
    message = str(exc) if isinstance(exc, SegGPTError) else f"{type(exc).__name__}: {exc}"
    outputs = types.Object()
    outputs.view("stopped", types.Error(label="SegGPT stopped", description=message))
    yield ctx.ops.show_output(types.Property(outputs).to_json(), {})
    yield ctx.ops.notify(f"SegGPT stopped: {message}", variant="error")
