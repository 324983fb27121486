"""Re-M3Dr's two-branch network: OCT and fundus encoders, projections, fusion and unimodal heads.

Heads predict MD in normalised units, (md - md_center) / md_scale; `to_db` converts back.
With one modality (the unimodal baselines) only that branch exists and its head is the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remdr.config import DataConfig, ModelConfig
from remdr.encoders import create_encoder

MODALITIES = ("oct", "fundus")


class AttentionPool(nn.Module):
    """Attention pooling over K B-scan features (Ilse et al. 2018): the informative slices weigh most."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # feats: (B, K, F) -> (B, F)
        weights = torch.softmax(self.score(feats), dim=1)  # (B, K, 1)
        return (weights * feats).sum(dim=1)


def _head(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
    )


class Branch(nn.Module):
    """One modality: encoder (shared over B-scans when 2.5D) -> [attention pool] -> z (d).

    B-scans go through the encoder as one (B*K) batch, or one view per call when
    `one_view_per_call` (DP-SGD: every encoder call must keep one row per patient).
    """

    one_view_per_call = False

    def __init__(self, encoder: nn.Module, embed_dim: int, multi_view: bool) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.num_features
        self.pool = AttentionPool(width) if multi_view else None
        self.proj = nn.Sequential(nn.Linear(width, embed_dim), nn.LayerNorm(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            b, k = x.shape[:2]  # (B, K, C, H, W)
            if self.one_view_per_call:
                feats = torch.stack([self.encoder(_channels_last(x[:, i])) for i in range(k)], 1)
            else:
                feats = self.encoder(_channels_last(x.flatten(0, 1))).view(b, k, -1)
            return self.proj(self.pool(feats))
        return self.proj(self.encoder(_channels_last(x)))  # (B, C, H, W) -> (B, d)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations -> fp32 for losses; fp64 stays fp64 (the gradient check runs in it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


class ReM3Dr(nn.Module):
    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        modalities: tuple[str, ...] = MODALITIES,
        n_prototypes: int = 0,
    ) -> None:
        super().__init__()
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.md_center, self.md_scale = data_cfg.md_center, data_cfg.md_scale
        d, h, p = model_cfg.embed_dim, model_cfg.fusion_hidden, model_cfg.dropout
        self.branches = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        if "oct" in self.modalities:
            enc = create_encoder(model_cfg.oct_encoder, 1, model_cfg.oct_weights)
            # "auto" (a config not yet resolved against data) builds the default B-scan view
            self.branches["oct"] = Branch(enc, d, multi_view=data_cfg.oct_view != "rnflt")
        if "fundus" in self.modalities:
            enc = create_encoder(
                model_cfg.fundus_encoder, data_cfg.fundus_channels, model_cfg.fundus_weights
            )
            self.branches["fundus"] = Branch(enc, d, multi_view=False)
        for m in self.modalities:
            self.heads[m] = _head(d, h, p)
        self.fusion = _head(d * len(self.modalities), h, p) if len(self.modalities) > 1 else None
        # Learnable MD-bin prototypes per modality (remdr_dp): u . p_k for unit-norm u.
        self.prototypes = (
            nn.ModuleDict({m: nn.Linear(d, n_prototypes, bias=False) for m in self.modalities})
            if n_prototypes
            else None
        )

    def forward(
        self,
        oct: torch.Tensor | None = None,
        fundus: torch.Tensor | None = None,
        *,
        detach_heads: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Returns ``z_<m>`` (B, d), ``pred_<m>`` (B,) per modality and ``pred`` (B,);
        with prototypes also ``proto_<m>`` (B, n_prototypes).

        `detach_heads` trains the unimodal heads as probes on detached features, so they report
        each modality's strength without pushing gradients into the encoders.
        """
        inputs = {"oct": oct, "fundus": fundus}
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            z = self.branches[m](inputs[m])
            out[f"z_{m}"] = z
            out[f"pred_{m}"] = self.heads[m](z.detach() if detach_heads else z).squeeze(-1)
            if self.prototypes is not None:
                out[f"proto_{m}"] = self.prototypes[m](F.normalize(full_precision(z), dim=-1))
        if self.fusion is not None:
            fused = torch.cat([out[f"z_{m}"] for m in self.modalities], dim=-1)
            out["pred"] = self.fusion(fused).squeeze(-1)
        else:
            out["pred"] = out[f"pred_{self.modalities[0]}"]
        return out

    def normalise(self, md: torch.Tensor) -> torch.Tensor:
        return (md - self.md_center) / self.md_scale

    def to_db(self, pred: torch.Tensor) -> torch.Tensor:
        return pred * self.md_scale + self.md_center

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters gradient modulation scales for one modality: its whole branch."""
        return list(self.branches[modality].parameters())
