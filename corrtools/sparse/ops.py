"""Algorithm 1's masked weight as an autograd op, and the pair that puts it into a layer and out.

Forward and the input (activation) gradient see only the participating weights, ``w * mask``. The
weight gradient is dense: the part on participating weights passes unchanged, the part on
non-participating weights is multiplied by ``grad_scale`` (s). Because the dense ``weight``
Parameter stays where it was, any optimizer updates all weights, and ``state_dict()`` keeps its
usual keys (``fc1.weight``) plus the mask buffer (``fc1.weight_mask``).

Layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, and Hugging Face's ``transformers.pytorch_utils.Conv1D``
(GPT-2's projections), recognised without importing transformers by its class name ``Conv1D``, its
``nf`` attribute and a weight stored ``(in, out)`` -- the transpose of ``nn.Linear``'s.
The masked forward is a ``functools.partial`` of a module-level function stored on the instance,
so a masked model pickles (``torch.save(model)`` / ``torch.load``) and deep-copies.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError

__all__ = [
    "MASK_BUFFER",
    "MASKABLE",
    "gemm_weight",
    "is_masked",
    "layer_kind",
    "mask_module_",
    "masked_weight",
    "unmask_module_",
]

MASK_BUFFER = "weight_mask"  # buffer name on a masked module; state_dict key "<module>.weight_mask"
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)  # plus HF's Conv1D, recognised by layer_kind
_SCALE_ATTR = "_corrtools_grad_scale"
_FACTOR_ATTR = "_corrtools_mask_factor"  # (mask, its version, mask in the weight dtype)


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor, factor: Tensor, grad_scale: float) -> Tensor:
        # factor: the mask as 0/1 in weight's dtype; multiplying by it is ~4x cheaper than by bool.
        ctx.save_for_backward(mask, factor)
        ctx.grad_scale = grad_scale
        return weight * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        mask, factor = ctx.saved_tensors
        s = ctx.grad_scale
        if s == 1.0:  # the paper's default: the dense gradient as it is
            return grad, None, None, None
        if s == 0.0:
            return grad * factor, None, None, None
        return torch.where(mask, grad, grad * s), None, None, None


def masked_weight(weight: Tensor, mask: Tensor, grad_scale: float = 1.0) -> Tensor:
    """``weight * mask`` whose gradient to ``weight`` is ``grad`` on p and ``grad_scale * grad`` on n.

    ``mask`` is bool, shaped like ``weight``; ``grad_scale`` is s (>= 0).
    """
    return _MaskedWeight.apply(weight, mask, mask.to(weight.dtype), float(grad_scale))


def _module_masked_weight(module: nn.Module) -> Tensor:
    """:func:`masked_weight` of a masked module, reusing the mask in the weight's dtype.

    The converted mask is cached on the module and rebuilt whenever the mask buffer is replaced or
    changed in place (its version counter moves: rewiring, ``load_state_dict``) or the dtype changes.
    """
    weight, mask = module.weight, getattr(module, MASK_BUFFER)
    cache = module.__dict__.get(_FACTOR_ATTR)
    if cache is None or cache[0] is not mask or cache[1] != mask._version or cache[2].dtype != weight.dtype:
        cache = (mask, mask._version, mask.to(weight.dtype))
        module.__dict__[_FACTOR_ATTR] = cache
    return _MaskedWeight.apply(weight, mask, cache[2], getattr(module, _SCALE_ATTR))


def _masked_linear_forward(module: nn.Linear, input: Tensor) -> Tensor:
    return F.linear(input, _module_masked_weight(module), module.bias)


def _masked_conv_forward(module: nn.Conv1d | nn.Conv2d, input: Tensor) -> Tensor:
    return module._conv_forward(input, _module_masked_weight(module), module.bias)


def _masked_hf_conv1d_forward(module: nn.Module, x: Tensor) -> Tensor:
    # transformers.pytorch_utils.Conv1D.forward with the masked (in, out) weight
    size_out = x.size()[:-1] + (module.nf,)
    x = torch.addmm(module.bias, x.view(-1, x.size(-1)), _module_masked_weight(module))
    return x.view(size_out)


_FORWARDS = {"linear": _masked_linear_forward, "conv": _masked_conv_forward, "hf_conv1d": _masked_hf_conv1d_forward}


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` (Conv1d/Conv2d), ``"hf_conv1d"`` (Hugging Face's ``Conv1D``) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    ):
        return "hf_conv1d"
    return None


def gemm_weight(module: nn.Module) -> Tensor:
    """The weight in ``(out, in, *kernel)`` layout: ``weight`` itself, or for HF ``Conv1D`` (stored
    ``(in, out)``) its transpose ``weight.t()`` -- a view, so writes reach the Parameter."""
    w = module.weight
    return w.t() if layer_kind(module) == "hf_conv1d" else w


def is_masked(module: nn.Module) -> bool:
    """Whether :func:`mask_module_` has been applied to ``module`` (and not undone)."""
    return hasattr(module, _SCALE_ATTR)


def mask_module_(module: nn.Module, mask: Tensor, grad_scale: float = 1.0) -> None:
    """Make ``module`` (Linear, Conv1d, Conv2d or HF Conv1D) compute with ``masked_weight``, in place.

    Registers ``mask`` (bool, shaped like ``module.weight``; the same tensor object, so modules that
    share a weight can share its mask) as the persistent buffer ``weight_mask`` and sets the
    instance's ``forward``. Undo with :func:`unmask_module_`.
    """
    kind = layer_kind(module)
    if kind is None:
        raise CorrtoolsError(
            f"Only Linear, Conv1d, Conv2d and Hugging Face Conv1D layers can be masked, not {type(module).__name__}."
        )
    if is_masked(module) or hasattr(module, MASK_BUFFER):
        raise CorrtoolsError(
            f"This {type(module).__name__} is already masked (by another Sparsifier?); "
            "finalize() that one first."
        )
    if mask.dtype != torch.bool or mask.shape != module.weight.shape:
        raise CorrtoolsError(
            f"The mask must be bool and shaped like the weight {tuple(module.weight.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    module.register_buffer(MASK_BUFFER, mask.to(module.weight.device), persistent=True)
    setattr(module, _SCALE_ATTR, float(grad_scale))
    # A partial of a module-level function, not a bound method: picklable (torch.save(model)).
    module.forward = functools.partial(_FORWARDS[kind], module)  # type: ignore[method-assign]


def unmask_module_(module: nn.Module, apply: bool = True) -> None:
    """Undo :func:`mask_module_` in place; with ``apply`` first zero the weights where the mask is False.

    Afterwards the module is a plain layer again: its class ``forward``, no mask buffer.
    """
    if not is_masked(module):
        raise CorrtoolsError(f"This {type(module).__name__} is not masked; nothing to undo.")
    if apply:
        with torch.no_grad():
            module.weight.masked_fill_(~getattr(module, MASK_BUFFER), 0.0)
    del module._buffers[MASK_BUFFER]
    delattr(module, _SCALE_ATTR)
    module.__dict__.pop(_FACTOR_ATTR, None)
    del module.forward
