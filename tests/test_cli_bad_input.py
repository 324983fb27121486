"""Bad input to any installed command is one line on stderr, exit code 2, no traceback, no work.

Each test runs its command's first invocation as a user runs it (the installed console script,
as a subprocess: interpreter start-up, imports and entry point included) and the other
invocations in this process through the same entry point (`[project.scripts]`), with stdout,
stderr and the command's log lines captured as the console would show them. The subprocess costs
seconds of start-up per call; the checks are the same for both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from commands import Result, installed, run_in_process
from remdr.server import cli as server_cli
from remdr.sim import cli as sim_cli

from remdr.cli import bench as bench_cli
from remdr.cli import train as train_cli
from remdr.config import flat_keys
from remdr.federation.run_config import fed_keys


def _run(*commands: list[str]) -> list[Result]:
    """The first command as an installed subprocess (started first, so it runs while the others
    run here), the rest in this process."""
    first = installed(commands[0])
    rest = [run_in_process(cmd) for cmd in commands[1:]]
    stdout, stderr = first.communicate(timeout=120)
    return [Result(first.returncode, stdout, stderr), *rest]


def _refused(cases: list[tuple[list[str], list[str]]]) -> list[str]:
    """Every case exits 2 with one stderr line that starts with the program and holds `says`;
    the lines, for more checks."""
    results = _run(*(cmd for cmd, _ in cases))
    lines = []
    for (cmd, says), res in zip(cases, results, strict=True):
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2, (cmd, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr and len(err) == 1, (cmd, res.stderr)
        assert err[0].startswith(cmd[0]) and "error:" in err[0], (cmd, err[0])
        for text in says:
            assert text in err[0], (cmd, text, err[0])
        lines.append(err[0])
    return lines


@pytest.fixture()
def places(tmp_path) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        "empty": str(empty),
        "missing": str(tmp_path / "missing"),
        "file": str(a_file),
        "out": str(tmp_path / "out"),
    }


def test_remdr_train(places):
    out = ["--out", places["out"]]
    *_, empty = _refused(
        [
            # every problem of flags and keys at once, before any data is read
            (["remdr-train", "--set", "zzz=1", "--set", "image_sise=3", "--set", "lr=nan",
              "--epochs", "0", "--batch-size", "-3", "--method", "nonsense", "--seed", "true",
              "--set", "lr", "--data", places["missing"], *out],
             ["9 problems", "unknown config key 'zzz'", "--list-keys", "did you mean image-size",
              "lr=nan", "finite", "epochs=0", "batch-size=-3", "method='nonsense'", "seed='true'",
              "KEY=VALUE", "does not exist"]),
            (["remdr-train", "--epochs", "--out", places["file"]],
             ["--epochs", "expected one argument", "--help"]),
            (["remdr-train", "--data", places["empty"], *out], [places["empty"]]),
            (["remdr-train", "--synthetic", "--set", "image-size=4", *out],
             ["image-size=4", ">= 16"]),
        ]
    )  # fmt: skip
    assert "does not exist" not in empty  # an empty folder is not a missing one
    assert not Path(places["out"]).exists()  # refused before anything was written


def test_remdr_predict(places):
    _refused(
        [
            (["remdr-predict"], ["required", "--model", "--data"]),
            (["remdr-predict", "--model", places["missing"], "--data", places["missing"]],
             ["2 problems", "--model", "--data", "does not exist"]),
            (["remdr-predict", "--model", places["empty"], "--data", places["empty"],
              "--batch-size", "0", "--device", "gpu"], ["--batch-size 0", "--device gpu"]),
            (["remdr-predict", "--model", places["empty"], "--data", places["empty"]],
             ["not a remdr run directory"]),
            (["remdr-predict", "--model", "m", "--data", "d", "--batch-size", "x"],
             ["invalid int value"]),
        ]
    )  # fmt: skip


def test_remdr_bench(places):
    _refused(
        [
            (["remdr-bench", "methods", "--methods", "concat,remdrr", "--seeds", "0", "--set",
              "con-tau=0", "--epochs", "0", "--out", places["file"]],
             ["--methods remdrr", "did you mean remdr", "--seeds 0", "con-tau=0", "epochs=0",
              "e.g. epochs=24", "is a file"]),  # the training default
            (["remdr-bench", "speed", "--steps", "0", "--set", "lr=inf"], ["--steps 0", "lr=inf"]),
            (["remdr-bench", "federation", "--sites", "0", "--eyes-per-site", "2"],
             ["--sites 0", "--eyes-per-site 2"]),
        ]
    )  # fmt: skip


def test_remdr_sim(places):
    out = ["--out", places["out"]]
    _refused(
        [
            (["remdr-sim", "--sites", "0", "--alpha", "nan", "--fed", "zzz=1", "--fed",
              "round-timeout=nan", "--fed", "lr=0.1", "--set", "lr=-1", "--strategy", "fedsgd",
              *out],
             ["7 problems", "--sites 0", "--alpha nan", "--fed zzz=1", "round-timeout=nan",
              "a config key", "--set lr=0.1", "lr=-1", "strategy='fedsgd'"]),
            (["remdr-sim", "--partition", "nonsense", *out], ["invalid choice"]),
            (["remdr-sim", "--data", places["empty"], *out], [places["empty"]]),
        ]
    )  # fmt: skip
    assert not Path(places["out"]).exists()


def test_remdr_server(places, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "nonsense"\nlr = nan\nnum-server-rounds = 0\nbogus = 1\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("method = \n")
    _refused(
        [
            (["remdr-server"], ["required", "command"]),
            (["remdr-server", "start", "--port", "0"], ["--port 0", "65535"]),
            (["remdr-server", "run", "--config", str(bad), "--insecure"],
             ["4 problems", "method='nonsense'", "lr=nan", "num-server-rounds=0", "'bogus'"]),
            (["remdr-server", "run", "--config", str(broken), "--insecure"], ["not valid TOML"]),
            (["remdr-server", "run", "--federation", "nohost", "--wait", "-1"],
             ["3 problems", "--federation nohost", "--wait -1", "--root-cert"]),
            (["remdr-server", "register", places["missing"], "--insecure"], ["not found"]),
        ]
    )  # fmt: skip


def test_remdr_client(places, tiny_data):
    data = ["--data", str(tiny_data)]
    _refused(
        [
            (["remdr-client", "start"], ["required", "--data"]),
            (["remdr-client", "start", "--data", places["missing"], "--insecure", "--site-id", "A"],
             ["does not exist"]),
            (["remdr-client", "start", "--data", places["empty"], "--check-only"],
             [places["empty"]]),
            (["remdr-client", "start", *data, "--site-id", "a/b", "--port", "0", "--superlink",
              "foo", "--insecure"], ["--site-id a/b", "--port 0", "--superlink foo"]),
            (["remdr-client", "start", *data, "--site-id", "A"], ["private key"]),
            (["remdr-client", "start", *data, "--check-only", "--epsilon-max", "nan"],
             ["--epsilon-max nan"]),
            (["remdr-client", "privacy-report", "--delta", "2"], ["--delta 2"]),
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    "cli, argv, federation",
    [
        (train_cli, [], False),
        (bench_cli, ["methods"], False),
        (sim_cli, [], True),
        (server_cli, ["run"], True),
    ],
)
def test_list_keys_prints_every_key_and_exits(cli, argv, federation, capsys):
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args([*argv, "--list-keys"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == set(flat_keys()) | (set(fed_keys()) if federation else set())
    if cli is bench_cli:
        assert re.search(r"^  epochs +24 ", out, re.M)  # the training default it measures


def test_list_keys_works_as_installed(places):
    [res] = _run(["remdr-train", "--list-keys", "--out", places["out"]])
    assert res.returncode == 0 and not res.stderr and "  dp-ledger " in res.stdout
    assert not Path(places["out"]).exists()
