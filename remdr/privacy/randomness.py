"""The randomness of private training: fresh OS entropy at the site, never the run seed.

Amplification by subsampling needs the Poisson sampling to be secret, and the Gaussian mechanism
needs the noise to be secret: whoever can replay them can subtract the noise. The run seed is
chosen and known by the coordinator (and is the same at every site), so every draw a private
training makes is seeded here from the operating system's entropy (`secrets`, i.e.
`os.urandom`), once per site and per session, and that seed is never stored or sent.

Covered: Poisson sampling of patients, the Gaussian noise, the eye drawn for each patient's row,
augmentation and dropout (the last three need no secrecy for the guarantee, which holds for any
fixed choice of them, but they shape what is released, so they come from here too).

Not covered: torch's generators are not cryptographic (Mersenne Twister on CPU, Philox on CUDA),
and Opacus' `secure_mode` (a CSPRNG for the noise and a guard against floating-point attacks on
the Gaussian sampler) is off, because its dependency `torchcsprng` (last release 0.2.1, 2021,
built for torch 1.8) does not install here. `report.NOT_COVERED` says so.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import torch

RANDOMNESS = "os-entropy"
COVERS = ("poisson-sampling", "gaussian-noise", "eye-per-patient", "augmentation", "dropout")


def entropy_seed() -> int:
    """63 fresh bits from the operating system; unrelated to any configured seed."""
    return secrets.randbits(63)


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from OS entropy."""
    return torch.Generator(device=device).manual_seed(entropy_seed())


@contextmanager
def private_global_rng(device: torch.device) -> Iterator[None]:
    """Within the block, torch's global generators (dropout) are seeded from OS entropy; the
    seeded state is restored after it, so code outside keeps its reproducible stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(entropy_seed())
        yield
