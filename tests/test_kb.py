import shutil

import pytest
import yaml

from medkit import kb


@pytest.fixture(scope="module")
def KB():
    return kb.load()


def test_knowledge_base_validates_with_the_course_minimums(KB):
    c = KB.counts()
    assert c["conditions"] >= 150 and c["drugs"] >= 100 and c["interactions"] >= 150
    assert c["red_flags"] >= 25 and c["lay_terms"] >= 100 and c["triage_rules"] >= 20


def test_every_condition_has_the_fields_the_course_relies_on(KB):
    for cid, c in KB.conditions.items():
        assert c["lay_terms"] and len(c["symptoms"]) >= 3 and c["red_flags"], cid
        assert kb.ICD10.match(c["icd10"]), cid
    acuity = {c["acuity"] for c in KB.conditions.values()}
    assert acuity == {"LOW", "MEDIUM", "HIGH"}


def test_drug_doses_are_numbers_in_order(KB):
    for did, d in KB.drugs.items():
        dose = d["adult_dose"]
        assert dose["single_dose_min"] <= dose["single_dose_max"], did
        if dose["max_daily"] is not None:
            assert dose["max_daily"] >= dose["single_dose_max"], did
    assert KB.drugs["paracetamol"]["adult_dose"]["max_daily"] == 4000  # BNF adult ceiling, mg


def test_allergy_classes_cover_the_classic_cross_reactions(KB):
    pens = {d for d, v in KB.drugs.items() if v["allergy_class"] == "penicillin"}
    assert {"amoxicillin", "co_amoxiclav", "flucloxacillin", "phenoxymethylpenicillin"} <= pens
    assert KB.drugs["ibuprofen"]["allergy_class"] == "nsaid"


def test_interaction_lookup_is_symmetric(KB):
    a = KB.interaction("warfarin", "ibuprofen")
    assert a is not None and a is KB.interaction("ibuprofen", "warfarin")
    assert KB.interaction("sildenafil", "glyceryl_trinitrate")["severity"] == "contraindicated"
    assert KB.interaction("paracetamol", "cetirizine") is None


def _copy(tmp_path):
    dst = tmp_path / "kb"
    shutil.copytree(kb.paths.data_dir() / "kb", dst)
    return dst


def _edit(path, fn):
    rows = yaml.safe_load(path.read_text())
    fn(rows)
    path.write_text(yaml.safe_dump(rows, sort_keys=False))


def test_validator_names_file_row_and_field(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder / "drugs.yaml", lambda rows: rows[3].pop("side_effects"))
    _edit(folder / "interactions.yaml", lambda rows: rows[0].update(severity="deadly"))
    _edit(folder / "conditions_a.yaml", lambda rows: rows[1].update(icd10="heart"))
    with pytest.raises(kb.KBError) as err:
        kb.validate(folder)
    msg = str(err.value)
    assert "drugs.yaml row 3" in msg and "missing field `side_effects`" in msg
    assert "interactions.yaml row 0" in msg and "severity `deadly`" in msg
    assert "conditions_a.yaml row 1" in msg and "icd10 `heart`" in msg
    assert len(err.value.problems) >= 3


def test_validator_rejects_unknown_drug_ids_and_duplicates(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder / "interactions.yaml", lambda rows: rows.append(dict(rows[0])))
    _edit(folder / "conditions_b.yaml", lambda rows: rows[0].update(first_line_drugs=["unobtainium"]))
    with pytest.raises(kb.KBError) as err:
        kb.validate(folder)
    msg = str(err.value)
    assert "duplicate pair" in msg and "unobtainium" in msg


def test_broken_yaml_is_a_clear_error(tmp_path):
    folder = _copy(tmp_path)
    (folder / "red_flags.yaml").write_text("- id: [unclosed\n")
    with pytest.raises(kb.KBError, match="red_flags.yaml: YAML error"):
        kb.validate(folder)
