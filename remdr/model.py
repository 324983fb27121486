"""Re-M3Dr's two-branch network: OCT and fundus encoders, projections, fusion and unimodal heads.

Heads predict MD in normalised units, (md - md_center) / md_scale; `to_db` converts back.
With one modality (the unimodal baselines) only that branch exists and its head is the output.

An eye may lack one image. `present[m]` (B,) says which rows have modality m; where it is
false the fusion head gets a learned absent-modality embedding instead of z_m while training
(so a one-modality site still trains its encoder through the fusion path), and a branch no row
of the batch has input for is not run at all (its weights get no gradient, so an OCT-only site
leaves the fundus encoder as it received it). At evaluation an eye with one image is predicted
by that modality's unimodal head: in the federation it matches a model of that modality alone,
where the fusion head with the stand-in does not (docs/federation.md, "Incomplete sites").
`modality_dropout` (off by default: it cost complete eyes 10-30% in the federation) hides one
image of a complete eye from the fusion head while training.

How the fused prediction is made (`fusion`): "mlp" (the default) is the fusion head on
[z_o; z_f]; "ensemble" has no fusion head, ``pred`` is the weighted mean of the unimodal heads
with weights in the buffer ``ensemble_weights`` (UME, MLA: the method sets them). `shared_head`
makes one head serve both modalities (MLA). `gate` (off by default) adds a per-eye softmax gate
from [z_o; z_f] over the fusion head and the two unimodal heads, so the fused model can hand an
eye to the head that reads it best (a severe eye past the OCT floor to the fundus head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remdr.config import DataConfig, ModelConfig
from remdr.encoders import create_encoder
from remdr.registry import MODALITIES


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


PARTS = ("oct", "fundus", "fusion", "shared")


def model_part(key: str) -> str:
    """The part of the model a state-dict key belongs to, for per-part aggregation: a
    modality's branch, unimodal head and prototypes are that modality's ("oct", "fundus"), the
    fusion head is "fusion", anything else (e.g. the absent-modality embeddings) "shared"."""
    head, _, rest = key.partition(".")
    if head in ("branches", "heads", "prototypes"):
        modality = rest.partition(".")[0]
        return modality if modality in ("oct", "fundus") else "shared"
    return "fusion" if head == "fusion" else "shared"


def _save_blend(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    if module.head_blend.any():
        state[prefix + "head_blend"] = module.head_blend.detach().clone()


def _load_blend(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    """A checkpoint without the key (training, or no blend chosen) leaves the blend as it is:
    a new model's zeros, the fusion head alone."""
    blend = state.pop(prefix + "head_blend", None)
    if blend is not None:
        module.head_blend.copy_(blend)


