"""The methods the paper compares against, in the Sparsifier's drop-in shape: build, then ``.step()``.

Every class here wraps a model and its optimizer; call ``.step()`` right after ``optimizer.step()``,
exactly as with :class:`~corrtools.sparse.Sparsifier`. Layers are chosen as the Sparsifier chooses
them (Linear and Conv weights except the output projection; ``include`` / ``exclude`` as there).

- DENSE: no object at all (train the model as it is).
- SMALL: a narrower model, not a wrapper; see :func:`small_width` and the workloads' ``small()``:
  the widths of the sparsifiable layers shrink so that they hold ``density`` times the weights.
- :class:`Lottery` (LOTTERY): dense for k steps, prune by magnitude, rewind the survivors to step ε,
  retrain with the mask fixed.
- :class:`SET` and :class:`RigL`: dynamic sparse training that drops the smallest participating
  weights every ΔT steps and grows as many (SET at random, RigL by dense-gradient magnitude).
- SR-STE: :func:`sr_ste`, which is REGULARIZE with 2:4 (1D) and β = 2e-4 in the Sparsifier.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> rigl = RigL(model, opt, density=0.25, total_steps=8, update_every=2)
>>> for _ in range(8):
...     model(torch.randn(8, 16)).square().mean().backward()
...     opt.step(); rigl.step(); opt.zero_grad()
>>> int(rigl.masks["0.weight"].sum())  # 0.25 * 512 weights, kept exactly through drop and grow
128
>>> int((model[0].weight != 0).sum()) <= 128  # non-participating weights are exactly 0
True
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError
from corrtools.sparse.allocation import erk_densities
from corrtools.sparse.config import Structure
from corrtools.sparse.exploit import Regularize
from corrtools.sparse.masks import kept_count, topk_mask
from corrtools.sparse.ops import MASK_BUFFER, mask_module_, unmask_module_
from corrtools.sparse.selection import Selector, select_layers
from corrtools.sparse.sparsifier import Sparsifier

__all__ = [
    "DISTRIBUTIONS",
    "Lottery",
    "RigL",
    "SET",
    "layer_densities",
    "small_width",
    "sr_ste",
]

DISTRIBUTIONS = ("uniform", "erk")
_UNSTRUCTURED = Structure("unstructured")


# ----------------------------------------------------------------------------- densities and SMALL
def layer_densities(shapes: Sequence[Sequence[int]], density: float, distribution: str) -> list[float]:
    """Per-layer densities: ``"uniform"`` (every layer ``density``) or ``"erk"`` (:func:`erk_densities`)."""
    if distribution == "uniform":
        _check_fraction(density, "density")
        return [float(density)] * len(shapes)
    if distribution == "erk":
        return erk_densities(shapes, density)  # corrtools.sparse.allocation
    raise CorrtoolsError(f"distribution={distribution!r} is unknown; use one of {DISTRIBUTIONS}.")


def small_width(width: int, factor: float, multiple: int = 1) -> int:
    """``width * factor`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

    SMALL uses it per layer type (see the workloads' ``small(density)``): a weight whose two
    widths both shrink takes ``factor = sqrt(d)``, one whose single inner width shrinks ``factor = d``.
    """
    if width < 1 or factor <= 0 or multiple < 1:
        raise CorrtoolsError(f"small_width needs width >= 1, factor > 0, multiple >= 1; got {width}, {factor}, {multiple}.")
    return max(multiple, multiple * round(width * factor / multiple))


def sr_ste(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, beta: float = 2e-4,
           **kwargs: Any) -> Sparsifier:
    """SR-STE: a :class:`Sparsifier` with structure ``"2:4"`` (1D), r = 1, s = 1 and ``Regularize(beta)``.

    The straight-through estimator is the dense gradient (s = 1); the sparse-refined term is
    REGULARIZE's n ← n − βn. Other keyword arguments go to the Sparsifier.
    """
    return Sparsifier(model, optimizer, structure="2:4", exploit=Regularize(beta=beta), **kwargs)


# ----------------------------------------------------------------------------- shared machinery
class _MaskedTraining:
    """Masks on the chosen layers; only participating weights get gradients, updates and values.

    The layer's forward uses ``w * mask`` (with the dense gradient, s = 1). A hook run after each
    gradient accumulation multiplies ``.grad`` by the mask, so the optimizer sees zero gradient on n;
    after every step n is set to 0 again, which also undoes weight decay and leftover momentum.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, include: Selector | None,
                 exclude: Selector | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._step = 0
        self._finalized = False
        self._modules: dict[str, nn.Module] = {}
        for sel in select_layers(model, lambda name, module: _UNSTRUCTURED, include, exclude):
            if len(sel.modules) > 1:
                raise CorrtoolsError(
                    f"{sel.name!r} is shared by {', '.join(sel.module_names)}; the baselines mask one "
                    "module per weight: exclude it or untie the weights."
                )
            self._modules[sel.name] = sel.modules[0]
        if not self._modules:
            raise CorrtoolsError("No Linear/Conv layer of the model can be sparsified; name them with include=[...].")
        self._hooks: list[Any] = []
        self._dense_grad: dict[str, Tensor] = {}  # RigL: this step's dense gradient, summed over backwards

    def _attach(self, masks: dict[str, Tensor], zero_n: bool) -> None:
        for name, module in self._modules.items():
            mask_module_(module, masks[name], grad_scale=1.0)
            self._hooks.append(module.weight.register_post_accumulate_grad_hook(self._grad_hook(name)))
        if zero_n:
            self._zero_nonparticipating()

    def _grad_hook(self, name: str) -> Any:
        def hook(param: Tensor) -> None:
            if param.grad is None:
                return
            mask = getattr(self._modules[name], MASK_BUFFER)
            if self._collecting():
                # .grad = earlier backwards' masked sum + this backward's dense gradient: add back
                # the earlier backwards' part on n to get the dense sum.
                prev = self._dense_grad.get(name)
                full = param.grad.clone() if prev is None else param.grad + prev.masked_fill(mask, 0.0)
                self._dense_grad[name] = full
            param.grad.mul_(mask)
        return hook

    def _collecting(self) -> bool:
        """Whether the gradient hooks keep the dense gradient of the step being computed."""
        return False

    @torch.no_grad()
    def _zero_nonparticipating(self) -> None:
        for name, module in self._modules.items():
            mask = getattr(module, MASK_BUFFER)
            module.weight.masked_fill_(~mask, 0.0)
            _zero_state_(self.optimizer, module.weight, mask)

    @property
    def steps_done(self) -> int:
        """Number of ``step()`` calls so far (optimizer steps)."""
        return self._step

    @property
    def layer_names(self) -> list[str]:
        """Names of the sparsified parameters, in model order."""
        return list(self._modules)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> a copy of its current bool mask (True = participating)."""
        self._check_live()
        return {n: getattr(m, MASK_BUFFER).clone() for n, m in self._modules.items() if hasattr(m, MASK_BUFFER)}

    def participating_fraction(self) -> float:
        """Participating weights / all weights, over the sparsified layers only."""
        masks = self.masks
        if not masks:
            return 1.0
        return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    def finalize(self) -> None:
        """Zero the non-participating weights and remove masks and hooks: a plain model."""
        self._check_live()
        for hook in self._hooks:
            hook.remove()
        for module in self._modules.values():
            if hasattr(module, MASK_BUFFER):
                unmask_module_(module, apply=True)
        self._finalized = True

    def _check_live(self) -> None:
        if self._finalized:
            raise CorrtoolsError("This object was finalized; build a new one to keep training sparse.")


# ----------------------------------------------------------------------------- SET and RigL
class _DynamicSparse(_MaskedTraining):
    """Shared drop-and-grow schedule of SET and RigL (subclasses choose how to grow)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float = 0.5,
        total_steps: int | None = None,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        end: float = 0.75,
        distribution: str = "uniform",
        seed: int = 0,
        include: Selector | None = None,
        exclude: Selector | None = None,
    ) -> None:
        if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise CorrtoolsError(f"total_steps={total_steps!r}: pass the planned number of optimizer steps (>= 1).")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise CorrtoolsError(f"update_every={update_every!r} must be a whole number of steps >= 1.")
        _check_fraction(drop_fraction, "drop_fraction")
        _check_fraction(end, "end")
        super().__init__(model, optimizer, include, exclude)
        self.density = float(density)
        self.total_steps = total_steps
        self.update_every = update_every  # ΔT
        self.drop_fraction = float(drop_fraction)  # α
        self.end = float(end)  # updates stop at end * total_steps
        self.distribution = distribution
        shapes = [tuple(m.weight.shape) for m in self._modules.values()]
        self.densities = dict(zip(self._modules, layer_densities(shapes, density, distribution)))
        self._gen = torch.Generator().manual_seed(seed)
        masks = {}
        for name, module in self._modules.items():  # random initial masks, exact counts
            w = module.weight
            scores = torch.rand(w.shape, generator=self._gen).to(w.device)
            masks[name] = topk_mask(scores, self.densities[name], name=name)
        self._attach(masks, zero_n=True)
        self.last_update: dict[str, tuple[int, int]] = {}  # name -> (dropped, grown) at the last update

    def fraction_at(self, step: int) -> float:
        """Drop fraction at ``step``: α/2 · (1 + cos(π·step / (end·T))), 0 from end·T on."""
        stop = self.end * self.total_steps
        if step >= stop:
            return 0.0
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / stop))

    def update_due(self, step: int) -> bool:
        """Whether drop-and-grow runs after ``step`` (every ΔT steps, while the fraction is > 0)."""
        return step % self.update_every == 0 and self.fraction_at(step) > 0

    needs_dense_grad = False  # RigL: keep the dense gradient of update steps

    def _collecting(self) -> bool:
        return self.needs_dense_grad and self.update_due(self._step + 1)

    @torch.no_grad()
    def step(self) -> None:
        """Call after ``optimizer.step()``: keep n at 0, and drop-and-grow when due."""
        self._check_live()
        self._step += 1
        for module in self._modules.values():
            module.weight.mul_(getattr(module, MASK_BUFFER))
        if self.update_due(self._step):
            fraction = self.fraction_at(self._step)
            for name, module in self._modules.items():
                self._update_layer(name, module, fraction)
        self._dense_grad.clear()

    def _update_layer(self, name: str, module: nn.Module, fraction: float) -> None:
        mask = getattr(module, MASK_BUFFER)
        w = module.weight
        active = int(mask.sum())
        k = math.floor(fraction * active)
        if k == 0:
            self.last_update[name] = (0, 0)
            return
        flat = mask.view(-1)
        # drop: the k participating weights of smallest |w| (ties: lower flat index dropped first)
        mag = torch.where(flat, w.detach().abs().reshape(-1), torch.full_like(flat, math.inf, dtype=w.dtype))
        drop = _smallest(mag, k)
        kept = flat.clone()
        kept[drop] = False
        # grow: k of the weights not kept (the just-dropped included), by the subclass's score
        score = self._grow_scores(name, w).reshape(-1).to(torch.float64)
        score = torch.where(kept, torch.full_like(score, -math.inf), score)
        grow = _smallest(-score, k)
        history = kept.clone()  # weights that keep their optimizer state: kept, not (re)grown
        kept[grow] = True
        flat.copy_(kept)  # in place: the module's buffer stays the same tensor
        w.view(-1)[grow] = 0.0  # new weights start at zero, with no optimizer history (a dropped
        _zero_state_(self.optimizer, w, history.view(w.shape))  # and regrown one neither)
        w.mul_(mask)
        self.last_update[name] = (k, k)

    def _grow_scores(self, name: str, w: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Step count and generator state (the masks are in the model's state_dict)."""
        return {"step": self._step, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._step = int(state["step"])
        self._gen.set_state(state["generator"])


class SET(_DynamicSparse):
    """SET: every ΔT steps drop the fraction f of participating weights with smallest |w| and grow
    as many at random (uniform among the weights not kept, seeded), new weights at 0.

    ``density`` (d) with ``distribution`` ``"uniform"`` or ``"erk"``; ``update_every`` ΔT (default
    100); ``drop_fraction`` α (default 0.3), decayed by a cosine to 0 at ``end`` (0.75) of
    ``total_steps``. Initial masks are random with exactly each layer's count; n is 0 throughout,
    gets no gradient and no optimizer update (its optimizer state is zeroed).
    """

    def _grow_scores(self, name: str, w: Tensor) -> Tensor:
        return torch.rand(w.shape, generator=self._gen, dtype=torch.float64)


class RigL(_DynamicSparse):
    """RigL: as :class:`SET`, but grow the weights of largest dense-gradient magnitude |∂L/∂w|.

    The dense gradient is the one of the step just taken (summed over its backward passes), read in
    a gradient hook before it is masked; only update steps keep it. Defaults ΔT = 100, α = 0.3.
    Ties in |grad| go to the lower flat index.
    """

    needs_dense_grad = True

    def _grow_scores(self, name: str, w: Tensor) -> Tensor:
        grad = self._dense_grad.get(name)
        if grad is None:
            raise CorrtoolsError(
                f"RigL found no gradient for {name!r} at its update step; call step() after a backward pass."
            )
        return grad.abs()


# ----------------------------------------------------------------------------- LOTTERY
class Lottery(_MaskedTraining):
    """LOTTERY with rewinding: dense for k steps, prune to ``density`` by |w|, rewind, retrain masked.

    Budget rule: the same ``total_steps`` T as every other method. The dense phase is
    ``k = round(prune_at * T)`` steps (default T/2); at step k each layer keeps its top-d weights by
    final |w| (exact count, ties to the lower index), the survivors are set to their values after
    step ε = ``rewind_to`` (the rest to 0; every other parameter and buffer of the model is rewound
to step ε as well), the optimizer state is restored to its step-ε snapshot
    (masked), and the remaining T − k steps train with the mask fixed. ε must lie in [k/100, k/10]
    (default: round(k/20)). The learning-rate schedule is not rewound unless ``scheduler`` is given
    (then it is restored to its step-ε state too); the experiments leave it running so that every
    method ends on the same annealed learning rate.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float = 0.5,
        total_steps: int | None = None,
        prune_at: float = 0.5,
        rewind_to: int | None = None,
        distribution: str = "uniform",
        scheduler: Any = None,
        include: Selector | None = None,
        exclude: Selector | None = None,
    ) -> None:
        if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
            raise CorrtoolsError(f"total_steps={total_steps!r}: pass the planned number of optimizer steps (>= 2).")
        if not 0 < prune_at < 1:
            raise CorrtoolsError(f"prune_at={prune_at!r} must be a fraction of training in (0, 1).")
        super().__init__(model, optimizer, include, exclude)
        self.total_steps = total_steps
        self.prune_step = max(1, math.floor(prune_at * total_steps + 0.5))  # k
        k = self.prune_step
        eps = max(1, math.floor(k / 20 + 0.5)) if rewind_to is None else rewind_to
        if isinstance(eps, bool) or not isinstance(eps, int) or not (k / 100 <= eps <= k / 10 and eps >= 1):
            raise CorrtoolsError(
                f"rewind_to={rewind_to!r} must be a step in [k/100, k/10] = [{k / 100:g}, {k / 10:g}] "
                f"for prune step k={k}; choose a longer run or another rewind step."
            )
        self.rewind_step = eps  # ε
        self.density = float(density)
        shapes = [tuple(m.weight.shape) for m in self._modules.values()]
        self.densities = dict(zip(self._modules, layer_densities(shapes, density, distribution)))
        self.scheduler = scheduler
        self._snapshot: dict[str, Any] | None = None
        self._pruned = False

    @property
    def pruned(self) -> bool:
        """Whether the prune-and-rewind has happened (the run is in its masked phase)."""
        return self._pruned

    @torch.no_grad()
    def step(self) -> None:
        """Call after ``optimizer.step()``: snapshot at ε, prune and rewind at k, keep n at 0 after."""
        self._check_live()
        self._step += 1
        t = self._step
        if t == self.rewind_step:
            self._snapshot = {
                "model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": None if self.scheduler is None else copy.deepcopy(self.scheduler.state_dict()),
            }
        if t == self.prune_step:
            self._prune_and_rewind()
        elif self._pruned:
            for module in self._modules.values():
                module.weight.mul_(getattr(module, MASK_BUFFER))

    def _prune_and_rewind(self) -> None:
        snap = self._snapshot
        assert snap is not None  # ε < k
        masks = {n: topk_mask(m.weight, self.densities[n], name=n) for n, m in self._modules.items()}
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        self._snapshot = None
        self._attach(masks, zero_n=True)
        self._pruned = True

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> its mask; all True (dense) before the prune step."""
        self._check_live()
        if not self._pruned:
            return {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self._modules.items()}
        return super().masks


def _smallest(values: Tensor, k: int) -> Tensor:
    """Flat indices of the ``k`` smallest of 1D ``values``; ties go to the lower index (stable sort)."""
    return torch.argsort(values, stable=True)[:k]


def _check_fraction(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CorrtoolsError(f"{name}={value!r} must be a fraction in (0, 1].")


@torch.no_grad()
def _zero_state_(optimizer: torch.optim.Optimizer, param: Tensor, keep: Tensor) -> None:
    """Zero every optimizer state tensor shaped like ``param`` (momenta and second moments) where
    ``keep`` is False: weights outside the mask, and grown ones, start with no history, as in RigL.
    (RESET's ``zero_optimizer_state_`` keeps second moments on purpose; here n never updates.)"""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(~keep, 0)
