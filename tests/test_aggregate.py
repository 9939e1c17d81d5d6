"""From votes to a ranking, checked against values worked out by hand (no servers, no CLIP).

Places sit on the equator, where the great-circle distance between longitudes x and y is exactly
R * |x - y| in radians: KM_PER_DEGREE = 6371 * pi / 180 = 111.19493 km per degree of longitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from geoagent.agent.aggregate import BT_PSEUDO_GAMES, bradley_terry, confidence, copeland, fuse, rank_votes
from geoagent.types import Candidate, Guess, Match

KM_PER_DEGREE = 6371 * math.pi / 180
LN3 = math.log(3)


def match(a: str, b: str, winner: str | None) -> Match:
    return Match(a=a, b=b, winner=winner, votes=[])


def place(cid: str, lon: float, retrieval: float | None = None, country: str | None = None, score: float = 0.0) -> Candidate:
    source = "index" if retrieval is not None else "reasoning"
    return Candidate(id=cid, lat=0.0, lon=lon, country=country, source=source, retrieval_score=retrieval, score=score)


def fusion(
    pool: list[Candidate],
    *,
    votes: dict[str, float] | None = None,
    prior: dict[str, float] | None = None,
    guess: Guess | None = None,
    **weights: float,
) -> tuple[list[Candidate], dict[str, dict[str, float]]]:
    """``fuse`` with every weight 0 unless given, and one degree as both distance scales."""
    zero = {"w_votes": 0.0, "w_retrieval": 0.0, "w_prior": 0.0, "w_proximity": 0.0, "w_consensus": 0.0}
    scales = {"bandwidth_km": KM_PER_DEGREE, "proximity_km": KM_PER_DEGREE}
    return fuse(pool, votes or {}, prior or {}, guess, **{**zero, **scales, **weights})


# --- Copeland ---------------------------------------------------------------------------------------


def test_copeland_is_the_share_of_games_won_with_a_tie_counting_half():
    matches = [match("a", "b", "a"), match("a", "c", None), match("b", "c", "b"), match("c", "b", "c")]
    shares = copeland(["a", "b", "c", "d"], matches)
    # a: beat b, tied c           -> (1 + 0.5) / 2 = 0.75
    # b: lost to a, beat c, lost  -> (0 + 1 + 0) / 3 = 1/3
    # c: tied a, lost, beat b     -> (0.5 + 0 + 1) / 3 = 0.5
    # d: played nothing           -> 0.5, neutral (no division by zero)
    assert shares == pytest.approx({"a": 0.75, "b": 1 / 3, "c": 0.5, "d": 0.5})


def test_a_candidate_whose_every_match_failed_is_neutral_for_copeland_and_bradley_terry():
    """Issue 18 point 4: a match whose every ask failed says nothing. A candidate with no answered match sits in
    the middle for both vote models (between the winner and the loser of the one answered match), never at the
    bottom as if it had lost everything (a photo that makes the model fail must not sink its candidate)."""
    failed = [Match(a="c", b="a", winner=None, votes=[None, None]), Match(a="b", b="c", winner=None, votes=[None])]
    matches = [match("a", "b", "a"), *failed]
    for votes in (copeland(["a", "b", "c"], matches), bradley_terry(["a", "b", "c"], matches)):
        assert votes == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.5})


# --- Bradley-Terry ----------------------------------------------------------------------------------
# Hunter's MM update with BT_PSEUDO_GAMES = 0.5 (half a game won and lost against a unit-strength opponent):
#   s_i = (wins_i + 0.5) / (sum_j games_ij / (s_i + s_j) + 1 / (s_i + 1))
# The output is ln(s) scaled to [0, 1] over the candidates.


def test_bradley_terry_matches_fixed_points_solved_by_hand():
    """A chain a > b > c and a separate pair p > q (disconnected groups are solved independently).

    Chain: by symmetry (reversing every result swaps a and c) s_b = 1 and s_c = 1 / s_a; a's equation is then
        s_a = 1.5 / (1 / (s_a + 1) + 1 / (s_a + 1))  ->  2 s_a = 1.5 s_a + 1.5  ->  s_a = 3, s_c = 1/3.
      check b: (1 + 0.5) / (1/(1+3) + 1/(1+1/3) + 1/2) = 1.5 / (0.25 + 0.75 + 0.5) = 1.
    Pair: likewise s_q = 1 / x with x = s_p; q's equation 0.5 = (1/x)(1/(x + 1/x) + 1/(1/x + 1)) gives
        1 / (x^2 + 1) + 1 / (x + 1) = 0.5  ->  x^3 - x^2 - x - 3 = 0  ->  x = 2.130395...
    Scaled between ln 3 (a, the strongest) and -ln 3 (c): u = (ln s + ln 3) / (2 ln 3).
    """
    assert BT_PSEUDO_GAMES == 0.5  # the derivation above assumes it
    roots = np.roots([1, -1, -1, -3])
    x = float(roots[np.isreal(roots)].real[0])
    assert x == pytest.approx(2.130395, abs=1e-6)
    matches = [match("a", "b", "a"), match("b", "c", "b"), match("q", "p", "p")]
    strengths = bradley_terry(["a", "b", "c", "p", "q"], matches)
    expected = {
        "a": 1.0,
        "b": 0.5,
        "c": 0.0,
        "p": (math.log(x) + LN3) / (2 * LN3),  # 0.84421
        "q": (-math.log(x) + LN3) / (2 * LN3),  # 0.15579
    }
    assert strengths == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_weighs_whom_a_candidate_beat():
    """X beat the strong S, Y beat the weak W: one win each (Copeland ties them), but BT ranks X above Y.

    The chain a > b > c rides along as a ruler (s = 3, 1, 1/3, solved above): with it every returned value maps
    back to a strength, ln s_i = (u_i - u_b) * 2 ln 3 / (u_a - u_c), and the MM fixed-point equation must hold there.
    """
    ids = ["a", "b", "c", "S", "W", "X", "Y"]
    matches = [match("a", "b", "a"), match("b", "c", "b"),
               match("S", "W", "S"), match("W", "S", "S"), match("X", "S", "X"), match("Y", "W", "Y")]
    assert copeland(ids, matches)["X"] == copeland(ids, matches)["Y"] == 1.0
    u = bradley_terry(ids, matches)
    assert u["X"] > u["Y"]
    assert u["S"] > u["W"]

    s = {cid: math.exp((u[cid] - u["b"]) * 2 * LN3 / (u["a"] - u["c"])) for cid in ids}
    assert (s["a"], s["b"], s["c"]) == pytest.approx((3.0, 1.0, 1 / 3), rel=1e-6)
    wins = {"a": 1, "b": 1, "c": 0, "S": 2, "W": 0, "X": 1, "Y": 1}
    games = {cid: [m.b if m.a == cid else m.a for m in matches if cid in (m.a, m.b)] for cid in ids}
    for cid in ids:
        denominator = sum(1 / (s[cid] + s[other]) for other in games[cid]) + 1 / (s[cid] + 1)
        assert s[cid] == pytest.approx((wins[cid] + 0.5) / denominator, rel=1e-6), cid


def test_bradley_terry_of_nothing_and_of_unplayed_candidates():
    assert bradley_terry([], []) == {}
    assert bradley_terry(["a", "b"], []) == {"a": 0.0, "b": 0.0}  # equal strengths: no span to scale


# --- rank votes --------------------------------------------------------------------------------------


def test_rank_votes_spread_evenly_from_first_to_last():
    # four places: (n - 1 - r) / (n - 1) = 3/3, 2/3, 1/3, 0/3
    assert rank_votes(["a", "b", "c", "d"]) == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 1 / 3, "d": 0.0})
    assert rank_votes(["only"]) == {"only": 1.0}


# --- fusion ------------------------------------------------------------------------------------------


def test_each_fusion_term_is_scaled_within_the_pool():
    pool = [
        place("a", 0.0, retrieval=0.9, country="FR"),
        place("b", 1.0, retrieval=0.8, country="DE"),
        place("c", 3.0, retrieval=0.5, country="IT"),
        place("g", 2.0),  # a reasoning candidate: no retrieval score
    ]
    guess = Guess(lat=0.0, lon=0.0, country="FR", confidence=0.9, clues=[], sample=0)
    _, terms = fusion(pool, votes={"a": 1.0, "b": 0.25}, prior={"FR": 0.6, "DE": 0.3, "ES": 0.1}, guess=guess)
    # retrieval: min-max over the known scores 0.9, 0.8, 0.5 -> (x - 0.5) / 0.4 = 1, 0.75, 0; unknown -> 0
    assert [terms[c]["retrieval"] for c in "abcg"] == pytest.approx([1.0, 0.75, 0.0, 0.0])
    # prior: relative to the top prior 0.6 -> FR 1, DE 0.3 / 0.6 = 0.5, IT and none 0
    assert [terms[c]["prior"] for c in "abcg"] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    # proximity: exp(-d / proximity_km) with d = 0, 1, 3, 2 degrees -> e^0, e^-1, e^-3, e^-2
    assert [terms[c]["proximity"] for c in "abcg"] == pytest.approx([1.0, 0.3679, 0.0498, 0.1353], abs=1e-4)
    # votes pass through as given; a candidate without a vote gets 0
    assert [terms[c]["votes"] for c in "abcg"] == [1.0, 0.25, 0.0, 0.0]


def test_one_retrieved_candidate_gets_the_full_retrieval_term():
    _, terms = fusion([place("a", 0.0, retrieval=0.3), place("g", 1.0)])
    assert (terms["a"]["retrieval"], terms["g"]["retrieval"]) == (1.0, 0.0)


def test_consensus_is_kernel_weighted_support_from_the_others():
    """Three places 1 degree apart, kernel exp(-d / bandwidth) with bandwidth = 1 degree.

    Support = retrieval term only (w_retrieval = 1): scores 0.9, 0.7, 0.5 -> 1, 0.5, 0.
    consensus_i = sum_{j != i} K_ij support_j / sum_{j != i} support_j:
      a: (e^-1 * 0.5 + e^-2 * 0) / (0.5 + 0)  = e^-1                     = 0.367879
      b: (e^-1 * 1   + e^-1 * 0) / (1 + 0)    = e^-1                     = 0.367879
      c: (e^-2 * 1   + e^-1 * 0.5) / (1 + 0.5) = (0.135335 + 0.183940) / 1.5 = 0.212850
    score = 1 * retrieval + 2 * consensus: a 1.735759, b 1.235759, c 0.425700.
    """
    pool = [place("c", 2.0, retrieval=0.5), place("a", 0.0, retrieval=0.9), place("b", 1.0, retrieval=0.7)]
    ranked, terms = fusion(pool, w_retrieval=1.0, w_consensus=2.0)
    e1, e2 = math.exp(-1), math.exp(-2)
    consensus = {"a": e1, "b": e1, "c": (e2 + 0.5 * e1) / 1.5}
    assert {cid: t["consensus"] for cid, t in terms.items()} == pytest.approx(consensus, abs=1e-4)
    assert [c.id for c in ranked] == ["a", "b", "c"] and [c.rank for c in ranked] == [1, 2, 3]
    assert [c.score for c in ranked] == pytest.approx([1 + 2 * e1, 0.5 + 2 * e1, 2 * consensus["c"]], abs=1e-6)


def test_the_fused_score_is_the_weighted_sum_of_the_terms():
    pool = [place("a", 0.0, retrieval=0.9, country="FR"), place("b", 1.0, retrieval=0.5, country="DE")]
    guess = Guess(lat=0.0, lon=1.0, country="DE", confidence=0.5, clues=[], sample=0)
    weights = {"w_votes": 2.0, "w_retrieval": 0.5, "w_prior": 0.25, "w_proximity": 1.0, "w_consensus": 0.1}
    ranked, terms = fusion(pool, votes={"b": 1.0}, prior={"FR": 0.2, "DE": 0.8}, guess=guess, **weights)
    # a: votes 0, retrieval 1, prior 0.2 / 0.8 = 0.25, proximity e^-1; b: votes 1, retrieval 0, prior 1, proximity 1
    # base a = 0.5 + 0.0625 + 0.367879 = 0.930379; base b = 2 + 0.25 + 1 = 3.25
    # consensus a = e^-1 * 3.25 / 3.25 = e^-1; b = e^-1 * 0.930379 / 0.930379 = e^-1
    e1 = math.exp(-1)
    expected = {"a": 0.5 + 0.0625 + e1 + 0.1 * e1, "b": 2 + 0.25 + 1 + 0.1 * e1}
    assert {c.id: c.score for c in ranked} == pytest.approx(expected, abs=1e-6)
    assert [c.id for c in ranked] == ["b", "a"]
    for cid, t in terms.items():
        recomputed = sum(weights[f"w_{name}"] * value for name, value in t.items())
        assert recomputed == pytest.approx(expected[cid], abs=1e-3)  # the terms are reported to 4 decimals


# --- confidence --------------------------------------------------------------------------------------


def test_confidence_is_the_softmax_mass_within_the_bandwidth_at_temperature_0_3():
    """Scores 2.0, 1.7, 1.1 -> weights exp((s - 2.0) / 0.3) = 1, e^-1, e^-3 = 1, 0.367879, 0.049787.

    Within 2 degrees of the top: itself and the one at 1 degree, so (1 + 0.367879) / 1.417666 = 0.964881.
    """
    ranked = [place("a", 0.0, score=2.0), place("b", 1.0, score=1.7), place("c", 5.0, score=1.1)]
    e1, e3 = math.exp(-1), math.exp(-3)
    assert confidence(ranked, bandwidth_km=2 * KM_PER_DEGREE) == pytest.approx((1 + e1) / (1 + e1 + e3), abs=1e-4)
    # a bandwidth that reaches the third place holds all the mass; one that reaches none holds the top's
    assert confidence(ranked, bandwidth_km=6 * KM_PER_DEGREE) == 1.0
    assert confidence(ranked, bandwidth_km=0.5 * KM_PER_DEGREE) == pytest.approx(1 / (1 + e1 + e3), abs=1e-4)


def test_confidence_of_an_empty_or_single_ranking():
    assert confidence([], bandwidth_km=100.0) == 0.0
    assert confidence([place("a", 0.0, score=0.4)], bandwidth_km=100.0) == 1.0
