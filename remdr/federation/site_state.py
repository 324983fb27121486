"""A site's cross-round state on its own disk, so a coordinator restart does not reset it.

Flower gives every run a fresh `context.state`, and a resumed run is a new Flower run, so state
kept only there (FedBN's local normalisation layers, the method's EMA modality scores) would
start empty after a coordinator restart; so would the site's AdamW moments. The site keeps them
beside its privacy ledger instead, in a folder per coordinator run (the run's `run-key`: its run
directory's name and a token), one file per round, so a round the coordinator redoes after a
restart starts from the state the previous round left, exactly as in an uninterrupted run. The
state never leaves the site.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROUND_RE = re.compile(r"round-(\d+)\.safetensors$")
OPTIMIZER = "optimizer/"  # tensor-name prefix of the optimiser's state; the rest are local layers


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """A torch optimiser state dict as (named tensors, JSON of the rest): safetensors-storable."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER}{idx}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{name}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    rest = json.loads(meta)
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key[len(OPTIMIZER) :].split("/", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for key, value in rest["scalars"].items():
        idx, name = key.split("/", 1)
        per_param.setdefault(int(idx), {})[name] = value
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]
    ]  # JSON made AdamW's betas a list
    return {"state": per_param, "param_groups": groups}


class SiteState:
    """`<root>/<run key>/round-NNN.safetensors`: the local layers and optimiser moments after
    round NNN, with the method's state as JSON metadata. Keeps the last two rounds."""

    def __init__(self, root: str | Path, run_key: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_key) or "run"
        self.dir = Path(root) / safe

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := ROUND_RE.search(p.name)))

    def load(self, before: int) -> tuple[dict | None, dict[str, torch.Tensor] | None, dict | None]:
        """(method state, local layers, optimiser state) after the latest round earlier than
        `before`; Nones when there is none (the first round of this run at this site)."""
        earlier = [r for r in self._rounds() if r < before]
        if not earlier:
            return None, None, None
        path = self.dir / f"round-{earlier[-1]:06d}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        local = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER)}
        moments = {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER)}
        method = json.loads(meta["method"]) if meta.get("method") else None
        optimizer = (
            unflatten_optimizer(moments, meta["optimizer"]) if meta.get("optimizer") else None
        )
        return method, (local or None), optimizer

    def save(
        self,
        server_round: int,
        method_state: dict,
        local_state: dict[str, torch.Tensor],
        optimizer_state: dict | None = None,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"round-{server_round:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in local_state.items()}
        meta = {"method": json.dumps(method_state)}
        if optimizer_state:
            moments, meta["optimizer"] = flatten_optimizer(optimizer_state)
            tensors.update(moments)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        for r in self._rounds():
            if r < server_round - 1:  # a redone round needs the one before it
                (self.dir / f"round-{r:06d}.safetensors").unlink(missing_ok=True)
