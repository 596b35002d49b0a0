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


def test_cited_pairs_differ_only_in_the_labels_and_only_chosen_passes_the_check(data):
    kb, course, passages = data
    pairs = grounded.cited_pairs(course.sets["qa"]["train"], passages, 20, kb, seed=2)
    assert len(pairs) == 20 and {p["rejected_kind"] for p in pairs} == {"uncited"}
    for p in pairs:
        assert len(p["shown"]) == 2 and p["prompt"][0]["content"] == answer.SYSTEM_PROMPT
        ev = [answer.Evidence(label, pid, "", 1.0) for label, pid in p["shown"].items()]
        assert answer.check_citations(p["chosen"], ev)["valid"]
        assert not answer.check_citations(p["rejected"], ev)["valid"]
        assert "[E" not in p["rejected"] and p["rejected"].split() == [w for w in p["chosen"].replace(" [E1].", ".")
                                                                       .replace(" [E2].", ".").split()]


def test_citation_report_fails_answers_that_cite_wrongly(data, monkeypatch):
    """The rate can come out bad: an uncited answer, a label that was not shown and an abstention
    all fail 06's check; only the properly cited answer passes."""
    from medkit.train import common

    kb, course, passages = data
    rows = grounded.cited_pairs(course.sets["qa"]["train"], passages, 4, kb, seed=3)
    texts = [rows[0]["chosen"], rows[1]["rejected"], rows[2]["chosen"].replace("[E1]", "[E7]").replace("[E2]", "[E7]"),
             answer.ABSTAIN_REPLY]
    monkeypatch.setattr(common, "generate", lambda m, t, prompts, **kw: [{"text": x} for x in texts[: len(prompts)]])
    rep = grounded.citation_report(None, None, rows)
    assert rep["n"] == 4 and rep["valid_rate"] == 0.25
    assert rep["cites_rate"] == 0.5 and rep["abstain_rate"] == 0.25
    assert rep["checks"][2]["unknown_ids"] == ["E7"]
    assert grounded.citation_report(None, None, [])["valid_rate"] is None


def test_dpo_takes_a_messages_prompt_as_it_is(data, tmp_path):
    """Citation pairs carry 06's system prompt and evidence: DPO's data, length check and
    log-likelihoods use those messages, not the course's QA system prompt."""
    from conftest import SMALL_TINY
    from medkit import config, tiny
    from medkit.train import common, dpo

    kb, course, passages = data
    pairs = grounded.cited_pairs(course.sets["qa"]["train"], passages, 3, kb, seed=4)
    ds = dpo.to_dataset(pairs + course.sets["pref_pairs"]["train"][:2])
    assert ds[0]["prompt"] == pairs[0]["prompt"] and ds[3]["prompt"][0]["content"] == common.SYSTEM_PROMPT
    model_dir = tiny.build_base("qwen2", [p["text"] for p in passages][:200], dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY),
                                seed=0, cache=tmp_path, progress=False).path
    model, tok = common.load_causal_lm(str(model_dir), "float32", "cpu")
    kept, skipped = dpo.validate_pairs(pairs, tok, max_prompt_tokens=10)
    assert not kept and skipped[0]["reason"] == "prompt over 10 tokens"
    acc = dpo.preference_accuracy(model, tok, pairs)
    assert acc["n"] == 3 and set(acc["by_kind"]) == {"uncited"} and 0 <= acc["overall"] <= 1
    assert dpo.preference_accuracy(model, tok, [])["overall"] is None
