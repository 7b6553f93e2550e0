"""What a request may ask for: project ids and the `extra_params` a project sets in its ML backend connection.

Checked here, before any work: a bad value is a 400 with a message that names it (RequestError).
"""

from __future__ import annotations

import difflib
import json
import re

from seggpt_plugins.ensembles import ENSEMBLES, tile_size
from seggpt_plugins.errors import InputError
from seggpt_plugins.vocabulary import SEG_TYPES

MAX_PROJECT_ID = (1 << 63) - 1  # Label Studio's ids are 64-bit integers (and so are SQLite's)
PARAMS = {  # extra_params a project may set in its ML backend connection, with their checks
    "reference_task_ids": "a list of task ids whose annotations are the prompts (default: all annotated tasks)",
    "references": "'annotated' (default: every annotated task is a reference) or 'ground_truth' (only tasks whose "
                  "annotation is marked ground truth, the star in Label Studio: the ones you chose)",
    "max_prompts": "references per target, 1..64 (most similar first)",
    "seg_type": " or ".join(repr(t) for t in SEG_TYPES),
    "prefer": "'brush' or 'polygon': the output of a label that both kinds of control have",
    "min_area": "predicted parts smaller than this many pixels join the object they touch or are dropped "
                "(default 16, the core's object rule)",
    "polygon_tolerance": "polygon simplification in pixels (0: every contour pixel)",
    "objects": "true: one brush region per object; false: one brush region per label (polygons are always "
               "one per object)",
    "split_touching": "true: touching objects are split by a watershed (default false, as in every host)",
    "ensemble": "how several references meet the model: " + ", ".join(repr(e) for e in ENSEMBLES)
                + " (default 'feature')",
    "tile": "large images are cut into tiles of this many pixels (or 'auto': six object diameters of the references; larger references are cut to their most labelled tile), segmented "
            "at that scale and stitched back (default: no tiling)",
    "halo": "pixels each tile overlaps its neighbours by, below half the tile (default 32)",
    "keep_old_predictions": "true: a task predicted again keeps this backend's predictions of older versions "
                            "(default false: they are deleted once the new one is posted)",
}
NOT_IN_VERSION = ("keep_old_predictions",)  # params that do not change what is predicted
MAX_TILE = 1 << 16
REFERENCE_CHOICES = ("annotated", "ground_truth")


class RequestError(ValueError):
    """A request Label Studio (or another client) sent cannot be served; answered with 4xx and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_project_id(project) -> int:
    """Label Studio sends "<id>.<created timestamp>"; plain ids are accepted too."""
    problem = f"'project' must be a project id like \"3.1700000000\", got {str(project)[:80]!r}"
    if _is_int(project):
        value = project
    elif isinstance(project, str) and re.fullmatch(r"\d{1,19}(\.\d{1,30})?", project.strip()):
        value = int(project.strip().split(".")[0])
    else:
        raise RequestError(problem)
    if not 0 <= value <= MAX_PROJECT_ID:
        raise RequestError(problem)
    return value


def task_id_of(value) -> int | None:
    """A task id as an integer, or None when it is not one (a list, a string of letters, a huge number)."""
    if _is_int(value) and 0 <= value <= MAX_PROJECT_ID:
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{1,19}", value.strip()) and int(value) <= MAX_PROJECT_ID:
        return int(value)
    return None


def _unknown_key(key: str) -> str:
    """An unknown extra_params key, with the known one it is most likely a typo of."""
    close = difflib.get_close_matches(key, PARAMS, n=1, cutoff=0.7)
    return f"{key[:40]!r} (did you mean {close[0]!r}?)" if close else repr(key[:40])


def check_params(extra) -> dict:
    """extra_params from /setup (a dict or a JSON string) -> checked params; RequestError names what is wrong."""
    if extra in (None, "", {}):
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise RequestError(f"extra_params is not valid JSON ({exc}); e.g. {{\"max_prompts\": 4}}") from None
    if not isinstance(extra, dict):
        raise RequestError(f"extra_params must be a JSON object, got {type(extra).__name__}")
    unknown = sorted(set(map(str, extra)) - set(PARAMS))
    if unknown:
        raise RequestError(f"extra_params: unknown key(s) {', '.join(map(_unknown_key, unknown[:10]))}; known keys: "
                           + ", ".join(PARAMS))
    params = {}
    if extra.get("reference_task_ids") is not None:
        ids = extra["reference_task_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int(i) and 0 < i <= MAX_PROJECT_ID for i in ids):
            raise RequestError("extra_params.reference_task_ids must be a non-empty list of task ids (integers)")
        params["reference_task_ids"] = sorted(set(ids))
    if extra.get("references") is not None:
        if extra["references"] not in REFERENCE_CHOICES:
            raise RequestError(f"extra_params.references must be 'annotated' or 'ground_truth', "
                               f"got {extra['references']!r:.40}")
        params["references"] = extra["references"]
    if extra.get("max_prompts") is not None:
        value = extra["max_prompts"]
        if not _is_int(value) or not 1 <= value <= 64:
            raise RequestError(f"extra_params.max_prompts must be an integer from 1 to 64, got {value!r:.40}")
        params["max_prompts"] = value
    if extra.get("seg_type") is not None:
        if extra["seg_type"] not in SEG_TYPES:
            raise RequestError(f"extra_params.seg_type must be {PARAMS['seg_type']}, got {extra['seg_type']!r:.40}")
        params["seg_type"] = extra["seg_type"]
    if extra.get("prefer") is not None:
        if extra["prefer"] not in ("brush", "polygon"):
            raise RequestError(f"extra_params.prefer must be 'brush' or 'polygon', got {extra['prefer']!r:.40}")
        params["prefer"] = extra["prefer"]
    if extra.get("min_area") is not None:
        value = extra["min_area"]
        if not _is_int(value) or not 0 <= value <= MAX_PROJECT_ID:
            raise RequestError(f"extra_params.min_area must be an integer >= 0, got {value!r:.40}")
        params["min_area"] = value
    if extra.get("polygon_tolerance") is not None:
        value = extra["polygon_tolerance"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
            raise RequestError(f"extra_params.polygon_tolerance must be a number from 0 to 100, got {value!r:.40}")
        params["polygon_tolerance"] = float(value)
    for flag in ("objects", "split_touching", "keep_old_predictions"):
        if extra.get(flag) is not None:
            if not isinstance(extra[flag], bool):
                raise RequestError(f"extra_params.{flag} must be true or false, got {extra[flag]!r:.40}")
            params[flag] = extra[flag]
    if extra.get("ensemble") is not None:
        if extra["ensemble"] not in ENSEMBLES:
            raise RequestError(f"extra_params.ensemble must be one of {', '.join(map(repr, ENSEMBLES))}, "
                               f"got {extra['ensemble']!r:.40}")
        params["ensemble"] = extra["ensemble"]
    if extra.get("tile") is not None:
        value = extra["tile"]
        if value != "auto" and (not _is_int(value) or not 2 <= value <= MAX_TILE):
            raise RequestError(f"extra_params.tile must be 'auto' or a number of pixels from 2 to {MAX_TILE}, "
                               f"got {value!r:.40}")
        params["tile"] = value
    if extra.get("halo") is not None:
        value = extra["halo"]
        if not _is_int(value) or not 0 <= value < MAX_TILE:
            raise RequestError(f"extra_params.halo must be an integer >= 0 (pixels), got {value!r:.40}")
        params["halo"] = value
    if "tile" in params:
        try:
            tile_size(params["tile"], params.get("halo", 32))
        except InputError as exc:
            raise RequestError(f"extra_params.tile/halo: {exc}") from None
    return params
