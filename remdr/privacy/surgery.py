"""A model DP-SGD can clip: no layer mixes rows, no in-place op, contiguous conv inputs.

DP-SGD clips each row's gradient, so a row's output may depend on that row alone (BatchNorm,
including timm's fused BN+act, makes it depend on the batch), no in-place op may break Opacus'
hooks, and conv inputs must be contiguous (Opacus' unfold assumes NCHW; channels-last inputs give
wrong per-sample gradients).
"""

from __future__ import annotations

import logging
import math
import warnings

from torch import nn

from remdr.errors import PrivacyError
from remdr.privacy.quiet_opacus import import_opacus


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _group_norm(num_channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels, eps=eps, affine=True)


def _replace_fused_batchnorm(module: nn.Module) -> None:
    """timm's BatchNormAct2d is a BatchNorm subclass Opacus' validator does not catch."""
    for name, child in module.named_children():
        if type(child).__name__ in ("BatchNormAct2d", "SyncBatchNormAct"):
            act, drop = getattr(child, "act", nn.Identity()), getattr(child, "drop", nn.Identity())
            setattr(
                module, name, nn.Sequential(_group_norm(child.num_features, child.eps), drop, act)
            )
        else:
            _replace_fused_batchnorm(child)


def make_dp_ready(model: nn.Module) -> nn.Module:
    """Norm layers -> GroupNorm, no in-place ops, contiguous conv inputs. Returns a new model."""
    import_opacus()
    from opacus.validators import ModuleValidator

    _replace_fused_batchnorm(model)
    logging.getLogger("opacus").setLevel(logging.WARNING)  # it logs every layer it replaces
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "one_view_per_call"):
            module.one_view_per_call = True
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(_contiguous_input)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise PrivacyError(
            "the model cannot be trained with DP-SGD",
            "; ".join(str(p) for p in problems[:3]),
            "choose a backbone without batch-coupled layers",
        )
    return model
