"""Real-dataset loaders: the shared files, fixtures in each published schema, and bad input."""
import json

import pytest

from medkit.data import loaders
from medkit.data.loaders import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ the real shared files

@pytest.mark.shared_data
def test_all_pubmedqa_rows_load(shared_data):
    res = loaders.load("pubmedqa", shared_data / "pubmedqa_pqal.jsonl")
    assert len(res.rows) == 1000 and res.dropped == []
    assert sum(r["split"] == "test" for r in res.rows) == 500
    labels = {d: sum(r["final_decision"] == d for r in res.rows) for d in ("yes", "no", "maybe")}
    assert labels == {"yes": 552, "no": 338, "maybe": 110}  # SOURCES.md's counts


@pytest.mark.shared_data
def test_all_medquad_rows_load(shared_data):
    res = loaders.load("medquad", shared_data / "medquad.jsonl")
    assert len(res.rows) == 6000 and res.dropped == []
    assert len({r["topic"] for r in res.rows}) == 2854  # distinct foci, per SOURCES.md


# ------------------------------------------------------------------ fixtures in published schemas

def test_medmcqa_hf_and_original_cop_bases(tmp_path):
    hf = _jsonl(tmp_path / "hf.jsonl", [{"id": "a", "question": "Q?", "opa": "1", "opb": "2", "opc": "3", "opd": "4",
                                         "cop": 0, "exp": "because", "subject_name": "Anatomy"}])
    assert loaders.load("medmcqa", hf).rows[0]["cop"] == 0
    orig = _jsonl(tmp_path / "orig.jsonl", [{"id": "b", "question": "Q?", "opa": "1", "opb": "2", "opc": "3",
                                             "opd": "4", "cop": 4}])
    assert loaders.load("medmcqa", orig, cop_base=1).rows[0]["cop"] == 3
    res = loaders.load("medmcqa", orig)  # 4 is out of range for 0-based: a counted drop
    assert res.rows == [] and "out of range" in res.dropped[0]["reason"]


def test_pubmedqa_hf_layout(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"pubid": 1, "question": "Q?", "context": {"contexts": ["c1"], "labels": ["B"]},
                                       "long_answer": "LA", "final_decision": "Yes"}])
    row = loaders.load("pubmedqa", f).rows[0]
    assert row["contexts"] == ["c1"] and row["final_decision"] == "yes" and row["id"] == "1"


def test_pubmedqa_original_json_keyed_by_pmid(tmp_path):
    f = tmp_path / "ori_pqal.json"
    f.write_text(json.dumps({"123": {"QUESTION": "Q?", "CONTEXTS": ["c"], "LONG_ANSWER": "a", "final_decision": "no"}}))
    assert loaders.load("pubmedqa", f).rows[0]["id"] == "123"


def test_medical_o1_chatdoctor_huatuo_csv_parquet(tmp_path):
    o1 = _jsonl(tmp_path / "o1.jsonl", [{"Question": "q", "Complex_CoT": "think", "Response": "r"}])
    assert loaders.load("medical_o1", o1).rows[0]["Complex_CoT"] == "think"
    cd = _jsonl(tmp_path / "cd.jsonl", [{"instruction": "You are a doctor", "input": "I have a cough", "output": "Rest."}])
    assert loaders.load("chatdoctor", cd).rows[0]["question"] == "I have a cough"
    hu = _jsonl(tmp_path / "hu.jsonl", [{"questions": [["q1", "q1b"]], "answers": ["a1"]}])
    assert loaders.load("huatuo", hu).rows[0] | {} == {"id": "huatuo-0", "question": "q1", "answer": "a1",
                                                       "topic": None, "qtype": None, "source": "huatuo"}
    csvf = tmp_path / "qa.csv"
    csvf.write_text("question,answer\nWhat is asthma?,A lung condition.\n")
    assert loaders.load("csv_qa", csvf).rows[0]["answer"] == "A lung condition."
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "qa.parquet")
    assert loaders.load("csv_qa", tmp_path / "qa.parquet").rows[0]["question"] == "q"


# ------------------------------------------------------------------ bad input

def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n{"question": "d", "answer": "e"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        loaders.load("csv_qa", f)
    res = loaders.load("csv_qa", f, lenient=True)
    assert len(res.rows) == 2 and res.dropped[0]["row"] == 2 and "malformed JSON" in res.dropped[0]["reason"]


def test_json_strings_with_unicode_line_separators_are_one_line(tmp_path):
    f = _jsonl(tmp_path / "u.jsonl", [{"question": "a\u2028b", "answer": "c\x85d"}])
    assert loaders.load("csv_qa", f).rows[0]["question"] == "a\u2028b"


def test_missing_required_field_is_a_counted_drop(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2"}, {"answer": "a3"}])
    res = loaders.load("csv_qa", f)
    assert len(res.rows) == 1
    assert res.drop_counts() == {"missing field `answer`": 1, "missing field `question`": 1}
    assert [d["row"] for d in res.dropped] == [2, 3]


def test_wrong_encoding_is_a_clear_error(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("question,answer\nCaf\xe9 au lait spots?,A birthmark.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text .* line 2"):
        loaders.load("csv_qa", f)


def test_unknown_dataset_missing_file_and_hub_off(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        loaders.load("nope", tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="hub downloads are off"):
        loaders.load("medmcqa")  # the HF id, on a profile that cannot download
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        loaders.load("csv_qa", tmp_path / "x.txt")


def test_duplicate_ids_are_refused(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"id": "1", "question": "q", "answer": "a"}, {"id": "1", "question": "q2", "answer": "a2"}])
    with pytest.raises(DataError, match="duplicate id"):
        loaders.load("csv_qa", f)
