"""The Sparsifier: Algorithm 1 as a drop-in object for any PyTorch training loop.

It owns the masks and a step counter; the mask math is in :mod:`masks`, the autograd in
:mod:`ops`, the exploitation in :mod:`exploit`. Call ``sp.step()`` after ``optimizer.step()``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError, close_matches
from corrtools.sparse.config import SparsityConfig, Structure
from corrtools.sparse.exploit import (
    Exploit,
    Fix,
    Regularize,
    Reset,
    decay_nonparticipating_,
    zero_nonparticipating_,
    zero_optimizer_state_,
)
from corrtools.sparse.ops import MASK_BUFFER, MASKABLE, is_masked, mask_module_, unmask_module_

__all__ = ["LayerReport", "Selector", "Sparsifier"]

# A layer selector: a module name ("blocks.0.mlp.fc1"), its weight's name ("...fc1.weight"),
# or a predicate (name, module) -> bool; or an iterable of those.
Predicate = Callable[[str, nn.Module], bool]
Selector = Union[str, Predicate, Iterable[Union[str, Predicate]]]


@dataclass(frozen=True)
class LayerReport:
    """One row of :meth:`Sparsifier.density_report`."""

    name: str  # parameter name, e.g. "blocks.0.mlp.fc1.weight"
    structure: str  # canonical structure text, e.g. "2:4-2d"
    shape: tuple[int, ...]
    numel: int
    density: float  # fraction of this weight participating now
    rewired_last: int  # weights that joined p at the most recent rewiring
    rewired_total: int  # weights that joined p, summed over all rewirings so far


# Consecutive step() calls without an optimizer step before a warning (GradScaler skips a few).
_SKIPS_BEFORE_WARNING = 25


class _StepFlag:
    """An optimizer step post-hook that records that the optimizer stepped (picklable)."""

    def __init__(self) -> None:
        self.stepped = False

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.stepped = True


@dataclass
class _Layer:
    module: nn.Module
    rewired_last: Tensor  # 0-d int64, kept on the weight's device (no sync per step)
    rewired_total: Tensor

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def mask(self) -> Tensor:
        return getattr(self.module, MASK_BUFFER)


class Sparsifier:
    """Algorithm 1: top-d weights by |w| participate; the rest get s-scaled gradients and are exploited.

    ``density`` (d): fraction participating; ``None`` means n/m for N:M structures and 0.5
    otherwise. ``structure``: ``"unstructured"``, ``"2:4"`` (any ``"n:m"``), ``"2:4-2d"`` or
    ``"block:b"``. ``rewire_every`` (r): optimizer steps between mask recomputations from |w|.
    ``grad_scale`` (s). ``exploit``: ``Fix``, ``Reset``, ``Regularize`` or ``None`` (NO EXPLOIT).
    ``total_steps``: planned optimizer steps (needed by ``Fix``). ``optimizer``: any optimizer; a
    step hook on it tells the steps it really took (``step()`` after a step that
    ``torch.amp.GradScaler`` skipped does nothing), and ``Reset(reset_optimizer_state=True)`` resets
    its first moments. With ``optimizer=None`` every ``step()`` counts.

    Order within a step, as Algorithm 1: the forward pass uses the current masks (p, n); after
    ``optimizer.step()``, ``sp.step()`` applies FIX / RESET / REGULARIZE to that n, then recomputes
    the masks for the next step. The masks built in ``__init__`` are step 1's.

    Layers: the weights of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` modules. Left dense by
    default: embeddings (not Linear/Conv), the output projection -- taken to be the last
    ``nn.Linear`` in ``model.named_modules()`` order, plus any Linear whose weight is an
    ``nn.Embedding``'s (tied) -- and, for N:M structures, convolutions with ``groups != 1`` or
    ``in_channels % 16 != 0``. The layers used are ``(default ∪ include) − exclude``. A layer
    whose shape does not fit the structure is skipped, with one warning listing all such layers.

    Masks live on each layer as the buffer ``weight_mask`` (so ``model.state_dict()`` holds the dense
    weights under their usual keys plus the masks); a layer's forward computes with
    ``weight * weight_mask``. ``finalize()`` makes it a plain model again.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        density: float | None = None,
        structure: str = "unstructured",
        rewire_every: int = 1,
        grad_scale: float = 1.0,
        exploit: Exploit | None = None,
        total_steps: int | None = None,
        include: Selector | None = None,
        exclude: Selector | None = None,
    ) -> None:
        self.config = SparsityConfig(
            density=density,
            structure=structure,
            rewire_every=rewire_every,
            grad_scale=grad_scale,
            exploit=exploit,
            total_steps=total_steps,
        )
        resets_state = isinstance(exploit, Reset) and exploit.reset_optimizer_state
        if resets_state and optimizer is None:
            raise CorrtoolsError(
                "Reset(reset_optimizer_state=True) needs the optimizer: pass it to the Sparsifier."
            )
        self.model = model
        self.optimizer = optimizer
        self._structure: Structure = self.config.parsed_structure
        self._step = 0
        self._finalized = False
        self._fix_step = (
            self.config.exploit.fix_step(self.config.total_steps)  # type: ignore[arg-type]
            if isinstance(self.config.exploit, Fix)
            else None
        )
        self._layers: dict[str, _Layer] = {}
        self._step_flag: _StepFlag | None = None
        self._step_hook: Any = None
        self._skipped_in_a_row = 0
        selected = _select_layers(model, self._structure, include, exclude)
        misfits: list[str] = []
        prepared: list[tuple[str, nn.Module, Tensor]] = []
        for module_name, module in selected:
            name = f"{module_name}.weight" if module_name else "weight"
            if is_masked(module):
                raise CorrtoolsError(
                    f"Layer {name!r} is already masked by another Sparsifier; finalize() that one first."
                )
            try:
                mask = self._structure.mask(module.weight, self.config.density, name=name)
            except CorrtoolsError:
                misfits.append(f"{name} {tuple(module.weight.shape)}")
                continue
            prepared.append((name, module, mask))
        for name, module, mask in prepared:  # change the model only once nothing can fail
            mask_module_(module, mask, self.config.grad_scale)
            zero = torch.zeros((), dtype=torch.int64, device=module.weight.device)
            self._layers[name] = _Layer(module, zero, zero.clone())
        if misfits:
            warnings.warn(
                f"Sparsifier: {len(misfits)} layer(s) do not fit structure {self._structure} and stay "
                f"dense: {', '.join(misfits)}.",
                stacklevel=2,
            )
        if not self._layers:
            raise CorrtoolsError(
                f"No layer of the model can be sparsified with structure {self._structure}; "
                "name the layers to use with include=[...]."
            )
        if optimizer is not None:  # to tell the steps GradScaler skipped (the optimizer did not step)
            self._step_flag = _StepFlag()
            self._step_hook = optimizer.register_step_post_hook(self._step_flag)

    # ----------------------------------------------------------------- the training step
    @torch.no_grad()
    def step(self) -> None:
        """Call after ``optimizer.step()``: exploit this step's n, then rewire for the next step.

        Algorithm 1's order: the masks in place now are the p and n that entered this step's
        forward pass; FIX / RESET / REGULARIZE act on that n after the optimizer update, and only
        then are the masks recomputed from |w| (every r steps, until FIX) for the next step's
        forward. When an optimizer was given and it did not step since the last call (for example
        ``torch.amp.GradScaler`` skipped it for inf/NaN gradients), the call does nothing: the step
        count does not advance and nothing is exploited or rewired.
        """
        self._check_live()
        if not self._optimizer_stepped():
            return
        self._step += 1
        t = self._step
        self._exploit(t)
        if t % self.config.rewire_every == 0 and (self._fix_step is None or t < self._fix_step):
            self._rewire()

    def _optimizer_stepped(self) -> bool:
        """Whether the optimizer stepped since the last call (always True without an optimizer)."""
        flag = self._step_flag
        if flag is None:
            return True
        if flag.stepped:
            flag.stepped = False
            self._skipped_in_a_row = 0
            return True
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row == _SKIPS_BEFORE_WARNING:
            warnings.warn(
                f"Sparsifier.step() was called {_SKIPS_BEFORE_WARNING} times in a row without a "
                "step of the optimizer passed to the Sparsifier, so it did nothing; pass the optimizer "
                "that actually steps (or optimizer=None to count every call).",
                stacklevel=3,
            )
        return False

    def _exploit(self, t: int) -> None:
        exploit = self.config.exploit
        if isinstance(exploit, Fix):
            if t >= self._fix_step:  # type: ignore[operator]
                for layer in self._layers.values():
                    zero_nonparticipating_(layer.weight, layer.mask)
        elif isinstance(exploit, Reset):
            if exploit.due(t):
                for layer in self._layers.values():
                    zero_nonparticipating_(layer.weight, layer.mask)
                    if exploit.reset_optimizer_state:
                        optimizer = self.optimizer
                        assert optimizer is not None  # checked in __init__
                        zero_optimizer_state_(optimizer, layer.weight, layer.mask)
        elif isinstance(exploit, Regularize):
            for layer in self._layers.values():
                decay_nonparticipating_(layer.weight, layer.mask, exploit.beta)

    @torch.no_grad()
    def rewire(self) -> None:
        """Recompute every mask from the current |w| now (what ``step()`` does every r steps).

        Counts in :meth:`density_report` as a rewiring; does not advance the step count.
        """
        self._check_live()
        self._rewire()

    def _rewire(self) -> None:
        layers = self._layers
        weights = [layer.weight for layer in layers.values()]
        fresh = self._structure.masks(weights, self.config.density, list(layers))
        for layer, new in zip(layers.values(), fresh):
            mask = layer.mask
            layer.rewired_last.copy_(torch.gt(new, mask).sum())  # in p now (True), in n before
            layer.rewired_total.add_(layer.rewired_last)
            mask.copy_(new)  # in place: the buffer stays the same tensor

    # ----------------------------------------------------------------- inspection
    @property
    def steps_done(self) -> int:
        """Number of ``step()`` calls so far (optimizer steps)."""
        return self._step

    @property
    def layer_names(self) -> list[str]:
        """Names of the sparsified parameters, in model order."""
        return list(self._layers)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> a copy of its current bool mask (True = participating)."""
        self._check_live()
        return {name: layer.mask.clone() for name, layer in self._layers.items()}

    def participating_fraction(self) -> float:
        """Participating weights / all weights, over the sparsified layers only."""
        self._check_live()
        kept = sum(int(layer.mask.sum()) for layer in self._layers.values())
        total = sum(layer.mask.numel() for layer in self._layers.values())
        return kept / total

    def density_report(self) -> list[LayerReport]:
        """One :class:`LayerReport` per sparsified layer, in model order."""
        self._check_live()
        return [
            LayerReport(
                name=name,
                structure=str(self._structure),
                shape=tuple(layer.mask.shape),
                numel=layer.mask.numel(),
                density=int(layer.mask.sum()) / layer.mask.numel(),
                rewired_last=int(layer.rewired_last),
                rewired_total=int(layer.rewired_total),
            )
            for name, layer in self._layers.items()
        ]

    # ----------------------------------------------------------------- persistence and the end
    def state_dict(self) -> dict[str, Any]:
        """The Sparsifier's own state (config, step, rewiring counts); the masks are in the model's."""
        return {
            "config": self.config.to_dict(),
            "step": self._step,
            "rewired_last": {n: int(layer.rewired_last) for n, layer in self._layers.items()},
            "rewired_total": {n: int(layer.rewired_total) for n, layer in self._layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's state_dict for the masks)."""
        self._check_live()
        if SparsityConfig.from_dict(state["config"]) != self.config:
            raise CorrtoolsError(
                "The saved Sparsifier state has a different config; "
                "build the Sparsifier with the same settings."
            )
        if set(state["rewired_total"]) != set(self._layers):
            raise CorrtoolsError(
                "The saved Sparsifier state names other layers; use the same model and include/exclude."
            )
        self._step = int(state["step"])
        for name, layer in self._layers.items():
            layer.rewired_last.fill_(int(state["rewired_last"][name]))
            layer.rewired_total.fill_(int(state["rewired_total"][name]))

    def finalize(self) -> None:
        """Zero the non-participating weights and remove all masking: a plain model, same outputs."""
        self._check_live()
        for layer in self._layers.values():
            unmask_module_(layer.module, apply=True)
        if self._step_hook is not None:
            self._step_hook.remove()
        self._finalized = True

    def _check_live(self) -> None:
        if self._finalized:
            raise CorrtoolsError("This Sparsifier was finalized; build a new one to keep training sparse.")


def _select_layers(
    model: nn.Module, structure: Structure, include: Selector | None, exclude: Selector | None
) -> list[tuple[str, nn.Module]]:
    """(module name, module) pairs to sparsify, in model order: (default ∪ include) − exclude."""
    all_modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in all_modules.items() if isinstance(m, MASKABLE)]
    default = {n for n, m in candidates if _default_eligible(m, structure)}
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    if linears:
        default.discard(linears[-1])  # the output projection over the vocabulary / classes
    tied = {id(m.weight) for m in all_modules.values() if isinstance(m, nn.Embedding)}
    default -= {n for n, m in candidates if id(m.weight) in tied}
    chosen = (default | _matching(include, "include", candidates, all_modules)) - _matching(
        exclude, "exclude", candidates, all_modules
    )
    seen: set[int] = set()
    out = []
    for n, m in candidates:
        if n in chosen and id(m.weight) not in seen:  # a shared weight is masked once
            seen.add(id(m.weight))
            out.append((n, m))
    return out


def _default_eligible(module: nn.Module, structure: Structure) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and structure.is_nm:
        return module.groups == 1 and module.in_channels % 16 == 0
    return True


def _matching(
    selector: Selector | None,
    role: str,
    candidates: list[tuple[str, nn.Module]],
    all_modules: dict[str, nn.Module],
) -> set[str]:
    if selector is None:
        return set()
    items = [selector] if isinstance(selector, str) or callable(selector) else list(selector)
    names = {n for n, _ in candidates}
    out: set[str] = set()
    for item in items:
        if callable(item):
            out |= {n for n, m in candidates if item(n, m)}
            continue
        if not isinstance(item, str):
            raise CorrtoolsError(
                f"{role} entries must be layer names or predicates (name, module) -> bool, not {item!r}."
            )
        name = item[: -len(".weight")] if item.endswith(".weight") else item
        if name == "weight":
            name = ""
        if name in names:
            out.add(name)
        elif name in all_modules:
            raise CorrtoolsError(
                f"{role} names {item!r}, a {type(all_modules[name]).__name__}; only Linear, Conv1d "
                "and Conv2d layers can be sparsified."
            )
        else:
            raise CorrtoolsError(
                f"{role} names {item!r}, which is not a Linear/Conv layer of the model"
                f"{close_matches(item, sorted(names | {n + '.weight' for n in names if n}))}."
            )
    return out
