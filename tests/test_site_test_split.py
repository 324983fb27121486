"""A site's own test split is never trained on, never validated on, never selects a model; it is
reported per site for the final and the best global model."""

from __future__ import annotations

import shutil

import torch
from flwr.app import MessageType
from remdr.server.reply_metrics import aggregate_metrics
from site_app import app
from test_client_app import RUN_CONFIG, _context, _initial, _message

from remdr.federation.run_config import split_run_config
from remdr.federation.run_directory import RunDirectory
from remdr.federation.site_round import load_site


def _shipped(tiny_data, root, counts):
    """A site folder with its own splits, as test_data.py::test_shipped_splits_are_used makes."""
    files = sorted(tiny_data.glob("*.npz"))
    start = 0
    for split, n in counts:
        dst = root / split
        dst.mkdir(parents=True)
        for f in files[start : start + n]:
            shutil.copy(f, dst / f"{split}_{f.name}")
        start += n
    return root


def _eyes(ds) -> set[str]:
    return {r.path for r in ds.records}


def test_a_sites_test_split_stays_out_of_train_and_val(tiny_data, tmp_path):
    cfg, _ = split_run_config(RUN_CONFIG)
    site = load_site(
        _shipped(tiny_data, tmp_path / "h", [("train", 8), ("val", 3), ("test", 4)]), cfg
    )
    assert (len(site.train), len(site.val), len(site.test)) == (8, 3, 4)
    assert all("/test/" in p for p in _eyes(site.test))
    assert not _eyes(site.test) & (_eyes(site.train) | _eyes(site.val))
    # a site shipping train/ and test/ only: validation comes out of train/, test stays apart
    site = load_site(_shipped(tiny_data, tmp_path / "g", [("train", 20), ("test", 4)]), cfg)
    assert len(site.test) == 4 and len(site.val) > 0
    assert not _eyes(site.test) & (_eyes(site.train) | _eyes(site.val))


def test_test_metrics_are_reported_per_site_and_never_select_the_model(tiny_data, tmp_path):
    data = _shipped(tiny_data, tmp_path / "h", [("train", 8), ("val", 3), ("test", 4)])
    reply = app(
        _message(MessageType.EVALUATE, _initial(RUN_CONFIG), {"server-round": 1}),
        _context(data, RUN_CONFIG),
    )
    m = reply.content["metrics"]
    assert m["num-val"] == m["num-examples"] == 3 and m["num-test"] == 4 and m["test-mse"] > 0
    # the aggregate the coordinator selects on has no test numbers
    agg = aggregate_metrics([reply.content], "num-examples")
    assert agg["val-mse"] == m["val-mse"] and not [k for k in agg if "test" in k]

    run = RunDirectory(tmp_path / "run")
    site = {"eval-val-mse": 1.0, "eval-test-mse": 9.0, "eval-num-test": 4}
    run.save_round(1, {"w": torch.zeros(1)}, {"evaluate": {"val-mse": 5.0}, "sites": {"A": site}})
    site = {"eval-val-mse": 2.0, "eval-test-mse": 1.0, "eval-num-test": 4}
    run.save_round(2, {"w": torch.ones(1)}, {"evaluate": {"val-mse": 6.0}, "sites": {"A": site}})
    report = run.write_report({})
    assert report["best"]["round"] == 1  # lowest validation MSE, though round 2 tests better
    assert report["site_test"]["best"]["A"] == {"round": 1, "test-mse": 9.0, "num-test": 4}
    assert report["site_test"]["final"]["A"] == {"round": 2, "test-mse": 1.0, "num-test": 4}
