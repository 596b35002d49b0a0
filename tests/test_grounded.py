"""Grounded SFT rows (medkit.train.grounded): 06's prompt format, citations of the right passage,
abstentions with unrelated passages only, training questions only."""
import pytest

from medkit import kb as knowledge_base
from medkit.data import generate, pipeline
from medkit.rag import answer
from medkit.rag.evaluate import relevant_passage
from medkit.train import grounded, sft


@pytest.fixture(scope="module")
def data():
    kb = knowledge_base.load()
    return kb, pipeline.build(kb, seed=0), generate.passages(kb)


def test_rows_cite_the_passage_that_holds_the_answer(data):
    kb, course, passages = data
    train = course.sets["qa"]["train"]
    rows = grounded.grounded_rows(train, passages, 60, kb, abstain_share=0.25, seed=1)
    assert len(rows) == 60
    assert sum(r["grounded"] == "abstain" for r in rows) == 15
    by_q = {r["question"]: r for r in train}
    texts = {p["id"]: p["text"] for p in passages}
    for r in rows:
        system, user = r["prompt"]
        assert system == {"role": "system", "content": answer.SYSTEM_PROMPT}
        question = user["content"].split("\n", 1)[0].removeprefix("Question: ")
        gold = relevant_passage(by_q[question], kb)
        shown = [line.split('source="')[1].split('"')[0] for line in user["content"].splitlines() if line.startswith("<evidence")]
        assert len(shown) == 3
        if r["grounded"] == "abstain":
            assert r["answer"] == grounded.ABSTAIN_REPLY and not gold & set(shown)
            continue
        label = f"E{shown.index(r['evidence_id']) + 1}"
        assert r["evidence_id"] in gold
        ev = [answer.Evidence(f"E{i}", s, texts[s], 1.0) for i, s in enumerate(shown, 1)]
        check = answer.check_citations(r["answer"], ev)
        assert check["valid"] and label in check["cited"], r["answer"]
        for sent in answer.sentences(r["answer"]):  # each sentence cites a shown passage that supports it
            cited = ev[int(sent.rsplit("[E", 1)[1][0]) - 1]
            assert grounded._support(sent.rsplit(" [E", 1)[0], cited.text) >= 0.5, (sent, cited.id)


def test_only_training_questions_are_used_and_zero_means_none(data):
    kb, course, passages = data
    train = course.sets["qa"]["train"]
    held_out = {r["question"] for r in course.sets["qa"]["test"]} | {r["question"] for r in course.sets["qa"]["validation"]}
    rows = grounded.grounded_rows(train, passages, 80, kb, seed=0)
    asked = {r["prompt"][1]["content"].split("\n", 1)[0].removeprefix("Question: ") for r in rows}
    assert asked <= {r["question"] for r in train} and not asked & held_out
    assert grounded.grounded_rows(train, passages, 0, kb) == []


def test_a_passage_without_text_is_named(data):
    kb, course, passages = data
    bad = passages[:5] + [{"id": "cond.x.overview", "text": ""}]
    with pytest.raises(ValueError, match=r"passage row 5 \(cond.x.overview\): missing field `text`"):
        grounded.grounded_rows(course.sets["qa"]["train"], bad, 3, kb)


def test_sft_dataset_keeps_a_row_s_own_prompt(data):
    kb, course, passages = data
    rows = grounded.grounded_rows(course.sets["qa"]["train"], passages, 2, kb, abstain_share=0.0)
    plain = course.sets["qa"]["train"][:1]
    ds = sft.to_prompt_completion(plain + rows)
    assert ds[1]["prompt"] == rows[0]["prompt"] and ds[1]["completion"][0]["content"] == rows[0]["answer"]
    assert ds[0]["prompt"][1]["content"] == plain[0]["question"]
