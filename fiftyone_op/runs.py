"""Scheduled (delegated) runs, as the open-source App can show them: it has no queue view of its own, so
the operator's form lists the newest runs of the operator on the dataset, with their state.

    scheduled_runs(dataset_name)   # ['Propagate labels with SegGPT -> pred (<id>): running, 40% (...)', ...]

(A notification at scheduling time is not possible here: for generator operators the App drops the
operations a scheduled run's response asks it to trigger.)
"""

from __future__ import annotations

import datetime

OPERATOR = "@seggpt/seggpt/propagate_labels"
LAUNCH = "fiftyone delegated launch"
RECENT = datetime.timedelta(days=1)  # finished runs older than this are not listed


def scheduled_runs(dataset_name: str, limit: int = 4) -> list[str]:
    """'<label> (<id>): <state>' for the operator's newest runs on the dataset (queued, running, or finished
    in the last day); [] when there are none or the queue cannot be read."""
    from fiftyone.factory import DelegatedOperationPagingParams
    from fiftyone.operators.delegated import DelegatedOperationService

    try:
        ops = DelegatedOperationService().list_operations(
            operator=OPERATOR, dataset_name=dataset_name, paging=DelegatedOperationPagingParams(limit=limit))
    except Exception:  # the form must not fail for this
        return []
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # the queue's times are naive UTC
    lines = []
    for op in ops:
        finished = op.completed_at or op.failed_at
        if finished is not None and now - finished.replace(tzinfo=None) > RECENT:
            continue
        lines.append(f"{op.label or op.operator} ({op.id}): {_state(op)}")
    return lines


def _state(op) -> str:
    state = str(op.run_state).lower()
    if state == "queued":
        return f"queued, waiting for a worker (`{LAUNCH}`)"
    if state == "running" and op.status is not None and op.status.progress is not None:
        return f"running, {op.status.progress:.0%}" + (f" ({op.status.label})" if op.status.label else "")
    if state == "failed" and op.result is not None and getattr(op.result, "error_message", None):
        return f"failed: {op.result.error_message.splitlines()[0][:200]}"
    return "done" if state == "completed" else state
