"""Which weights a Sparsifier masks: default rules, include/exclude, shared weights, MHA.

A pure function of the model's structure (no masks, no state): :func:`select_layers` returns one
:class:`Selected` per weight to sparsify, in model order, with every module that computes with it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

from torch import nn

from corrtools.errors import CorrtoolsError, close_matches
from corrtools.sparse.config import Structure
from corrtools.sparse.ops import layer_kind

__all__ = ["Selected", "Selector", "select_layers"]

# A layer selector: a module name ("blocks.0.mlp.fc1"), its weight's name ("...fc1.weight"),
# or a predicate (name, module) -> bool; or an iterable of those.
Predicate = Callable[[str, nn.Module], bool]
Selector = Union[str, Predicate, Iterable[Union[str, Predicate]]]

_KINDS_TEXT = "Linear, Conv1d, Conv2d and Hugging Face Conv1D"


@dataclass(frozen=True)
class Selected:
    """One weight to sparsify."""

    name: str  # parameter name of its first user, e.g. "blocks.0.mlp.fc1.weight"
    module_names: tuple[str, ...]  # every module that computes with this weight (shared: several)
    modules: tuple[nn.Module, ...]
    explicit: bool  # named by include=


def param_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def select_layers(
    model: nn.Module,
    structure_of: Callable[[str, nn.Module], Structure],
    include: Selector | None,
    exclude: Selector | None,
) -> list[Selected]:
    """The weights to sparsify, in model order: per weight, (default ∪ include) − exclude.

    Default: the weights of Linear / Conv1d / Conv2d / HF Conv1D layers, except the output
    projection (the last ``nn.Linear`` in module order), weights also used by a module that reads
    them directly (e.g. an ``nn.Embedding`` tied to a head), ``nn.MultiheadAttention``'s
    ``out_proj`` (MHA reads its weight without calling it; left dense with a warning), and, as in
    the paper (Appendix B.1), convolutions with ``in_channels % 16 != 0``; for N:M structures also
    grouped convolutions. A weight shared by several such layers is masked in all of them. Naming
    a weight in ``exclude`` through any of its layers excludes it. Naming in ``include`` a weight
    that a mask cannot reach (tied to an embedding, inside MHA) is an error.
    """
    modules = dict(model.named_modules())
    kinds = {n: layer_kind(m) for n, m in modules.items()}
    candidates = {n: m for n, m in modules.items() if kinds[n] is not None}
    holders: dict[int, list[tuple[str, str]]] = {}  # id(param) -> [(module name, param name)]
    for mname, m in modules.items():
        for pname, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, pname))
    in_mha = {
        n for n in candidates for a, m in modules.items() if isinstance(m, nn.MultiheadAttention) and n.startswith(f"{a}.")
    }
    linears = [n for n, m in candidates.items() if isinstance(m, nn.Linear)]
    output_projection = linears[-1] if linears else None
    included = _matching(include, "include", candidates, modules)
    excluded = _matching(exclude, "exclude", candidates, modules)

    def default_for(name: str) -> bool:
        m = candidates[name]
        if name == output_projection or name in in_mha:
            return False
        if kinds[name] == "conv":
            if m.in_channels % 16:  # type: ignore[operator]
                return False
            if m.groups != 1 and structure_of(name, m).is_nm:
                return False
        return True

    out: list[Selected] = []
    seen: set[int] = set()
    mha_left: list[str] = []
    for name, module in candidates.items():
        key = id(module.weight)
        if key in seen:
            continue
        seen.add(key)
        users = holders.get(key, [(name, "weight")])
        layer_users = [u for u, p in users if p == "weight" and u in candidates]
        direct = [(u, p) for u, p in users if not (p == "weight" and u in candidates)]
        if set(layer_users) & excluded:
            continue
        explicit = bool(set(layer_users) & included)
        default = not direct and all(default_for(u) for u in layer_users)
        if not (explicit or default):
            mha_left += [param_name(u) for u in layer_users if u in in_mha]
            continue
        if direct:
            u, p = direct[0]
            raise CorrtoolsError(
                f"The weight of {param_name(name)!r} is also {u}.{p} of a {type(modules[u]).__name__}, which "
                f"reads it directly, so a mask cannot reach it there; exclude {name!r} or untie the weights."
            )
        for u in layer_users:
            if u in in_mha:
                raise CorrtoolsError(
                    f"{param_name(u)!r} belongs to an nn.MultiheadAttention, which reads the weight "
                    "directly without calling the layer, so a mask would have no effect; leave it out."
                )
        out.append(
            Selected(param_name(name), tuple(layer_users), tuple(candidates[u] for u in layer_users), explicit)
        )
    if mha_left:
        warnings.warn(
            "Sparsifier: nn.MultiheadAttention reads its out_proj weight directly, so a mask would have "
            f"no effect; left dense: {', '.join(mha_left)}.",
            stacklevel=3,
        )
    return out


def _matching(
    selector: Selector | None,
    role: str,
    candidates: dict[str, nn.Module],
    all_modules: dict[str, nn.Module],
) -> set[str]:
    """Module names (of layers) that ``selector`` names or whose predicate holds."""
    if selector is None:
        return set()
    items = [selector] if isinstance(selector, str) or callable(selector) else list(selector)
    out: set[str] = set()
    for item in items:
        if callable(item):
            out |= {n for n, m in candidates.items() if item(n, m)}
            continue
        if not isinstance(item, str):
            raise CorrtoolsError(
                f"{role} entries must be layer names or predicates (name, module) -> bool, not {item!r}."
            )
        out.add(resolve_layer_name(item, role, candidates, all_modules))
    return out


def resolve_layer_name(
    item: str, role: str, candidates: dict[str, nn.Module], all_modules: dict[str, nn.Module]
) -> str:
    """The module name a user's layer name (``"fc1"`` or ``"fc1.weight"``) refers to, or a clear error."""
    name = item[: -len(".weight")] if item.endswith(".weight") else item
    if name == "weight":
        name = ""
    if name in candidates:
        return name
    if name in all_modules:
        raise CorrtoolsError(
            f"{role} names {item!r}, a {type(all_modules[name]).__name__}; only {_KINDS_TEXT} layers "
            "can be sparsified."
        )
    raise CorrtoolsError(
        f"{role} names {item!r}, which is not a Linear/Conv layer of the model"
        f"{close_matches(item, sorted(set(candidates) | {param_name(n) for n in candidates if n}))}."
    )
