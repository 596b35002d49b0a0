"""Held-out QA split by what the tiny bases read in pre-training: the one definition of "seen"
(medkit.data.pipeline.seen_in_pretraining) and the per-group scores the notebooks report."""
import pytest

from medkit.data import pipeline
from medkit.evaluate import heldout


def test_seen_means_word_for_word_after_normalising():
    corpus = ["Paracetamol relieves mild pain and fever.", "Ibuprofen is an NSAID; take it with food."]
    flags = pipeline.seen_in_pretraining(
        ["paracetamol RELIEVES mild pain", "Ibuprofen is an NSAID. Take it", "relieves fever", "NSAID take it with food!",
         "", "is an", "para"], corpus)
    assert flags == [True, True, False, True, False, True, False]  # "para" is not a whole word


def test_seen_never_spans_two_corpus_texts():
    assert pipeline.seen_in_pretraining(["fever ibuprofen"], ["relieves fever", "ibuprofen is"]) == [False]


def test_course_test_split_has_both_groups_and_the_saved_corpus_matches(tmp_path, kbase):
    data = pipeline.build(kbase, seed=0)
    folder = pipeline.save(data, tmp_path, hf=False)
    assert pipeline.saved_pretraining_corpus(folder) == pipeline.pretraining_corpus(data)
    test = data.sets["qa"]["test"]
    seen = pipeline.seen_in_pretraining([r["answer"] for r in test], pipeline.pretraining_corpus(data))
    assert 0 < sum(seen) < len(seen)  # some held-out answers are passage sentences, most are not
    train = [r["answer"] for r in data.sets["qa"]["train"] if not r.get("augmented")]
    assert all(pipeline.seen_in_pretraining(train[:20], pipeline.pretraining_corpus(data)))


def test_split_scores_scores_each_group_apart(monkeypatch):
    from medkit.train import common

    calls = []

    def fake(model, tok, prompts, answers):
        calls.append(list(answers))
        return {"loss": float(len(answers)), "perplexity": 1.0, "token_accuracy": 0.5}

    monkeypatch.setattr(common, "completion_scores", fake)
    answers = ["a b", "c d", "e f", "g h"]
    split = heldout.split_scores(None, None, [[]] * 4, answers, [True, False, False, True], texts=["a b", "x"])
    assert calls == [["a b", "g h"], ["c d", "e f"]]
    assert split["seen"]["n"] == 2 and split["unseen"]["n"] == 2
    assert split["seen"]["n_gen"] == 1 and split["seen"]["rougeL"] == pytest.approx(1.0)
    assert split["unseen"]["n_gen"] == 1 and split["unseen"]["rougeL"] == pytest.approx(0.0)
    keys = heldout.record_keys("sft", "after", split)
    assert keys["sft.n_test_unseen"] == 2 and keys["sft.eval_loss_after_unseen"] == 2.0
    assert "sft.rougeL_after_seen" in keys
    t = heldout.table({"before": split, "after": split})
    assert list(t.columns) == ["before", "after"] and t.loc[("unseen", "n"), "after"] == 2
    with pytest.raises(ValueError, match="differ in length"):
        heldout.split_scores(None, None, [[]], answers, [True], None)


def test_an_empty_group_has_a_count_and_no_scores(monkeypatch):
    from medkit.train import common

    monkeypatch.setattr(common, "completion_scores", lambda m, t, p, a: {"loss": 1.0})
    split = heldout.split_scores(None, None, [[]] * 2, ["a", "b"], [False, False])
    assert split["seen"] == {"n": 0} and "sft.eval_loss_after_seen" not in heldout.record_keys("sft", "after", split)
