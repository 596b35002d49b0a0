"""The generators: minimum counts, determinism, schemas, splits and leakage."""
import collections

import pytest

from medkit import kb as K
from medkit.data import generate, pipeline

MINIMUMS = {"passages": 300, "qa": 600, "mcq": 200, "cot": 200, "pref_pairs": 400, "triage": 300, "dialogues": 60}


@pytest.fixture(scope="module")
def KB():
    return K.load()


@pytest.fixture(scope="module")
def data(KB):
    return pipeline.build(KB, seed=0)


def test_minimum_counts(data):
    for name, n in MINIMUMS.items():
        assert data.total(name) >= n, f"{name}: {data.total(name)} < {n}"


def test_deterministic_given_a_seed(KB, data):
    again = pipeline.build(KB, seed=0)
    assert again.sets == data.sets and again.version == data.version
    other = generate.qa_pairs(KB, seed=1)
    same = generate.qa_pairs(KB, seed=0)
    assert [r["id"] for r in other] == [r["id"] for r in same]
    assert sum(a["question"] != b["question"] for a, b in zip(other, same)) > 100  # phrasing varies


def test_no_leakage_and_augmented_rows_stay_in_train(data):
    assert data.leakage == []
    for name in ("qa", "mcq"):
        for split in ("validation", "test"):
            assert not any(r.get("augmented") for r in data.sets[name][split])
        assert sum(r.get("augmented", False) for r in data.sets[name]["train"]) > 0
    train_q = {r["question"] for r in data.sets["qa"]["train"]}
    assert not any(r["question"] in train_q for r in data.sets["qa"]["test"])


def test_qa_test_is_not_a_copy_of_train_and_has_lay_phrasings(data):
    test = data.sets["qa"]["test"]
    assert len(test) >= 60
    assert any(r["lay"] for r in test) and any(not r["lay"] for r in test)
    groups_train = {(r["topic"], r["qtype"]) for r in data.sets["qa"]["train"]}
    assert not any((r["topic"], r["qtype"]) in groups_train for r in test)


def test_mcq_schema_is_medmcqa(data):
    for r in data.sets["mcq"]["test"]:
        assert set(r) >= {"question", "opa", "opb", "opc", "opd", "cop", "exp", "subject_name"}
        assert r["cop"] in (0, 1, 2, 3)
        options = [r["opa"], r["opb"], r["opc"], r["opd"]]
        assert len(set(options)) == 4, r


def test_cot_schema_is_medical_o1(data):
    for r in data.sets["cot"]["train"]:
        assert set(r) >= {"Question", "Complex_CoT", "Response"}
        assert "**Diagnosis:**" in r["Response"] and "**Treatment Plan:**" in r["Response"]


def test_preference_pairs_have_three_rejected_kinds(data):
    rows = [r for split in data.sets["pref_pairs"].values() for r in split]
    kinds = collections.Counter(r["rejected_kind"] for r in rows)
    assert set(kinds) == {"generic", "unsafe", "verbose"} and min(kinds.values()) >= 100
    assert all(r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"] for r in rows)
    generic = [r for r in rows if r["rejected_kind"] == "generic"]
    assert all(r["rejected"] in generate.GENERIC_NON_ANSWERS for r in generic)


def test_triage_cases_cover_every_level_with_reasons(data):
    rows = [r for split in data.sets["triage"].values() for r in split]
    levels = collections.Counter(r["level"] for r in rows)
    assert set(levels) == {"LOW", "MEDIUM", "HIGH"} and min(levels.values()) >= 50
    assert all(r["reasons"] for r in rows)


def test_dialogues_depend_on_early_facts(KB, data):
    rows = data.sets["dialogues"]["test"]
    kinds = collections.Counter(r["expected"]["kind"] for r in rows)
    assert set(kinds) == {"allergy", "ddi", "pregnancy"}
    for r in rows:
        assert len(r["turns"]) >= 3 and all(d in KB.drugs for d in r["expected"]["must_avoid"])
        if r["expected"]["kind"] == "allergy":
            cls = r["facts"]["allergies"][0]
            assert cls in r["turns"][0]["content"]
            assert all(KB.drugs[d]["allergy_class"] == cls for d in r["expected"]["must_avoid"])
        if r["expected"]["kind"] == "ddi":
            assert KB.interaction(*r["expected"]["interaction"]) is not None


def test_passage_ids_are_stable_and_unique(KB, data):
    ids = [p["id"] for p in data.sets["passages"]["all"]]
    assert len(ids) == len(set(ids))
    assert "cond.asthma.treatment" in ids and "drug.amoxicillin.dose" in ids


def test_saved_datasets_round_trip(tmp_path, data):
    folder = pipeline.save(data, tmp_path, hf=True)
    assert pipeline.load_split(folder, "qa", "test") == data.sets["qa"]["test"]
    from datasets import load_from_disk
    dd = load_from_disk(str(folder / "hf" / "mcq"))
    assert dd["train"].num_rows == len(data.sets["mcq"]["train"])
