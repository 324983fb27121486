"""Weight-standardised convolutions: what lets a GroupNorm network train like a BatchNorm one.

Under GroupNorm at the federation's small batches the fundus encoder sat at the label variance
(predicting the mean) for its whole budget, where the same encoder with BatchNorm learned; the
per-channel standardisation of each conv's weights (Qiao et al., "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization", 2019) smooths the loss landscape the way
BatchNorm does without any statistic shared between images, so it keeps GroupNorm's reasons for
being there (no running statistics to average across skewed sites, no row mixing). The weights
stored and exchanged stay the raw ones, so state-dict keys and shapes do not change.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5  # added to the variance, as measured (docs/federation.md)


class StandardisedConv2d(nn.Conv2d):
    """A Conv2d whose kernel is standardised to zero mean, unit variance per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) * torch.rsqrt(var + EPS), self.bias)


def standardise_convs(module: nn.Module) -> int:
    """Make every plain Conv2d of `module` a StandardisedConv2d in place (same parameters, same
    keys); a 1x1-input-channel kernel of one weight per output channel is left as it is, since
    its standardised weight would be constant. Returns how many were changed."""
    changed = 0
    for conv in module.modules():
        if type(conv) is nn.Conv2d and conv.weight[0].numel() > 1:
            conv.__class__ = StandardisedConv2d
            changed += 1
    return changed
