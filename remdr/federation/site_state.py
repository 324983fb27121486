"""A site's cross-round state on its own disk, so a coordinator restart does not reset it.

Flower gives every run a fresh `context.state`, and a resumed run is a new Flower run, so state
kept only there (FedBN's local normalisation layers, the method's EMA modality scores) would
start empty after a coordinator restart; so would the site's AdamW moments. The site keeps them
beside its privacy ledger instead, in a folder per coordinator run (the run's `run-key`: its run
directory's name and a token), one file per round, so a round the coordinator redoes after a
restart starts from the state the previous round left, exactly as in an uninterrupted run. The
state never leaves the site. With drift control (SCAFFOLD) it also holds the site's control
variate c_i: only its change of a round is sent, screened like an update.

The run key comes from the coordinator, so it must be a plain name (letters, digits, '.', '_',
'-', starting with a letter or digit): a key such as ".." would have the site write and prune
files outside its state folder. The folder also journals each training message the site has
started (`begin`), so a message handled twice (a site worker that failed mid-round, then the
ClientApp's fallback) is refused instead of spending the round's privacy budget a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from remdr.errors import ConfigError, PrivacyError

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
ROUND_RE = re.compile(r"round-(\d+)\.safetensors$")
OPTIMIZER = "optimizer/"  # tensor-name prefix of the optimiser's state; the rest are local layers
CONTROL = "control/"  # tensor-name prefix of the SCAFFOLD control variate c_i


@dataclass
class Carried:
    """What a site carries from one round to the next of a run (never sent as it is)."""

    method: dict | None = None  # the method's state (EMA modality scores, label density)
    local: dict[str, torch.Tensor] | None = None  # FedBN: the site's own normalisation layers
    optimizer: dict | None = None  # the site's AdamW moments
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the site's control variate c_i


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


def plain_run_key(run_key: str) -> str:
    """The coordinator's run key if it is a plain name (it names a folder at the site), else
    a one-line ConfigError."""
    if PLAIN_NAME.fullmatch(run_key):
        return run_key
    raise ConfigError(
        f"remdr-run {run_key[:60]!r} is not a plain name",
        "the site names a folder by it: letters, digits, '.', '_', '-', starting with a letter "
        "or digit",
        "the coordinator names its out-dir plainly, e.g. runs/study-a",
    )


class SiteState:
    """`<root>/<run key>/round-NNN.safetensors`: the local layers and optimiser moments after
    round NNN, with the method's state as JSON metadata. Keeps the last two rounds."""

    def __init__(self, root: str | Path, run_key: str) -> None:
        self.dir = Path(root) / plain_run_key(run_key)

    def begin(self, message: str) -> None:
        """Journal that this site started training `message` (Flower's run and message id),
        or refuse (PrivacyError) if it already did: a message is trained at most once."""
        started = self.dir / "started"
        started.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(message.encode()).hexdigest()[:32]
        try:
            os.close(os.open(started / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise PrivacyError(
                "this round was already started at this site",
                "a message is trained at most once, so a failed attempt never spends the "
                "round's privacy budget twice",
                "the coordinator's next round trains again",
            ) from None

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := ROUND_RE.search(p.name)))

    def load(self, before: int) -> Carried:
        """What the latest round earlier than `before` left; empty when there is none (the
        first round of this run at this site)."""
        earlier = [r for r in self._rounds() if r < before]
        if not earlier:
            return Carried()
        path = self.dir / f"round-{earlier[-1]:06d}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        moments = {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER)}
        control = {k[len(CONTROL) :]: v for k, v in tensors.items() if k.startswith(CONTROL)}
        local = {k: v for k, v in tensors.items() if not k.startswith((OPTIMIZER, CONTROL))}
        return Carried(
            method=json.loads(meta["method"]) if meta.get("method") else None,
            local=local or None,
            optimizer=(
                unflatten_optimizer(moments, meta["optimizer"]) if meta.get("optimizer") else None
            ),
            control=control or None,
        )

    def save(self, server_round: int, carried: Carried) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"round-{server_round:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in (carried.local or {}).items()}
        tensors.update(
            {
                f"{CONTROL}{k}": v.detach().cpu().contiguous()
                for k, v in (carried.control or {}).items()
            }
        )
        meta = {"method": json.dumps(carried.method or {})}
        if carried.optimizer:
            moments, meta["optimizer"] = flatten_optimizer(carried.optimizer)
            tensors.update(moments)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        for r in self._rounds():
            if r < server_round - 1:  # a redone round needs the one before it
                (self.dir / f"round-{r:06d}.safetensors").unlink(missing_ok=True)
