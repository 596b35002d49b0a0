import json

from medkit import kb as K
from medkit.data import augment, clean


def test_normalize_removes_html_and_odd_whitespace():
    assert clean.normalize_text("<p>Take&nbsp;it <b>twice</b>\u00a0daily</p>\n\n") == "Take it twice daily"
    assert clean.normalize_text("ﬁbrosis  \u200b x") == "fibrosis x"  # NFKC ligature, zero-width dropped


def test_pii_scrubbing():
    text, n = clean.scrub_pii("Hi, my name is John Smith, mail john.smith@example.org or call +44 7700 900123. "
                              "MRN: 12345678, SSN 123-45-6789.")
    assert "John" not in text and "Smith" not in text and "[NAME]" in text
    assert "[EMAIL]" in text and "[PHONE]" in text and "12345678" not in text and "123-45-6789" not in text
    assert n >= 5
    same, k = clean.scrub_pii("Take 500 mg every 8 hours for 5 days; eGFR 45.")
    assert k == 0 and same == "Take 500 mg every 8 hours for 5 days; eGFR 45."


def test_clean_counts_every_drop_with_a_reason():
    rows = [{"id": "1", "question": "What is asthma exactly?", "answer": "A chronic airway disease with wheeze."},
            {"id": "2", "question": "What is asthma exactly?", "answer": "A chronic airway disease with wheeze."},
            {"id": "3", "question": "What is asthma exactly??", "answer": "A chronic airway disease with wheeze!"},
            {"id": "4", "question": "Hi", "answer": "Too short to teach anything useful here."},
            {"id": "5", "question": "What is gout?", "answer": ""},
            {"id": "6", "question": "What is gout in the big toe?", "answer": " ".join(["word"] * 50)}]
    res = clean.clean_rows(rows, max_tokens=40, near_dup_threshold=0.8)
    assert [r["id"] for r in res.kept] == ["1"]
    reasons = {d["id"]: d["reason"] for d in res.dropped}
    assert reasons["2"].startswith("exact duplicate (of 1)")
    assert reasons["3"].startswith("near duplicate (of 1)")
    assert reasons["4"].startswith("too short") and reasons["5"] == "missing text field `answer`"
    assert reasons["6"].startswith("too long")
    assert len(res.kept) + len(res.dropped) == len(rows)
    assert res.clusters == [["1", "2", "3"]]


def test_split_is_deterministic_and_grouped():
    rows = [{"id": str(i), "topic": f"t{i % 20}"} for i in range(400)]
    a = clean.split_by_hash(rows, group="topic")
    b = clean.split_by_hash(list(reversed(rows)), group="topic")
    assert {s: sorted(r["id"] for r in v) for s, v in a.items()} == {s: sorted(r["id"] for r in v) for s, v in b.items()}
    topics = {s: {r["topic"] for r in v} for s, v in a.items()}
    assert not (topics["train"] & topics["test"]) and not (topics["train"] & topics["validation"])


def test_leakage_check_finds_a_crossing_near_duplicate():
    train = [{"id": "a", "question": "what are the symptoms of type 2 diabetes in adults", "answer": "thirst and tiredness"}]
    test = [{"id": "b", "question": "what are the symptoms of type 2 diabetes in adults?", "answer": "thirst and tiredness"},
            {"id": "c", "question": "how is gout treated", "answer": "colchicine or an nsaid"}]
    assert clean.leakage_pairs(train, test) == [("a", "b")]


def test_drop_report_files(tmp_path):
    dropped = [{"dataset": "qa", "id": "1", "stage": "dedup", "reason": "exact duplicate (of 0)", "row": {}}]
    path, table = clean.write_drop_report(dropped, tmp_path)
    assert json.loads(path.read_text().splitlines()[0])["id"] == "1"
    assert "| qa | dedup | exact duplicate | 1 |" in table and (tmp_path / "drop_summary.md").exists()


def test_augmentation_doubles_and_marks_rows():
    kb = K.load()
    rows = [{"id": "q1", "question": "What are the symptoms of hypertension?", "answer": "Often none."},
            {"id": "q2", "question": "How is asthma treated?", "answer": "Inhalers."}]
    out = augment.augment(rows, kb, factor=2, seed=0)
    assert len(out) == 4 and out[:2] == rows
    new = out[2:]
    assert all(r["augmented"] and r["augmented_from"] in ("q1", "q2") for r in new)
    assert all(n["question"] != o["question"] and n["answer"] == o["answer"] for n, o in zip(new, rows))
    assert augment.augment(rows, kb, factor=2, seed=0) == out  # deterministic
