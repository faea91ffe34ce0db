"""Which |w| the analysis bins by: the run's final values, or the values recorded at one step.

A run that is still recording, or whose writer was killed, has no final values (``final`` is NaN
until the Recorder closes). Its magnitudes then come from the last recorded row, and every result
says so: ``MagnitudeSource.attrs()`` goes into the results' attrs (and from there into the JSON and
``save_delta``), ``label``/``describe()`` into the figure and the table. ``magnitudes_at`` is the one
function that makes the choice; every analysis that bins by magnitude calls it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import xarray as xr

from corrtools.errors import CorrtoolsError

__all__ = ["MagnitudeAt", "MagnitudeSource", "magnitude_labels", "magnitudes_at", "parse_magnitude_at"]

# "final": the values at close; "last": the last recorded row; an int: the row of that optimizer
# step; None: "final" when the run has final values, else "last"
MagnitudeAt = Union[Literal["final", "last"], int, None]


@dataclass(frozen=True)
class MagnitudeSource:
    """Where the binned |w| come from: ``kind`` "final" (values at close) or "step" (a recorded row),
    ``step`` the optimizer step of that row (for "final": the run's total_steps, -1 if unknown),
    ``why`` a short reason when the choice was automatic and not "final"."""

    kind: Literal["final", "step"]
    step: int
    why: str = ""

    @property
    def label(self) -> str:
        """Axis-label form: "final |w|" or "|w| at step 200"."""
        return "final |w|" if self.kind == "final" else f"|w| at step {self.step}"

    def describe(self) -> str:
        """One line for titles and table headers, with the reason when there is one."""
        return self.label + (f" ({self.why})" if self.why else "")

    def attrs(self) -> dict[str, Any]:
        """Attrs for results: magnitude_at ("final" | "step"), magnitude_step, magnitude_label."""
        return {"magnitude_at": self.kind, "magnitude_step": int(self.step), "magnitude_label": self.describe()}



def magnitude_labels(attrs: dict[str, Any]) -> tuple[str, str]:
    """(axis label, one-line description) of the magnitudes a result was binned by, from its attrs
    (results made before ``magnitude_at`` existed were binned by final |w|)."""
    if attrs.get("magnitude_at", "final") == "final":
        return "final |w|", str(attrs.get("magnitude_label", "final |w|"))
    short = MagnitudeSource("step", int(attrs["magnitude_step"])).label
    return short, str(attrs.get("magnitude_label", short))


def parse_magnitude_at(text: str | int | None) -> MagnitudeAt:
    """``"final"``, ``"last"``, ``"auto"`` (→ None) or a step number, as given on the command line."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("final", "last"):
        return t  # type: ignore[return-value]
    if t == "auto":
        return None
    try:
        return int(t)
    except ValueError:
        raise CorrtoolsError(
            f"magnitude_at={text!r} is not 'final', 'last', 'auto' or a step number; e.g. --magnitude-at last"
        ) from None


def _has_final(ds: xr.Dataset) -> bool:
    return bool(np.isfinite(np.asarray(ds["final"].values, dtype=np.float64)).any())


def _row_of_step(steps: np.ndarray, step: int) -> int:
    i = int(np.searchsorted(steps, step))
    if i < steps.size and steps[i] == step:
        return i
    if steps.size == 0:
        raise CorrtoolsError(f"magnitude_at={step} asks for a recorded step, but the run has no rows yet; wait for some.")
    near = sorted({int(steps[max(i - 1, 0)]), int(steps[min(i, steps.size - 1)])})
    raise CorrtoolsError(
        f"magnitude_at={step} is not a recorded step (the run has steps {int(steps[0])}..{int(steps[-1])}); "
        f"pick one that is, e.g. {' or '.join(map(str, near))}."
    )


def magnitudes_at(
    ds: xr.Dataset, cols: Sequence[int] | np.ndarray | None = None, magnitude_at: MagnitudeAt = None
) -> tuple[np.ndarray, MagnitudeSource]:
    """|w| (k,) float64 of the weight columns ``cols`` (default all) of a run opened with ``open_run``,
    and where they come from.

    ``magnitude_at``: "final" (the values at close; an error if the run has none), "last" (the last
    recorded row), a recorded optimizer step (that row), or None: "final" when the run has final
    values, else "last" — so a run that is still recording, or was interrupted, is binned by the
    magnitudes it had at its last recorded row. Reads at most one row of ``values``.
    """
    at = parse_magnitude_at(magnitude_at)
    idx = np.arange(ds.sizes["weight"]) if cols is None else np.asarray(cols)
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    has_final = _has_final(ds)
    if at == "final" or (at is None and has_final):
        if not has_final:
            raise CorrtoolsError(
                "the run has no final values (it is still recording or was interrupted); "
                "bin by the last recorded row with magnitude_at='last' (--magnitude-at last)."
            )
        mag = np.abs(np.asarray(ds["final"].values, dtype=np.float64)[idx])
        return mag, MagnitudeSource("final", int(ds.attrs.get("total_steps", -1) or -1))
    if at is None or at == "last":
        if steps.size == 0:
            raise CorrtoolsError("the run has no recorded rows yet; wait until the Recorder has written some.")
        row = steps.size - 1
        why = "" if at == "last" else "last recorded row: the run has no final values yet"
    else:
        row = _row_of_step(steps, int(at))
        why = ""
    values = ds["values"].isel(step=row, weight=idx)
    mag = np.abs(np.asarray(values.values, dtype=np.float64))
    return mag, MagnitudeSource("step", int(steps[row]), why)
