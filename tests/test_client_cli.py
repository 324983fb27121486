"""remdr-client refuses bad data and missing keys before it connects; corrupt files are counted."""

from __future__ import annotations

import shutil

from remdr.client import cli as client_cli
from site_app import app

from remdr.privacy import PrivacyLedger


def _run(capsys, *args) -> tuple[int, str, str]:
    code = client_cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_or_empty_data_is_one_line_before_connecting(tmp_path, capsys):
    for folder in (tmp_path / "nope", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        code, out, err = _run(
            capsys, "start", "--data", str(folder), "--site-id", "A", "--insecure"
        )
        assert code == 2 and "connecting" not in out
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_files_are_skipped_and_counted_and_the_site_still_trains(
    tiny_data, tmp_path, capsys
):
    site = tmp_path / "site"
    shutil.copytree(tiny_data, site)
    victims = sorted(site.glob("*.npz"))[:3]
    for path in victims[:2]:
        path.write_bytes(path.read_bytes()[:100])  # truncated
    victims[2].write_bytes(b"not an npz at all")
    code, out, _ = _run(capsys, "start", "--data", str(site), "--check-only")
    assert code == 0 and "skipped 3" in out

    from test_client_app import RUN_CONFIG, MessageType, _context, _initial, _message

    reply = app(
        _message(MessageType.TRAIN, _initial(RUN_CONFIG), {"server-round": 1}),
        _context(site, RUN_CONFIG),
    )
    assert not reply.has_error()
    assert reply.content["metrics"]["skipped-records"] == 3


def test_a_secure_start_without_keys_stops_before_connecting(tiny_data, tmp_path, capsys):
    code, out, err = _run(capsys, "start", "--data", str(tiny_data), "--site-id", "A")
    assert code == 2 and "private key" in err and "connecting" not in out


def test_privacy_report_reads_the_sites_ledger(tmp_path, capsys):
    ledger = tmp_path / "l.jsonl"
    code, out, _ = _run(capsys, "privacy-report", "--ledger", str(ledger))
    assert code == 0 and "epsilon 0" in out
    PrivacyLedger(ledger).append(
        {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 8, "delta": 1e-5,
         "unit": "patient", "relation": "add/remove", "mechanism": "DP-SGD", "max_grad_norm": 1.0}
    )  # fmt: skip
    code, out, _ = _run(capsys, "privacy-report", "--ledger", str(ledger))
    assert code == 0 and "total: epsilon = " in out and "not covered" in out


def test_the_threads_a_site_trains_with_default_to_its_cores_and_can_be_set(tiny_data, capsys):
    from remdr.ops.processes import usable_cores

    code, out, _ = _run(capsys, "start", "--data", str(tiny_data), "--check-only")
    assert code == 0 and f"training would use {usable_cores()} CPU thread(s)" in out
    code, out, _ = _run(capsys, "start", "--data", str(tiny_data), "--check-only", "--threads", "3")
    assert code == 0 and "training would use 3 CPU thread(s)" in out
    code, _, err = _run(capsys, "start", "--data", str(tiny_data), "--check-only", "--threads", "0")
    assert code == 2 and "--threads 0" in err and len(err.strip().splitlines()) == 1
