"""The repeated-n-gram loop detector (medkit.metrics.is_looping / loop_rate)."""
from medkit import metrics

LOOP = ("Common symptoms include increased thirst, fatigue and blurred vision. It can also cause slow "
        "healing of wounds, slow healing of wounds, slow healing of wounds and slow healing of wounds.")
LIST = ("Common symptoms of type 2 diabetes include increased thirst, passing urine often, tiredness, "
        "blurred vision, slow healing of cuts and weight loss. See a doctor for a blood test.")


def test_a_reply_that_repeats_a_phrase_loops_and_a_list_does_not():
    assert metrics.is_looping(LOOP)
    assert not metrics.is_looping(LIST)
    gram, count = metrics.repeated_ngram(LOOP)
    assert gram == "slow healing of wounds" and count == 4


def test_loops_of_one_word_or_of_punctuation_count_too():
    assert metrics.is_looping("the the the the the the the")
    assert metrics.is_looping("Yes!!!!!!!!!!!!")
    assert not metrics.is_looping("Yes!")


def test_thresholds_decide_and_case_is_ignored():
    text = "Drink water. drink water. Drink Water."
    assert metrics.repeated_ngram(text, n=2) == ("drink water", 3)
    assert metrics.is_looping(text, n=2, min_repeats=3)
    assert not metrics.is_looping(text, n=2, min_repeats=4)
    assert not metrics.is_looping(text, n=4)  # "drink water . drink" occurs twice


def test_loop_rate_is_the_share_of_replies_that_loop():
    assert metrics.loop_rate([LOOP, LIST, LIST, LOOP]) == 0.5
    assert metrics.loop_rate([]) == 0.0
    assert metrics.repeated_ngram("too short") == ("", 0)
