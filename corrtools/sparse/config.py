"""The Sparsifier's configuration: a structure value object and a frozen, validated config."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from corrtools.errors import CorrtoolsError
from corrtools.sparse import masks
from corrtools.sparse.allocation import ALLOCATIONS
from corrtools.sparse.exploit import Exploit, Fix, Regularize, Reset, exploit_from_dict

__all__ = ["SparsityConfig", "Structure"]

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)$")
_HELP = '"unstructured", "2:4" (any "n:m"), "2:4-2d" or "block:b" with b in ' + str(masks.BLOCK_SIZES)


@dataclass(frozen=True)
class Structure:
    """A mask structure, parsed from its text form: see :meth:`parse`."""

    kind: str  # "unstructured" | "nm" | "nm2d" | "block"
    n: int = 0  # kept per group ("nm")
    m: int = 0  # group length ("nm")
    block: int = 0  # tile side ("block")

    @classmethod
    def parse(cls, text: str) -> Structure:
        """``"unstructured"``, ``"n:m"`` (e.g. ``"2:4"``), ``"2:4-2d"`` or ``"block:b"``."""
        if not isinstance(text, str):
            raise CorrtoolsError(f"Structure {text!r} must be a string: {_HELP}.")
        t = text.strip().lower()
        if t == "unstructured":
            return cls("unstructured")
        if t == "2:4-2d":
            return cls("nm2d", 2, 4)
        if (hit := _NM.match(t)) is not None:
            n, m = int(hit.group(1)), int(hit.group(2))
            if not 0 < n <= m:
                raise CorrtoolsError(f"Structure {text!r} needs 0 < n <= m.")
            return cls("nm", n, m)
        if (hit := _BLOCK.match(t)) is not None:
            b = int(hit.group(1))
            if b not in masks.BLOCK_SIZES:
                raise CorrtoolsError(f"Structure {text!r}: block side must be one of {masks.BLOCK_SIZES}.")
            return cls("block", block=b)
        raise CorrtoolsError(f"Unknown structure {text!r}; use {_HELP}.")

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "nm2d":
            return "2:4-2d"
        if self.kind == "block":
            return f"block:{self.block}"
        return "unstructured"

    @property
    def fixed_density(self) -> float | None:
        """The density an N:M structure implies (n/m), or None when the density is free."""
        return self.n / self.m if self.kind in ("nm", "nm2d") else None

    @property
    def is_nm(self) -> bool:
        """True for the N:M structures, 1D or 2D (the ones with the conv channel rule)."""
        return self.kind in ("nm", "nm2d")

    def mask(self, w: Tensor, density: float, name: str = "weight") -> Tensor:
        """The mask of ``w`` under this structure (bool, shaped like ``w``)."""
        if self.kind == "unstructured":
            return masks.topk_mask(w, density, name=name)
        if self.kind == "nm":
            return masks.nm_mask(w, self.n, self.m, name=name)
        if self.kind == "nm2d":
            return masks.nm_mask_2d(w, name=name)
        return masks.block_mask(w, density, self.block, name=name)

    def masks(
        self,
        weights: Sequence[Tensor],
        density: float | Sequence[float],
        names: Sequence[str],
        *,
        global_threshold: bool = False,
    ) -> list[Tensor]:
        """:meth:`mask` of each weight (``names`` one per weight), batched where the structure can be.

        ``density``: one for all, or one per weight. 2:4-2d scores all the weights' tiles in one
        pass (:func:`masks.nm_mask_2d_many`). With ``global_threshold`` (one ``density``),
        unstructured and block masks use one magnitude threshold over all the weights together
        (:func:`masks.topk_mask_many`, :func:`masks.block_mask_many`); otherwise each weight is
        masked on its own, the same masks as calling :meth:`mask` on each.
        """
        if self.kind == "nm2d":
            return masks.nm_mask_2d_many(weights, names=names)
        if global_threshold and self.kind in ("unstructured", "block"):
            if not isinstance(density, (int, float)):
                raise CorrtoolsError("A global magnitude threshold takes one density, not one per layer.")
            if self.kind == "unstructured":
                return masks.topk_mask_many(weights, density)
            return masks.block_mask_many(weights, density, self.block, names=names)
        per = [density] * len(weights) if isinstance(density, (int, float)) else list(density)
        return [self.mask(w, d, name=name) for w, d, name in zip(weights, per, names)]


@dataclass(frozen=True)
class SparsityConfig:
    """Algorithm 1's settings. Defaults are the paper's (r = 1, s = 1, NO EXPLOIT, one global τ).

    ``density`` and ``structure`` here are the defaults; per-layer values given to the Sparsifier
    are kept in its plan (:meth:`Sparsifier.state_dict`).
    """

    density: float | None = None  # d, fraction participating; None: n/m for N:M, else 0.5
    structure: str = "unstructured"  # see Structure.parse; stored in canonical form
    allocation: str = "global"  # how d spreads over layers: "global" (one |w| threshold), "uniform", "erk"
    rewire_every: int = 1  # r, optimizer steps between mask recomputations
    grad_scale: float = 1.0  # s, factor on the weight gradient of non-participating weights
    exploit: Exploit | None = None  # Fix / Reset / Regularize, or None (NO EXPLOIT)
    total_steps: int | None = None  # planned optimizer steps; needed by Fix

    def __post_init__(self) -> None:
        parsed = Structure.parse(self.structure)
        object.__setattr__(self, "structure", str(parsed))
        implied = parsed.fixed_density
        d = self.density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1):
            raise CorrtoolsError(f"density={d!r} must be a fraction in (0, 1].")
        if implied is not None and d is not None and abs(d - implied) > 1e-12:
            raise CorrtoolsError(
                f"Structure {parsed} keeps exactly {implied:g} of the weights; "
                f"pass density=None or {implied:g}, not {d!r}."
            )
        resolved = implied if implied is not None else (0.5 if d is None else d)
        object.__setattr__(self, "density", float(resolved))
        if self.allocation not in ALLOCATIONS:
            raise CorrtoolsError(f"allocation={self.allocation!r} must be one of {ALLOCATIONS}.")
        r = self.rewire_every
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise CorrtoolsError(f"rewire_every={r!r} must be a whole number of steps >= 1.")
        s = self.grad_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s:
            raise CorrtoolsError(f"grad_scale={s!r} must be a number >= 0.")
        object.__setattr__(self, "grad_scale", float(s))
        if self.exploit is not None and not isinstance(self.exploit, (Fix, Reset, Regularize)):
            raise CorrtoolsError(
                f"exploit={self.exploit!r} must be Fix(...), Reset(...), Regularize(...) or None."
            )
        t = self.total_steps
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise CorrtoolsError(f"total_steps={t!r} must be a whole number of steps >= 1.")
        if isinstance(self.exploit, Fix) and t is None:
            raise CorrtoolsError("Fix(at=...) needs total_steps: pass the planned number of optimizer steps.")

    @property
    def parsed_structure(self) -> Structure:
        return Structure.parse(self.structure)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for a run store's attrs)."""
        return {
            "density": self.density,
            "structure": self.structure,
            "allocation": self.allocation,
            "rewire_every": self.rewire_every,
            "grad_scale": self.grad_scale,
            "exploit": None if self.exploit is None else self.exploit.to_dict(),
            "total_steps": self.total_steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        fields = dict(data)
        fields["exploit"] = exploit_from_dict(fields.get("exploit"))
        fields.setdefault("allocation", "uniform")  # saved before allocations existed: per layer
        return cls(**fields)

    def resumable_from(self, other: SparsityConfig) -> bool:
        """Whether a run saved with ``other`` can continue under this config: equal, except
        ``total_steps`` when the exploit does not use it (only Fix does)."""
        if isinstance(self.exploit, Fix) or isinstance(other.exploit, Fix):
            return self == other
        return dataclasses.replace(self, total_steps=None) == dataclasses.replace(other, total_steps=None)
