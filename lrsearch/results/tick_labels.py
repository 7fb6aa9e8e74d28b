"""Tick labels that do not overlap: a formatter that labels only the chosen ticks, and the
layout that turns categories or thins numbers until a figure's labels fit."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter
    from matplotlib.transforms import Bbox


def _labels(
    inner: Formatter, kept: Sequence[float] | None = None, text: Callable[[str], str] | None = None
) -> Formatter:
    """A tick formatter that labels as ``inner`` does, but only the ticks in ``kept`` (all if
    None), each label passed through ``text``. Offsets, and what ``inner`` learns from all
    the ticks' positions (a log axis's minor labels), stay its own."""
    if isinstance(inner, _labels_class()):  # one wrapper: the new choice of ticks replaces the old
        inner, text = getattr(inner, "inner"), text or getattr(inner, "text")  # noqa: B009 (typed as a plain type)
    return _labels_class()(inner, kept, text)


@functools.cache
def _labels_class() -> type:
    from matplotlib.ticker import Formatter  # here: importing the report module draws nothing

    class Labels(Formatter):  # (inner, axis: Any where matplotlib's stubs want lists, or its private types)
        def __init__(self, inner: Any, kept: Sequence[float] | None, text: Callable[[str], str] | None) -> None:
            self.inner, self.kept, self.text = inner, kept, text

        def set_axis(self, axis: Any) -> None:
            super().set_axis(axis)
            self.inner.set_axis(axis)

        def set_locs(self, locs: Sequence[float]) -> None:
            super().set_locs(list(locs))
            self.inner.set_locs(locs)

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            return [self._label(v, label) for v, label in zip(values, self.inner.format_ticks(values))]

        def __call__(self, x: float, pos: int | None = None) -> str:
            return self._label(x, self.inner(x, pos))

        def get_offset(self) -> str:
            return self.inner.get_offset()

        def _label(self, x: float, label: str) -> str:
            if self.kept is not None and not any(math.isclose(x, k, rel_tol=1e-9, abs_tol=1e-12) for k in self.kept):
                return ""
            return self.text(label) if self.text else label

    return Labels


def _fit_tick_labels(fig: Figure, axes: Sequence[Axis], turn: Sequence[Axis] = ()) -> None:
    """Leave out the tick labels of each of ``axes`` (x or y Axis objects) that would overlap
    another of its labels as the figure draws: major ticks' first, then the minor ones a log
    axis labels, each in axis order. Those in ``turn`` (categories: each label is needed)
    are first turned, 30 degrees, then 90, while their labels overlap."""
    fig.canvas.draw()
    for angle in (30, 90):
        crowded = [axis for axis in turn if _overlap(_tick_labels(fig, axis))]
        if not crowded:
            break
        for axis in crowded:
            axis.set_tick_params(labelrotation=angle)
            for label in axis.get_ticklabels():
                label.set_horizontalalignment("right" if angle == 30 else "center")
                label.set_rotation_mode("anchor" if angle == 30 else "default")
        fig.canvas.draw()
    for axis in axes:
        kept: list[Bbox] = []
        for minor in (False, True):
            keep = []
            for loc, box in _tick_labels(fig, axis, minor):
                if not any(box.overlaps(other) for other in kept):
                    kept.append(box)
                    keep.append(loc)
            if minor:
                axis.set_minor_formatter(_labels(axis.get_minor_formatter(), kept=keep))
            else:
                axis.set_major_formatter(_labels(axis.get_major_formatter(), kept=keep))


# fig: a Figure drawn by Agg, whose canvas has get_renderer (Any: the base canvas's stub has none).
def _tick_labels(fig: Any, axis: Axis, minor: bool | None = None) -> list[tuple[float, Bbox]]:
    """(position, drawn extent with 2 pixels' margin) of the tick labels that ``axis`` drew:
    its major ticks', its minor ticks', or both (None)."""
    renderer = fig.canvas.get_renderer()
    low, high = sorted(axis.get_transform().transform(axis.get_view_interval()))
    slack = (high - low) * 1e-9
    out = []
    for is_minor in (False, True) if minor is None else (minor,):
        ticks = axis.get_minor_ticks() if is_minor else axis.get_major_ticks()
        for tick in ticks:
            where = axis.get_transform().transform(tick.get_loc())
            if not low - slack <= where <= high + slack:
                continue  # not drawn
            for label in (tick.label1, tick.label2):
                if label.get_visible() and label.get_text():
                    out.append((tick.get_loc(), label.get_window_extent(renderer).padded(2)))
    return out


def _overlap(labels: Sequence[tuple[float, Bbox]]) -> bool:
    boxes = [box for _, box in labels]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
