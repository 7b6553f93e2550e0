"""What goes into a run of the Runner and what comes out: a `Target`, its `Result`, and the progress
`Event`s (with the `Tiling` of a large target) on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .instances import Instances
from .prediction import Prediction
from .prompts import PromptSet


@dataclass
class Target:
    """One image to segment.

    key: the caller's name for it (a path, a sample id, a task id), given back in its Result.
    image: an (H, W[, C]) array, a file path, or a callable that returns one (called in a reader thread:
        a download or a decode runs ahead of the device). A callable that raises `Missed` (e.g. a download
        the deadline cut) leaves the target `missed`, not failed.
    name: how messages name it (default: the key).
    exclude: keys of the pool's examples it must not be shown (e.g. itself).
    prompts: its own prepared prompts, in place of the runner's choice.
    relabel: a function of its predicted labels (H, W) that gives the labels kept, applied before they are
        judged (propagation's object tracks: ids that follow the objects).
    """

    key: Any
    image: Any
    name: str | None = None
    exclude: tuple = ()
    prompts: PromptSet | None = None
    relabel: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Result:
    """What the run made of one target: a prediction (with objects when asked), or why not."""

    key: Any
    index: int  # the target's position in the run
    prediction: Prediction | None = None
    instances: Instances | None = None  # its objects (Runner(objects=ObjectRule(...)))
    prompts: tuple = ()  # keys of the pool's examples it was shown (() for a prepared PromptSet)
    error: str | None = None  # why there is no prediction
    missed: bool = False  # not started before the deadline or a cancel: a later run may try again
    skipped: bool = False  # nothing to show it (NO_EXAMPLES): not a failure
    rgb: np.ndarray | None = field(default=None, repr=False)  # the target as segmented (keep_images=True)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    @property
    def confidence(self) -> float:
        """The prediction's confidence (its predicted IoU, else its mean snap score); NaN without one."""
        return float(self.prediction.confidence) if self.prediction is not None else float("nan")


@dataclass(frozen=True)
class Event:
    """Progress: kind "tile" (done of total tiles of target `key`; `tiling` says how it is cut), "image" or
    "failed" (done of total targets finished so far; total None when the run's length is unknown)."""

    kind: str
    key: Any
    done: int
    total: int | None
    tiling: "Tiling | None" = None


@dataclass(frozen=True)
class Tiling:
    """How a target is cut: tiles of `tile` (height, width) pixels overlapping by `halo` on each side, and
    `count` of them; `auto` when the size came from the examples (tile "auto")."""

    tile: tuple[int, int]
    halo: int
    count: int
    auto: bool

    def __str__(self) -> str:
        how = " (auto: the examples' scale)" if self.auto else ""
        return f"{self.count} tiles of {self.tile[1]}x{self.tile[0]} px, halo {self.halo}{how}"
