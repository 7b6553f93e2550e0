"""Export from the widget: Labels layers as label TIFFs and one COCO instances file, for the next tool.

Each exported layer is a `LabelSet`: its label planes and a name per plane (the image's file name for
a series, `<layer>#z12` for a slice of a stack). Files are written with the core's `io.OutputSet`
(all or nothing, never over an existing file) and `export.CocoWriter` (RLE masks). No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from seggpt_plugins.errors import InputError
from seggpt_plugins.export import Category, CocoWriter, categories_for
from seggpt_plugins.instances import Instances, find_instances
from seggpt_plugins.io import OutputSet

COCO_FILE = "coco.json"
OBJECT = Category(1, "object")  # the one category of instance maps (each id one object)


@dataclass
class LabelSet:
    """One Labels layer to export: `data` (..., H, W), one file name per plane, and where its maps go."""

    data: np.ndarray
    names: list[str]  # per plane, in np.ndindex order of the leading axes
    files: list[str]  # label TIFFs, relative to the export folder: one per plane, or one for the whole stack

    def planes(self):
        for name, key in zip(self.names, np.ndindex(*self.data.shape[:-2])):
            yield name, np.asarray(self.data[key])


def plane_names(base: str, shape, axis_labels=()) -> list[str]:
    """`base` for a 2D layer; `base#z3` (or `base#t1_z3`; `base#3` for unnamed axes) for a stack's planes."""
    leading = tuple(shape[:-2])
    if not leading:
        return [base]
    labels = [str(a) if str(a) and not str(a).lstrip("-").isdigit() else ""
              for a in list(axis_labels)[:len(leading)]]
    labels += [""] * (len(leading) - len(labels))
    return [f"{base}#" + "_".join(f"{a}{i}" for a, i in zip(labels, key)) for key in np.ndindex(*leading)]


def objects_of(plane: np.ndarray, objects: bool) -> Instances:
    """The plane's objects: each id one object of class 'object' (`objects`), or each id a class whose
    connected parts are its objects."""
    if objects:
        found = Instances.of_map(plane)
        return Instances(found.map, [replace(o, class_id=OBJECT.id) for o in found.objects])
    return find_instances(plane, min_area=1)


def export(sets: list[LabelSet], folder, objects: bool, overwrite: bool = False) -> list[Path]:
    """Write every set's label TIFFs and one `coco.json` into `folder`; returns the files written.
    InputError when a file exists (without `overwrite`; said in the widget's words, not the CLI's), or
    (from the core) the folder cannot be written."""
    folder = Path(folder)
    maps = [folder / f for s in sets for f in s.files]
    existing = [p for p in maps + [folder / COCO_FILE] if p.is_file()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the files to write)" if len(existing) > 1 else ""
        raise InputError(f"Not exported: {existing[0]} already exists{more}. Tick 'Overwrite' beside Export to "
                         "replace them, or choose another folder.")
    outputs = OutputSet(maps + [folder / COCO_FILE], overwrite=overwrite)
    if objects:
        categories = {OBJECT.id: OBJECT}
    else:
        ids = set()
        for s in sets:
            ids |= set(np.unique(s.data).tolist())
        categories = categories_for(ids, None)
    with outputs:
        coco = CocoWriter(outputs.stage(folder / COCO_FILE), categories)
        for s in sets:
            if len(s.files) == 1:
                outputs.write_tiff(folder / s.files[0], np.asarray(s.data))
            for k, (name, plane) in enumerate(s.planes()):
                if len(s.files) > 1:
                    outputs.write_tiff(folder / s.files[k], plane)
                coco.add(name, objects_of(plane, objects))
        coco.close()
    return outputs.paths
