"""The Sparsifier: Algorithm 1 as a drop-in object for any PyTorch training loop.

It owns the masks, the per-layer plan and a step counter; the mask math is in :mod:`masks`, the
autograd in :mod:`ops`, the layer choice in :mod:`selection`, the exploitation in :mod:`exploit`.
Call ``sp.step()`` after ``optimizer.step()``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError
from corrtools.sparse.allocation import erk_densities
from corrtools.sparse.autoz import ZEstimate, ZEstimator
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
from corrtools.sparse.masks import kept_count
from corrtools.sparse.ops import MASK_BUFFER, gemm_weight, is_masked, layer_kind, mask_module_, unmask_module_
from corrtools.sparse.selection import Selected, Selector, param_name, resolve_layer_name, select_layers

if TYPE_CHECKING:
    from corrtools.record.recorder import Recorder

__all__ = ["LayerReport", "PerLayer", "Selector", "Sparsifier"]

# A per-layer setting: one value for all, a mapping {layer name: value} (module or weight name;
# layers not in it take the default), or a callable (module name, module) -> value or None (default).
PerLayer = Union[Any, Mapping[str, Any], Callable[[str, nn.Module], Any]]

# Consecutive step() calls without an optimizer step before a warning (GradScaler skips a few).
_SKIPS_BEFORE_WARNING = 25
_SEED = 0x5EED  # the Sparsifier's own generator (stochastic rounding in REGULARIZE on bf16/fp16)


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


class _StepFlag:
    """An optimizer step post-hook that records that the optimizer stepped (picklable)."""

    def __init__(self) -> None:
        self.stepped = False

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.stepped = True


@dataclass
class _Layer:
    modules: tuple[nn.Module, ...]  # every module computing with this weight (shared weights)
    structure: Structure
    density: float  # d of this layer (n/m for N:M; under "global" the overall d)
    rewired_last: Tensor  # 0-d int64, kept on the weight's device (no sync per step)
    rewired_total: Tensor

    @property
    def weight(self) -> Tensor:
        return self.modules[0].weight

    @property
    def mask(self) -> Tensor:
        return getattr(self.modules[0], MASK_BUFFER)

    @property
    def gemm_weight(self) -> Tensor:
        """The weight in (out, in, *kernel) layout (the transpose for HF Conv1D), a view."""
        return gemm_weight(self.modules[0])

    @property
    def gemm_mask(self) -> Tensor:
        return self.mask.t() if layer_kind(self.modules[0]) == "hf_conv1d" else self.mask


class Sparsifier:
    """Algorithm 1: top-d weights by |w| participate; the rest get s-scaled gradients and are exploited.

    ``density`` (d): fraction participating; ``None`` means n/m for N:M structures and 0.5
    otherwise. ``structure``: ``"unstructured"``, ``"2:4"`` (any ``"n:m"``), ``"2:4-2d"`` or
    ``"block:b"``. Both may also be per layer: a mapping ``{layer name: value}`` (others take the
    default) or a callable ``(module name, module) -> value or None``.
    ``allocation``: how one density spreads over the layers of free density (unstructured, block):
    ``"global"`` (the default: one magnitude threshold τ over all of them, recomputed at every
    rewiring, as the paper's single τ), ``"uniform"`` (each layer keeps d of its own weights) or
    ``"erk"`` (fixed per-layer densities by Erdős–Rényi-Kernel, :func:`allocation.erk_densities`).
    Per-layer densities imply ``"uniform"``; N:M layers always keep n/m.
    ``rewire_every`` (r): optimizer steps between mask recomputations from |w|.
    ``grad_scale`` (s): factor on the weight gradient of non-participating weights. Under an
    adaptive optimizer (Adam, AdamW) s barely changes how n moves: Adam divides each weight's
    update by the root of its own squared-gradient average, so a gradient scaled by s gives the
    same update (exactly, up to ε, for a constant s); s matters there only at s = 0 (n frozen) or
    through ε. Under SGD, s scales n's learning rate.
    ``exploit``: ``Fix``, ``Reset``, ``Regularize`` or ``None`` (NO EXPLOIT).
    ``total_steps``: planned optimizer steps (needed by ``Fix``). ``optimizer``: any optimizer; a
    step hook on it tells the steps it really took (``step()`` after a step that
    ``torch.amp.GradScaler`` skipped does nothing), and ``Reset(reset_optimizer_state=True)`` resets
    its first moments. With ``optimizer=None`` every ``step()`` counts.

    ``Reset(every="auto")`` chooses z during training from the measured decorrelation time of n
    (:mod:`corrtools.sparse.autoz`): ``sp.z`` is the interval in use, ``sp.z_history`` the estimates.
    ``recorder``: a :class:`~corrtools.Recorder` of the same run; with RESET, each z chosen is written
    to its store (``z (step,)``).

    Order within a step, as Algorithm 1: the forward pass uses the current masks (p, n); after
    ``optimizer.step()``, ``sp.step()`` applies FIX / RESET / REGULARIZE to that n, then recomputes
    the masks for the next step. The masks built in ``__init__`` are step 1's.

    Layers: see :func:`selection.select_layers` (defaults, include/exclude, shared weights,
    MultiheadAttention). A default layer whose shape does not fit its structure is skipped with one
    warning listing all such layers; a layer named in ``include`` that does not fit is an error.

    Masks live on each layer as the buffer ``weight_mask`` (so ``model.state_dict()`` holds the dense
    weights under their usual keys plus the masks); a layer's forward computes with
    ``weight * weight_mask``. ``finalize()`` makes it a plain model again. Rewiring and exploiting
    never read a device value on the host (no GPU synchronisation); the inspection methods do.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        density: PerLayer = None,
        structure: PerLayer = "unstructured",
        allocation: str | None = None,
        rewire_every: int = 1,
        grad_scale: float = 1.0,
        exploit: Exploit | None = None,
        total_steps: int | None = None,
        include: Selector | None = None,
        exclude: Selector | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        per_density, per_structure = _is_per_layer(density), _is_per_layer(structure)
        if allocation is None:
            allocation = "uniform" if per_density else "global"
        elif per_density and allocation != "uniform":
            raise CorrtoolsError(
                f"allocation={allocation!r} spreads one density; with per-layer densities use "
                "allocation='uniform' (or None)."
            )
        self.config = SparsityConfig(
            density=None if per_density else density,
            structure="unstructured" if per_structure else structure,
            allocation=allocation,
            rewire_every=rewire_every,
            grad_scale=grad_scale,
            exploit=exploit,
            total_steps=total_steps,
        )
        self.model = model
        self.optimizer = optimizer
        self._step = 0
        self._finalized = False
        self._fix_step = (
            self.config.exploit.fix_step(self.config.total_steps)  # type: ignore[arg-type]
            if isinstance(self.config.exploit, Fix)
            else None
        )
        self._generators: dict[str, torch.Generator] = {}
        self._step_flag: _StepFlag | None = None
        self._step_hook: Any = None
        self._skipped_in_a_row = 0
        modules = dict(model.named_modules())
        candidates = {n: m for n, m in modules.items() if layer_kind(m) is not None}
        structure_of = _resolver(structure, "structure", candidates, modules, self.config.structure, Structure.parse)
        density_of = _resolver(density, "density", candidates, modules, None, _check_layer_density)
        selected = select_layers(model, structure_of, include, exclude)
        self._layers: dict[str, _Layer] = {}
        misfits: list[str] = []
        for sel in selected:
            if is_masked(sel.modules[0]):
                raise CorrtoolsError(
                    f"Layer {sel.name!r} is already masked by another Sparsifier; finalize() that one first."
                )
            st = structure_of(sel.module_names[0], sel.modules[0])
            d = self._layer_density(sel, st, density_of(sel.module_names[0], sel.modules[0]))
            try:
                st.mask(gemm_weight(sel.modules[0]), d, name=sel.name)  # does it fit?
            except CorrtoolsError as err:
                if sel.explicit:
                    raise CorrtoolsError(f"include names {sel.name!r}, but {err}") from None
                misfits.append(f"{sel.name} {tuple(sel.modules[0].weight.shape)}")
                continue
            zero = torch.zeros((), dtype=torch.int64, device=sel.modules[0].weight.device)
            self._layers[sel.name] = _Layer(sel.modules, st, d, zero, zero.clone())
        if not self._layers:
            raise CorrtoolsError(_no_layer_message(misfits, self.config.structure, per_structure))
        if misfits:
            warnings.warn(
                f"Sparsifier: {len(misfits)} layer(s) do not fit their structure and stay dense: "
                f"{', '.join(misfits)}; exclude them to silence this.",
                stacklevel=2,
            )
        if self.config.allocation == "erk":
            free = [layer for layer in self._layers.values() if layer.structure.fixed_density is None]
            for layer, d in zip(free, erk_densities([tuple(x.gemm_weight.shape) for x in free], self.config.density)):
                layer.density = d
        self._check_counts()
        fresh = self._fresh_masks()  # change the model only once nothing can fail
        for layer, new in zip(self._layers.values(), fresh):
            mask = new.t().contiguous() if layer_kind(layer.modules[0]) == "hf_conv1d" else new
            for module in layer.modules:  # one buffer, shared by every user of the weight
                mask_module_(module, mask, self.config.grad_scale)
        if optimizer is not None:  # to tell the steps GradScaler skipped (the optimizer did not step)
            self._step_flag = _StepFlag()
            self._step_hook = optimizer.register_step_post_hook(self._step_flag)
        exploit_ = self.config.exploit
        self._autoz = (
            ZEstimator(exploit_.auto, {n: layer.weight for n, layer in self._layers.items()})  # type: ignore[arg-type]
            if isinstance(exploit_, Reset) and exploit_.is_auto
            else None
        )
        if self._autoz is not None:
            self._autoz._stacklevel += 2  # its warnings point at the caller of sp.step (via no_grad)
        self._recorder = recorder
        self._log_z(self._step + 1)

    def _layer_density(self, sel: Selected, st: Structure, given: float | None) -> float:
        implied = st.fixed_density
        if implied is not None:
            if given is not None and abs(given - implied) > 1e-12:
                raise CorrtoolsError(
                    f"Layer {sel.name!r} is {st}, which keeps exactly {implied:g}; its density {given!r} "
                    f"cannot apply: give it None or {implied:g}."
                )
            return implied
        return self.config.density if given is None else given  # type: ignore[return-value]

    def _check_counts(self) -> None:
        """Every mask keeps at least one weight (a density that rounds to 0 is an error)."""
        globally: dict[str, tuple[int, list[str]]] = {}
        for name, layer in self._layers.items():
            st = layer.structure
            if st.fixed_density is not None:
                continue
            units = layer.weight.numel() // (st.block * st.block if st.kind == "block" else 1)
            if self.config.allocation == "global":
                total, names = globally.get(str(st), (0, []))
                globally[str(st)] = (total + units, names + [name])
            elif kept_count(layer.density, units) == 0:
                raise CorrtoolsError(_zero_message(layer.density, units, repr(name), st))
        for text, (total, names) in globally.items():
            if kept_count(self.config.density, total) == 0:
                raise CorrtoolsError(_zero_message(self.config.density, total, f"the {text} layers", Structure.parse(text)))

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
        if self.optimizer is None and isinstance(self.config.exploit, Reset) and self.config.exploit.reset_optimizer_state:
            raise CorrtoolsError(
                "Reset(reset_optimizer_state=True) needs the optimizer: pass it to the Sparsifier, or "
                "to sp.attach_optimizer(optimizer) before the first step."
            )
        if not self._optimizer_stepped():
            return
        self._step += 1
        t = self._step
        if self._autoz is not None:  # this step's values and the masks of its forward pass
            layers = list(self._layers.values())
            est = self._autoz.observe(t, [x.weight for x in layers], [x.mask for x in layers])
            if est is not None and est.z is not None:
                self._log_z(t)
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
            auto = self._autoz
            if auto.reset_due(t) if auto is not None else exploit.due(t):
                for layer in self._layers.values():
                    zero_nonparticipating_(layer.weight, layer.mask)
                    if exploit.reset_optimizer_state:
                        optimizer = self.optimizer
                        assert optimizer is not None  # checked in __init__
                        zero_optimizer_state_(optimizer, layer.weight, layer.mask)
                if auto is not None:
                    auto.note_reset(t)
        elif isinstance(exploit, Regularize):
            for layer in self._layers.values():
                decay_nonparticipating_(layer.weight, layer.mask, exploit.beta, self._generator(layer.weight))

    def _generator(self, w: Tensor) -> torch.Generator | None:
        if w.dtype not in (torch.bfloat16, torch.float16):
            return None
        key = str(w.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=w.device).manual_seed(_SEED)
        return self._generators[key]

    @torch.no_grad()
    def rewire(self) -> None:
        """Recompute every mask from the current |w| now (what ``step()`` does every r steps).

        Counts in :meth:`density_report` as a rewiring; does not advance the step count.
        """
        self._check_live()
        self._rewire()

    def _fresh_masks(self) -> list[Tensor]:
        """New masks of all layers from |w|, in the (out, in, *kernel) layout, in layer order.

        Layers are grouped by structure, so 2:4-2d scores all its tiles in one pass and a global
        allocation ranks all free-density layers of one structure together.
        """
        groups: dict[str, list[str]] = {}
        for name, layer in self._layers.items():
            groups.setdefault(str(layer.structure), []).append(name)
        out: dict[str, Tensor] = {}
        for names in groups.values():
            layers = [self._layers[n] for n in names]
            st = layers[0].structure
            global_ = self.config.allocation == "global" and st.fixed_density is None
            density = self.config.density if global_ else [layer.density for layer in layers]
            fresh = st.masks([x.gemm_weight for x in layers], density, names, global_threshold=global_)  # type: ignore[arg-type]
            out.update(zip(names, fresh))
        return [out[n] for n in self._layers]

    def _rewire(self) -> None:
        for layer, new in zip(self._layers.values(), self._fresh_masks()):
            mask = layer.gemm_mask
            layer.rewired_last.copy_(torch.gt(new, mask).sum())  # in p now (True), in n before
            layer.rewired_total.add_(layer.rewired_last)
            mask.copy_(new)  # in place: the buffer stays the same tensor

    def _log_z(self, step: int) -> None:
        """Tell the recorder, if any, the RESET interval in effect from ``step`` on."""
        if self._recorder is not None and isinstance(self.config.exploit, Reset):
            self._recorder.log_z(self.z, step=step)

    # ----------------------------------------------------------------- inspection
    @property
    def z(self) -> int | None:
        """RESET's interval in use (optimizer steps): the fixed z, or with ``Reset(every="auto")`` the
        latest estimate (None before the first: no reset yet); None without RESET."""
        exploit = self.config.exploit
        if not isinstance(exploit, Reset):
            return None
        return self._autoz.z if self._autoz is not None else exploit.every  # type: ignore[return-value]

    @property
    def z_history(self) -> list[ZEstimate]:
        """Every estimate of z so far (``Reset(every="auto")``; empty otherwise), oldest first."""
        return list(self._autoz.history) if self._autoz is not None else []

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

    @property
    def plan(self) -> dict[str, tuple[str, float]]:
        """Parameter name -> (structure, density) as resolved per layer (under ``"global"``, the
        overall d: the layer's own share then changes at each rewiring)."""
        return {name: (str(layer.structure), layer.density) for name, layer in self._layers.items()}

    def participating_fraction(self) -> float:
        """Participating weights / all weights, over the sparsified layers only (reads the device)."""
        self._check_live()
        kept = sum(int(layer.mask.sum()) for layer in self._layers.values())
        total = sum(layer.mask.numel() for layer in self._layers.values())
        return kept / total

    def density_report(self) -> list[LayerReport]:
        """One :class:`LayerReport` per sparsified layer, in model order (reads the device)."""
        self._check_live()
        return [
            LayerReport(
                name=name,
                structure=str(layer.structure),
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
        """The Sparsifier's own state (config, plan, step, rewiring counts, generator, auto z's z and
        history); the masks are in the model's state_dict."""
        state = {
            "config": self.config.to_dict(),
            "plan": {n: list(v) for n, v in self.plan.items()},
            "step": self._step,
            "rewired_last": {n: int(layer.rewired_last) for n, layer in self._layers.items()},
            "rewired_total": {n: int(layer.rewired_total) for n, layer in self._layers.items()},
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }
        if self._autoz is not None:
            state["autoz"] = self._autoz.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's state_dict for the masks).

        The config must match, except ``total_steps`` when the exploit is not ``Fix`` (the only
        one that uses it), so a run can be extended.
        """
        self._check_live()
        if not self.config.resumable_from(SparsityConfig.from_dict(state["config"])):
            raise CorrtoolsError(
                "The saved Sparsifier state has a different config; "
                "build the Sparsifier with the same settings."
            )
        if set(state["rewired_total"]) != set(self._layers):
            raise CorrtoolsError(
                "The saved Sparsifier state names other layers; use the same model and include/exclude."
            )
        saved_plan = state.get("plan")
        if saved_plan is not None and {n: tuple(v) for n, v in saved_plan.items()} != self.plan:
            raise CorrtoolsError(
                "The saved Sparsifier state has other per-layer structures or densities; "
                "build the Sparsifier with the same density= and structure=."
            )
        self._step = int(state["step"])
        for name, layer in self._layers.items():
            layer.rewired_last.fill_(int(state["rewired_last"][name]))
            layer.rewired_total.fill_(int(state["rewired_total"][name]))
        for key, rng_state in state.get("generators", {}).items():
            self._generators[key] = torch.Generator(device=key)
            self._generators[key].set_state(rng_state)
        if self._autoz is not None:
            self._autoz.load_state_dict(state["autoz"])
            self._log_z(self._step + 1)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` from now on, as if it had been passed to the constructor: for trainers
        that build it after the model (the Lightning and Hugging Face callbacks build the Sparsifier
        first, so that a checkpoint's masks load with the model). Replaces an earlier optimizer."""
        self._check_live()
        if self._step_hook is not None:
            self._step_hook.remove()
        self.optimizer = optimizer
        self._step_flag = _StepFlag()
        self._step_hook = optimizer.register_step_post_hook(self._step_flag)

    def finalize(self) -> None:
        """Zero the non-participating weights and remove all masking: a plain model, same outputs."""
        self._check_live()
        for layer in self._layers.values():
            for module in layer.modules:
                unmask_module_(module, apply=True)
        if self._step_hook is not None:
            self._step_hook.remove()
        self._finalized = True

    def _check_live(self) -> None:
        if self._finalized:
            raise CorrtoolsError("This Sparsifier was finalized; build a new one to keep training sparse.")


def _is_per_layer(value: Any) -> bool:
    return isinstance(value, Mapping) or (callable(value) and not isinstance(value, (str, int, float)))


def _check_layer_density(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CorrtoolsError(f"A layer density of {value!r} must be a fraction in (0, 1] (or None: the default).")
    return float(value)


def _resolver(
    spec: PerLayer,
    role: str,
    candidates: dict[str, nn.Module],
    modules: dict[str, nn.Module],
    default: Any,
    parse: Callable[[Any], Any],
) -> Callable[[str, nn.Module], Any]:
    """(module name, module) -> the parsed per-layer value of ``spec`` (``default`` where unset)."""
    if isinstance(spec, Mapping):
        table = {resolve_layer_name(str(k), role, candidates, modules): v for k, v in spec.items()}
        return lambda name, module: parse(table.get(name, default))
    if _is_per_layer(spec):
        def call(name: str, module: nn.Module) -> Any:
            value = spec(name, module)
            return parse(default if value is None else value)

        return call
    return lambda name, module: parse(default if role == "structure" else None)


def _zero_message(density: float, units: int, what: str, st: Structure) -> str:
    unit = f"{st.block}x{st.block} blocks" if st.kind == "block" else "weights"
    return (
        f"density={density!r} keeps 0 of the {units} {unit} of {what}; "
        f"use a density of at least {0.5 / units:.3g} (half a {unit[:-1]} rounds up)."
    )


def _no_layer_message(misfits: list[str], structure: str, per_structure: bool) -> str:
    if misfits:
        what = "their structures" if per_structure else f"structure {structure}"
        return (
            f"No layer of the model fits {what}: {', '.join(misfits)}; choose a structure these shapes "
            "fit (e.g. 'unstructured') or change the layer sizes."
        )
    return (
        "No layer of the model is sparsified by default (its only Linear/Conv layers are the output "
        "projection, tied, inside nn.MultiheadAttention or excluded); name the layers with include=[...]."
    )