class ReM3Dr(nn.Module):
    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        modalities: tuple[str, ...] = MODALITIES,
        n_prototypes: int = 0,
        *,
        fusion: str = "mlp",
        shared_head: bool = False,
        gate: bool = False,
        blend: bool = False,
    ) -> None:
        super().__init__()
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.md_center, self.md_scale = data_cfg.md_center, data_cfg.md_scale
        d, h, p = model_cfg.embed_dim, model_cfg.fusion_hidden, model_cfg.dropout
        two = len(self.modalities) > 1
        self.branches = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        if "oct" in self.modalities:
            enc = create_encoder(model_cfg.oct_encoder, 1, model_cfg.oct_weights)
            self.branches["oct"] = Branch(enc, d, multi_view=data_cfg.tensor_view == "bscans")
        if "fundus" in self.modalities:
            enc = create_encoder(
                model_cfg.fundus_encoder, data_cfg.fundus_channels, model_cfg.fundus_weights
            )
            self.branches["fundus"] = Branch(enc, d, multi_view=False)
        for m in ("shared",) if shared_head else self.modalities:
            self.heads[m] = _head(d, h, p)
        self.shared_head = shared_head
        self.fusion = _head(d * len(self.modalities), h, p) if two and fusion == "mlp" else None
        if two and fusion == "ensemble":  # (w_oct, w_fundus), summing to 1; the method sets them
            self.register_buffer("ensemble_weights", torch.full((2,), 0.5))
        # logits of (fusion head, OCT head, fundus head) per eye, uniform at the start
        self.gate = nn.Linear(d * 2, 3) if gate and self.fusion is not None else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        # each unimodal head's weight in a complete eye's prediction at evaluation, chosen on
        # validation once training ends (`remdr.head_blend`). Zeros (the fusion head alone)
        # while training, when it is left out of the state dict, so a federation never sends it;
        # a chosen blend is saved with the weights and loaded with them into a new model.
        if self.fusion is not None:
            self.register_buffer("head_blend", torch.zeros(len(self.modalities)), persistent=False)
            self.register_state_dict_post_hook(_save_blend)
            self.register_load_state_dict_pre_hook(_load_blend)
        self.blends = blend and self.fusion is not None  # choose a blend once training ends
        # the fusion input of an absent modality: a Linear on a constant 1, so DP-SGD (Opacus)
        # gets its per-sample gradients like any layer's
        self.absent = (
            nn.ModuleDict({m: nn.Linear(1, d, bias=False) for m in self.modalities})
            if self.fusion is not None
            else None
        )
        self.modality_dropout = model_cfg.modality_dropout
        self.embed_dim = d
        self.always_run_branches = False  # DP-SGD: every parameter in every step's graph
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
        present: dict[str, torch.Tensor] | None = None,
        detach_heads: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Returns ``z_<m>`` (B, d), ``pred_<m>`` (B,) and ``present_<m>`` (B,) per modality and
        ``pred`` (B,); with prototypes also ``proto_<m>`` (B, n_prototypes). A row's
        ``pred_<m>``, ``z_<m>`` and ``proto_<m>`` mean nothing where ``present_<m>`` is false.

        `present` maps a modality to a (B,) bool mask (default: every row has every input).
        `detach_heads` trains the unimodal heads as probes on detached features, so they report
        each modality's strength without pushing gradients into the encoders.
        """
        inputs = {"oct": oct, "fundus": fundus}
        given = next(x for x in inputs.values() if x is not None)
        batch, device = given.shape[0], given.device
        masks = {
            m: (
                present[m].to(device=device, dtype=torch.bool)
                if present is not None and m in present
                else torch.ones(batch, dtype=torch.bool, device=device)
            )
            for m in self.modalities
        }
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if masks[m].any() or self.always_run_branches:
                z = self.branches[m](inputs[m])
            else:
                z = torch.zeros(batch, self.embed_dim, device=device)
            out[f"z_{m}"], out[f"present_{m}"] = z, masks[m]
            out[f"pred_{m}"] = self.head(m)(z.detach() if detach_heads else z).squeeze(-1)
            if self.prototypes is not None:
                out[f"proto_{m}"] = self.prototypes[m](F.normalize(full_precision(z), dim=-1))
        if self.fusion is not None:
            fused = self.fusion_input(out, self._fusion_masks(masks))
            out["z"] = fused  # (B, 2d): the fused embedding (ConR, RankSim)
            out["pred"] = self.fusion(fused).squeeze(-1)
            if self.gate is not None:
                out["pred"] = self._gated(out, fused, masks)
            if not self.training:  # an eye with one image: that modality's own head predicts
                a, b = self.modalities
                out["pred"] = self._blended(out, masks[a] & masks[b])
                only_a, only_b = masks[a] & ~masks[b], masks[b] & ~masks[a]
                pred = torch.where(only_a, out[f"pred_{a}"], out["pred"])
                out["pred"] = torch.where(only_b, out[f"pred_{b}"], pred)
        elif len(self.modalities) > 1:  # the ensemble: a weighted mean of the heads it has
            a, b = self.modalities
            w = self.ensemble_weights.to(out[f"pred_{a}"].dtype)
            mean = w[0] * out[f"pred_{a}"] + w[1] * out[f"pred_{b}"]
            pred = torch.where(masks[a] & ~masks[b], out[f"pred_{a}"], mean)
            out["pred"] = torch.where(masks[b] & ~masks[a], out[f"pred_{b}"], pred)
        else:
            out["pred"] = out[f"pred_{self.modalities[0]}"]
        return out

    def head(self, modality: str) -> nn.Module:
        """The unimodal head of `modality` (the one shared head under MLA)."""
        return self.heads["shared" if self.shared_head else modality]

    def fusion_input(
        self, out: dict[str, torch.Tensor], seen: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[z_o; z_f] (B, 2d) with the learned absent-modality embedding where `seen` is false
        (AGM also asks for the fused prediction with a modality hidden this way)."""
        batch = out[f"z_{self.modalities[0]}"].shape[0]
        device = out[f"z_{self.modalities[0]}"].device
        dtype = next(iter(self.absent.values())).weight.dtype  # float64 in the DP check
        one = torch.ones(batch, 1, device=device, dtype=dtype)
        return torch.cat(
            [
                torch.where(
                    seen[m][:, None], out[f"z_{m}"], self.absent[m](one).to(out[f"z_{m}"].dtype)
                )
                for m in self.modalities
            ],
            dim=-1,
        )

    def _gated(
        self, out: dict[str, torch.Tensor], fused: torch.Tensor, masks: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """softmax(gate([z_o; z_f])) . (fused, OCT head, fundus head); a head whose image the eye
        lacks gets no weight. The gate's weights per eye are ``out["gate"]`` (B, 3)."""
        preds = torch.stack([out["pred"], *(out[f"pred_{m}"] for m in self.modalities)], -1)
        logits = self.gate(fused).to(preds.dtype)
        usable = torch.stack([torch.ones_like(masks[self.modalities[0]]), *masks.values()], -1)
        weights = torch.softmax(logits.masked_fill(~usable, float("-inf")), dim=-1)
        out["gate"] = weights
        return (weights * preds).sum(-1)

    def _blended(self, out: dict[str, torch.Tensor], complete: torch.Tensor) -> torch.Tensor:
        w = self.head_blend.to(out["pred"].dtype)
        heads = torch.stack([out[f"pred_{m}"] for m in self.modalities], -1)
        mixed = (1 - w.sum()) * out["pred"] + (heads * w).sum(-1)
        return torch.where(complete, mixed, out["pred"])

    def _fusion_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the fusion head sees: the present images, less one image of a complete eye with
        probability `modality_dropout` while training (which one: a fair coin)."""
        if not self.training or self.modality_dropout <= 0 or len(self.modalities) != 2:
            return masks
        a, b = self.modalities
        complete = masks[a] & masks[b]
        drop = complete & (
            torch.rand(complete.shape, device=complete.device) < self.modality_dropout
        )
        which = torch.rand(complete.shape, device=complete.device) < 0.5
        return {a: masks[a] & ~(drop & which), b: masks[b] & ~(drop & ~which)}

    def normalise(self, md: torch.Tensor) -> torch.Tensor:
        return (md - self.md_center) / self.md_scale

    def to_db(self, pred: torch.Tensor) -> torch.Tensor:
        return pred * self.md_scale + self.md_center

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters gradient modulation scales for one modality: its whole branch."""
        return list(self.branches[modality].parameters())
