"""The ledger as a privacy officer reads it: every release, the running total, what is not covered.

Epsilon is recomputed from the ledger's releases here, not copied from the entries, so the report
states what the file proves.
"""

from __future__ import annotations

from pathlib import Path

from remdr.privacy.accounting import ACCOUNTANT, History, epsilon_of, release_of
from remdr.privacy.ledger import PrivacyLedger
from remdr.privacy.randomness import RANDOMNESS

NOT_COVERED = (
    "metrics a site reports each round (training loss, validation MSE/MAE per severity bin)",
    "dataset sizes (number of training and validation eyes) sent with each update",
    "normalisation: remdr uses fixed constants (no statistic of private images is computed); "
    "any statistic you fit on private images yourself is not covered",
    "choices made on private data outside the ledger (tuning runs, model selection on a "
    "validation split); DP training keeps the last weights for this reason",
    "the other sites' data and the server's aggregate: each site's ledger covers its own patients",
    "the number of skipped (corrupt or invalid) records and the training time sent with each "
    "update",
    "the sample rate and step count (in the ledger and sent with each update): they reveal the "
    "number of patients to within one batch",
    "attacks on the random number generator: the noise is drawn from torch's (non-cryptographic) "
    "generator seeded with 63 bits of OS entropy per training; Opacus' secure_mode (a CSPRNG and "
    "a guard against floating-point attacks on the Gaussian sampler) is off, because its "
    "dependency torchcsprng does not install",
    "releases made before the randomness was private (ledger entries without 'randomness'): their "
    "sampling and noise were seeded from the run seed, so whoever knows it can replay them",
)


def privacy_report(path: str | Path, delta: float | None = None) -> str:
    """The ledger as a privacy officer reads it: every release, the total, what is not covered."""
    ledger = PrivacyLedger(path)
    entries = ledger.entries()
    lines = [f"privacy ledger: {ledger.path}"]
    if not entries:
        return "\n".join(lines + ["no private training has used this site's data yet (epsilon 0)"])
    d = delta if delta is not None else float(entries[-1]["delta"])
    lines += [
        f"unit of privacy: {entries[-1]['unit']}; neighbouring datasets: {entries[-1]['relation']}",
        f"mechanism: {entries[-1]['mechanism']}; accountant: {ACCOUNTANT.upper()} (Opacus)",
        _randomness_line(entries),
        "",
        f"{'time (UTC)':20} {'run':>6} {'round':>5} {'method':10} {'status':9} {'patients':>8} "
        f"{'sigma':>6} {'C':>5} {'q':>7} {'steps':>6} {'eps (cum.)':>10}",
    ]
    history: History = []
    for e in entries:
        history.append(release_of(e))
        lines.append(
            f"{e.get('time', ''):20} {str(e.get('run', '-'))[-6:]:>6} {e.get('round', '-')!s:>5} "
            f"{e.get('method', '-'):10} {e.get('status', '-'):9} {e.get('patients', 0):>8} "
            f"{e['noise_multiplier']:>6.3g} {e['max_grad_norm']:>5.3g} {e['sample_rate']:>7.4f} "
            f"{e['steps']:>6} {epsilon_of(history, d):>10.3f}"
        )
    total = epsilon_of(history, d)
    last = history[-1]
    lines += [
        "",
        f"total: epsilon = {total:.3f} at delta = {d:g} over {len(entries)} releases "
        f"({sum(h[2] for h in history)} noisy steps)",
        f"one more release like the last would bring it to {epsilon_of(history + [last], d):.3f}",
        "",
        "not covered by this guarantee:",
        *(f"  - {item}" for item in NOT_COVERED),
    ]
    return "\n".join(lines)


def _randomness_line(entries: list[dict]) -> str:
    """Where the releases' sampling and noise came from (entries before issue 13 say nothing:
    they were seeded from the run seed)."""
    private = [e for e in entries if e.get("randomness") == RANDOMNESS]
    covers = ", ".join(private[-1].get("randomness_covers", ())) if private else ""
    line = (
        f"randomness: {RANDOMNESS} ({covers}), drawn fresh at the site for each training; "
        "the run seed does not set it"
        if private
        else "randomness: seeded from the run seed"
    )
    seeded = len(entries) - len(private)
    if private and seeded:
        line += f"; {seeded} earlier release(s) were seeded from the run seed"
    return line
