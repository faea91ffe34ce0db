"""Algorithm 1's masked weight as an autograd op, and the pair that puts it into a layer and out.

Forward and the input (activation) gradient see only the participating weights, ``w * mask``. The
weight gradient is dense: the part on participating weights passes unchanged, the part on
non-participating weights is multiplied by ``grad_scale`` (s). Because the dense ``weight``
Parameter stays where it was, any optimizer updates all weights, and ``state_dict()`` keeps its
usual keys (``fc1.weight``) plus the mask buffer (``fc1.weight_mask``).
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError

__all__ = ["MASK_BUFFER", "MASKABLE", "is_masked", "mask_module_", "masked_weight", "unmask_module_"]

MASK_BUFFER = "weight_mask"  # buffer name on a masked module; state_dict key "<module>.weight_mask"
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
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


def _masked_linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    return F.linear(input, _module_masked_weight(self), self.bias)


def _masked_conv_forward(self: nn.Conv1d | nn.Conv2d, input: Tensor) -> Tensor:
    return self._conv_forward(input, _module_masked_weight(self), self.bias)


def is_masked(module: nn.Module) -> bool:
    """Whether :func:`mask_module_` has been applied to ``module`` (and not undone)."""
    return hasattr(module, _SCALE_ATTR)


def mask_module_(module: nn.Module, mask: Tensor, grad_scale: float = 1.0) -> None:
    """Make ``module`` (Linear, Conv1d or Conv2d) compute with ``masked_weight``, in place.

    Registers ``mask`` (bool, shaped like ``module.weight``) as the persistent buffer
    ``weight_mask`` and overrides the instance's ``forward``. Undo with :func:`unmask_module_`.
    """
    if not isinstance(module, MASKABLE):
        raise CorrtoolsError(
            f"Only Linear, Conv1d and Conv2d layers can be masked, not {type(module).__name__}."
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
    forward = _masked_linear_forward if isinstance(module, nn.Linear) else _masked_conv_forward
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


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
