"""One row per patient, so clipping a row bounds everything the patient contributes to a step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from torch.utils.data import Dataset

from remdr.privacy.randomness import entropy_seed


class PatientRows(Dataset):
    """One row per patient: each access returns one of the patient's eyes, drawn at random.

    The row depends on that patient's data alone (plus randomness independent of the data), so
    clipping it bounds everything the patient contributes to a step. Opacus' Poisson loader then
    includes each patient in a step independently with the planned sample rate. The eye is drawn
    from OS entropy unless a `seed` is given (tests only): never from the run seed.
    """

    def __init__(
        self, eyes: Dataset, patient_ids: Iterable[str], *, seed: int | None = None
    ) -> None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, pid in enumerate(patient_ids):
            groups[pid].append(i)
        self.eyes, self.groups = eyes, list(groups.values())
        self.rng = np.random.default_rng(entropy_seed() if seed is None else seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, p: int):
        eyes = self.groups[p]
        return self.eyes[eyes[int(self.rng.integers(len(eyes)))]]
