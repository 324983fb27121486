"""The CUDA path (bf16 autocast, channels-last, pinned memory) with the production preset's
backbones. Skipped without a GPU; `deploy/gpu-check` runs it on one."""

from __future__ import annotations

import pytest
import torch

from remdr.bench import measure_speed
from remdr.config import apply_overrides
from remdr.experiment import load_splits, train_and_test
from remdr.presets import apply_preset
from remdr.runtime import autocast_for, prepare_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _paper_cfg(tiny_cfg):
    cfg = apply_preset(tiny_cfg, "paper")
    return apply_overrides(cfg, {"device": "cuda", "image-size": 64, "num-workers": 0})


def test_cuda_training_uses_bf16_channels_last_and_pinned_memory(tiny_cfg, tiny_data):
    cfg = _paper_cfg(tiny_cfg)
    data = load_splits(tiny_data, cfg, split_seed=0)
    out = train_and_test(cfg, data, progress=False)
    assert out.test_metrics["n"] > 0 and torch.isfinite(torch.tensor(out.test_metrics["mse"]))
    device = torch.device("cuda")
    model = prepare_model(out.model, device)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with autocast_for(device)():
        x = torch.randn(2, 3, 8, 8, device=device)
        assert (x @ x.transpose(-1, -2)).dtype == torch.bfloat16


def test_cuda_speed_bench_reports_throughput_and_peak_memory(tiny_cfg, tiny_data):
    cfg = _paper_cfg(tiny_cfg)
    data = load_splits(tiny_data, cfg, split_seed=0)
    results = measure_speed(cfg, data, ["concat", "remdr"], steps=2, rounds=2, warmup=1)
    assert all(r.pairs_per_second > 0 and r.peak_memory_mb for r in results)
