from remdr.data import load_dataset
from remdr.data.splits import patients, split_records


def test_splits_are_patient_disjoint_complete_and_seeded(tiny_data):
    recs = load_dataset(tiny_data).records
    a = split_records(recs, 0.2, 0.2, seed=3)
    pa = {k: patients(v) for k, v in a.items()}
    assert (
        not (pa["train"] & pa["val"])
        and not (pa["train"] & pa["test"])
        and not (pa["val"] & pa["test"])
    )
    assert sum(len(v) for v in a.values()) == len(recs)
    assert sorted(r.eye_id for v in a.values() for r in v) == sorted(r.eye_id for r in recs)
    b = split_records(recs, 0.2, 0.2, seed=3)
    assert all([r.eye_id for r in a[s]] == [r.eye_id for r in b[s]] for s in a)
    c = split_records(recs, 0.2, 0.2, seed=4)
    assert any({r.eye_id for r in a[s]} != {r.eye_id for r in c[s]} for s in a)
    n_patients = len(patients(recs))
    assert 0.1 * n_patients <= len(pa["test"]) <= 0.3 * n_patients
