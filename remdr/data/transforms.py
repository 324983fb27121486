"""Light training-time augmentation, applied to whole batches on the training device.

Each eye gets one random shift (the same for all its B-scans) and a brightness/contrast jitter
per modality. Draws come from a seeded CPU generator, so CPU runs are reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SHIFT = 0.06  # fraction of the image side
JITTER = 0.05  # std of brightness offset and contrast gain (normalised units)


def _shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """x: (B, C, H, W), shifts: (B, 2) in [-1, 1] grid units."""
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shifts.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_image(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """x: (B, C, H, W) or (B, K, C, H, W); returns the same shape. `strength` scales the shift
    and the jitter (the same random draws, so strengths differ only in size)."""
    b = x.shape[0]
    shifts = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * MAX_SHIFT * strength)
    gain = 1.0 + JITTER * strength * torch.randn(b, generator=gen)
    offset = JITTER * strength * torch.randn(b, generator=gen)
    if x.ndim == 5:
        k = x.shape[1]
        flat = _shift(x.flatten(0, 1), shifts.repeat_interleave(k, 0)).view_as(x)
    else:
        flat = _shift(x, shifts)
    shape = (b,) + (1,) * (x.ndim - 1)
    return flat * gain.view(shape).to(x) + offset.view(shape).to(x)
