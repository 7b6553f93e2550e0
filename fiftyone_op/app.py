"""How a run's output looks in the App: the review order (an index on the confidence field, so the App's
"Sort by" offers it), colours that stand apart from the source field, and the fields to switch on.

    present(dataset, opts, kind)        # after a commit (or before shards run): index, description, colours
    shown_fields(ctx.active_fields, opts)  # the sidebar's active fields plus the new one
    colour_fields(dataset)              # the dataset's field colours, for the App's set_color_scheme

The colours are saved with the dataset (`app_config.color_scheme`); an open App keeps the colour scheme of
its session, so an immediate run also sends them to it (set_color_scheme).
"""

from __future__ import annotations

from seggpt_plugins.fiftyone.fields import DETECTIONS
from seggpt_plugins.fiftyone.options import CONFIDENCE_DESCRIPTION, Options

# predictions: warm colours; the source field, when it has no colours of its own: cool ones
PREDICTION_COLORS = ("#ff6d04", "#e6194b", "#ffd60a", "#f032e6", "#ff9f80", "#b80c09", "#fabed4", "#9a6324")
SOURCE_COLORS = ("#1e90ff", "#00c2c7", "#3cb44b", "#4363d8", "#7fdbff", "#2e8b57", "#a0c4ff", "#005f73")


def present(dataset, opts: Options, kind: str) -> None:
    """Index and describe the confidence field, and colour the output apart from the source field."""
    dataset.create_index(opts.confidence_field)
    field = dataset.get_field(opts.confidence_field)
    if field is not None and field.description != CONFIDENCE_DESCRIPTION:
        field.description = CONFIDENCE_DESCRIPTION
        field.save()
    colour(dataset, opts, kind)


def colour(dataset, opts: Options, kind: str) -> None:
    """Colour entries in the dataset's App colour scheme: the output gets warm colours not used by the
    source field, the source field cool ones; only fields without an entry get one (set colours are kept)."""
    import fiftyone as fo

    scheme = dataset.app_config.color_scheme or fo.ColorScheme()
    entries = {e.get("path"): e for e in (scheme.fields or [])}
    if opts.output_field in entries and opts.label_field in entries:
        return
    values = _values(dataset, opts.label_field, kind)
    source = entries.get(opts.label_field)
    if source is None:
        source = entries[opts.label_field] = _entry(opts.label_field, kind, values, SOURCE_COLORS)
    taken = {str(c).lower() for c in _colours_of(source)}
    palette = tuple(c for c in PREDICTION_COLORS if c not in taken) or PREDICTION_COLORS
    entries.setdefault(opts.output_field, _entry(opts.output_field, kind, values, palette))
    scheme.fields = list(entries.values())
    dataset.app_config.color_scheme = scheme
    dataset.save()


def _values(dataset, field: str, kind: str) -> list:
    """Integer mask targets (Segmentation) or classes (Detections) of the source field, if declared."""
    if kind == DETECTIONS:
        return list(dataset.classes.get(field) or [])
    targets = dataset.mask_targets.get(field) or dataset.default_mask_targets or {}
    return sorted(t for t in targets if isinstance(t, int) and t > 0)


def _entry(path: str, kind: str, values: list, palette) -> dict:
    entry = {"path": path, "fieldColor": palette[0]}
    if kind == DETECTIONS and values:
        entry["colorByAttribute"] = "label"
        entry["valueColors"] = [{"value": v, "color": palette[i % len(palette)]} for i, v in enumerate(values)]
    elif values:
        entry["maskTargetsColors"] = [{"intTarget": v, "color": palette[i % len(palette)]}
                                      for i, v in enumerate(values)]
    return entry


def _colours_of(entry: dict) -> list[str]:
    found = [entry.get("fieldColor")]
    found += [c.get("color") for c in entry.get("maskTargetsColors") or []]
    found += [c.get("color") for c in entry.get("valueColors") or []]
    return [c for c in found if c]


def shown_fields(active: list | None, opts: Options) -> list[str]:
    """The App's active sidebar fields with the output field (and its source) switched on."""
    fields = list(active or [])
    for name in (opts.label_field, opts.output_field):
        if name not in fields:
            fields.append(name)
    return fields


def colour_fields(dataset) -> list[dict]:
    """The per-field colours saved with the dataset (what the App's set_color_scheme takes as `fields`)."""
    scheme = dataset.app_config.color_scheme
    return [dict(e) for e in (scheme.fields or [])] if scheme is not None else []
