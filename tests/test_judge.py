"""The stand-in VLM's error model (tests/standin/judge.py), measured in-process on synthetic geometry.

Every accuracy claim the benchmarks make rests on this model, so its properties are tested directly:
hard (near-equal) choices are hard, an error tends to repeat when the question is asked in the other order,
a choice among n options favours the nearest, and answers are reproducible for a seed.
"""

from __future__ import annotations

import math
import random

from standin import Knobs, WorldJudge

TRIALS = 2000
QUERY = (0.0, 0.0)


def east(km: float) -> tuple[float, float]:
    """A point ``km`` east of the query along the equator."""
    return 0.0, math.degrees(km / 6371.0)


def ask(judge: WorldJudge, options: list[tuple[float, float]], ask_seed: int, query_marker: int) -> int:
    return judge._nearest_choice(*QUERY, options, random.Random(ask_seed), query_marker)


def error_rate(judge: WorldJudge, near_km: float, far_km: float) -> float:
    """How often the farther of two candidates is chosen, over both orders and many queries."""
    wrong = 0
    for trial in range(TRIALS):
        options = [east(near_km), east(far_km)] if trial % 2 else [east(far_km), east(near_km)]
        nearer = 0 if trial % 2 else 1
        wrong += ask(judge, options, trial, query_marker=trial) != nearer
    return wrong / TRIALS


def test_near_equal_pairs_are_judged_far_worse_than_clearly_different_ones():
    """Accuracy falls as the two distances approach each other: near-equal pairs are close to a coin flip,
    clearly different ones are judged right about ``pairwise_accuracy`` of the time (the knob is the ceiling)."""
    judge = WorldJudge({}, Knobs())
    hard = error_rate(judge, 100, 110)
    easy = error_rate(judge, 0, 400)
    assert hard > 0.35, hard
    assert easy < 0.08, easy
    assert hard > 5 * easy
    weaker = WorldJudge({}, Knobs(pairwise_accuracy=0.85, first_position_bias=0.10))
    assert error_rate(weaker, 0, 400) > easy + 0.04  # the weaker VLM knobs still mean a weaker VLM


def test_an_error_tends_to_repeat_when_the_pair_is_asked_in_the_other_order():
    """A share of pairs is answered from one belief shared by both orders (seeded by the query and the
    unordered pair, not the prompt): both orders are wrong together far more often than independent errors
    would be, which is what a rule that asks once and confirms only on conflict must survive."""
    judge = WorldJudge({}, Knobs())
    first_wrong = second_wrong = both_wrong = 0
    for trial in range(TRIALS):
        near, far = east(0), east(40)  # the truth against a look-alike 40 km away
        a = ask(judge, [near, far], ask_seed=2 * trial, query_marker=trial) != 0
        b = ask(judge, [far, near], ask_seed=2 * trial + 1, query_marker=trial) != 1
        first_wrong, second_wrong, both_wrong = first_wrong + a, second_wrong + b, both_wrong + (a and b)
    p_first, p_second, p_both = first_wrong / TRIALS, second_wrong / TRIALS, both_wrong / TRIALS
    assert p_first > 0.05 and p_second > 0.05  # a pair hard enough to err on
    assert p_both / p_first > 0.45, (p_both, p_first)  # an error repeats in the other order about half the time or more
    assert p_both > 2 * p_first * p_second, (p_both, p_first, p_second)


def test_without_a_shared_belief_the_orders_err_independently():
    """The repetition comes from the shared belief knob, not from the geometry: at shared_belief = 0 the two
    orders' errors are independent (their joint rate is near the product)."""
    judge = WorldJudge({}, Knobs(shared_belief=0.0, first_position_bias=0.0))
    both_wrong = wrong = 0
    for trial in range(TRIALS):
        near, far = east(60), east(90)
        a = ask(judge, [near, far], ask_seed=2 * trial, query_marker=trial) != 0
        b = ask(judge, [far, near], ask_seed=2 * trial + 1, query_marker=trial) != 1
        wrong, both_wrong = wrong + a + b, both_wrong + (a and b)
    p, p_both = wrong / (2 * TRIALS), both_wrong / TRIALS
    assert abs(p_both - p * p) < 0.04, (p_both, p * p)


def test_a_choice_among_several_options_picks_the_nearest_most_often_wherever_it_is_shown():
    """The n-option choice (set-wise questions): the nearest of four candidates is chosen most often, in
    whichever position it is shown, and options nearer the truth are chosen more often than farther ones."""
    judge = WorldJudge({}, Knobs())
    distances = [0, 60, 200, 600]
    picked = {d: 0 for d in distances}
    for trial in range(TRIALS):
        order = distances[trial % 4 :] + distances[: trial % 4]  # the nearest rotates through every position
        picked[order[ask(judge, [east(d) for d in order], trial, query_marker=trial)]] += 1
    assert picked[0] > 0.6 * TRIALS, picked
    assert picked[0] > picked[60] > picked[200] >= picked[600], picked


def test_first_position_bias_favours_the_first_shown_option_on_equal_distances():
    """Position bias as before: with equal distances the first shown option wins more often than chance."""
    judge = WorldJudge({}, Knobs(first_position_bias=0.2))
    first = sum(ask(judge, [(0.0, 1.0), (0.0, -1.0)], trial, query_marker=trial) == 0 for trial in range(TRIALS))
    assert first / TRIALS > 0.55, first / TRIALS


def test_answers_are_deterministic_for_a_seed():
    """Reruns give the same answers (the eval's cache and paired comparisons rely on it); another knob seed
    gives other beliefs."""
    options = [east(50), east(70), east(90)]
    runs = [[ask(WorldJudge({}, Knobs(seed=s)), options, t, query_marker=t) for t in range(300)] for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
