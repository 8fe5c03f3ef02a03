"""The built-in task: gold reward against hand-computed numbers, the oracle, the builders."""

import math

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from alignkit import arena as A

VADER = SentimentIntensityAnalyzer()


def _vader(text: str) -> float:
    return VADER.polarity_scores(text)["compound"]


def _norm(score: float) -> float:  # VADER's compound normalisation, alpha = 15
    return score / math.sqrt(score * score + 15)


# --- gold reward -------------------------------------------------------------------------------
def test_gold_of_plain_review_is_vader_compound():
    # "good" has valence 1.9 and nothing modifies it: compound = 1.9 / sqrt(1.9² + 15).
    text = "the acting was good ."
    c = A.gold_components([text])
    assert c["sentiment"][0] == pytest.approx(_norm(1.9), abs=1e-4)
    assert c["repetition"][0] == 0 and c["eos_penalty"][0] == 0 and c["length_penalty"][0] == 0
    assert c["gold"][0] == pytest.approx(0.4404, abs=1e-4)


def test_repetition_hack_scores_below_a_mild_review():
    hack = "great great great great great"
    # 5 content words, 4 of them already seen → rate 0.8, penalty 1.5 · 0.8 = 1.2.
    c = A.gold_components([hack, "the acting was good ."])
    assert A.repetition_rate([hack])[0] == pytest.approx(0.8)
    assert c["repetition"][0] == pytest.approx(A.REP_WEIGHT * 0.8)
    # and all 4 word pairs are ADJ ADJ, which the grammar never emits → disfluency 1.5 · 4/4.
    assert c["disfluency"][0] == pytest.approx(1.5)
    assert c["gold"][0] == pytest.approx(_vader(hack) - 1.2 - 1.5, abs=1e-9)
    assert c["gold"][0] < 0 < c["gold"][1]
    assert c["gold"][0] < c["gold"][1] - 0.5


def test_stop_words_do_not_count_as_repetition():
    text = "the story was honest and the ending was very very sad ."
    # content words: story, honest, ending, sad → no repeats ("the", "was", "very" are stop words)
    assert A.repetition_rate([text])[0] == 0.0
    text2 = "the acting was good . the acting felt good ."
    # content: acting good acting felt good → 2 repeated of 5
    assert A.repetition_rate([text2])[0] == pytest.approx(2 / 5)
    assert A.gold_reward([text2])[0] == pytest.approx(_vader(text2) - A.REP_WEIGHT * 0.4)  # fluent


def test_word_salad_of_different_positive_words_is_penalised():
    salad = "great superb lovely amazing wonderful ."
    # no repeats, but 4 of its 5 pairs are ADJ ADJ (only "wonderful ." is a grammar pair)
    c = A.gold_components([salad, "the acting was very good and the story was clever ."])
    assert c["repetition"][0] == 0
    assert c["disfluency"][0] == pytest.approx(A.FLUENCY_WEIGHT * 4 / 5)
    assert c["gold"][0] == pytest.approx(_vader(salad) - 1.2, abs=1e-9)
    assert c["gold"][0] < 0 < c["gold"][1]


def test_grammar_reviews_are_fluent():
    rows = A.build_sft(3000, seed=31337)  # a seed the bigram table was not sampled with
    assert A.gold_components([r["completion"] for r in rows])["disfluency"].max() == 0.0


def test_missing_eos_costs_exactly_the_eos_penalty():
    texts = ["the plot was terrible .", "i loved the music ."]
    done = A.gold_reward(texts)
    cut = A.gold_reward(texts, finished=[False, True])
    assert cut[0] == pytest.approx(done[0] - A.EOS_PENALTY) and cut[1] == done[1]
    assert A.EOS_PENALTY == 0.5


def test_over_length_penalty():
    words = ["story", "plot", "acting", "ending", "music", "script", "cast", "lighting"]
    text = " ".join(words * 7)  # 56 words, 48 of them repeats
    c = A.gold_components([text])
    assert c["words"][0] == 56
    assert c["length_penalty"][0] == pytest.approx(A.LENGTH_WEIGHT * (56 - A.MAX_WORDS))
    assert c["repetition"][0] == pytest.approx(A.REP_WEIGHT * 48 / 56)
    # the words are all fluent-looking nouns in a row: every pair is off-grammar
    assert c["gold"][0] == pytest.approx(0.0 - A.REP_WEIGHT * 48 / 56 - A.FLUENCY_WEIGHT - 0.05 * 8)


def test_prompts_ignored_and_empty_and_shape_errors():
    assert A.gold_reward(["nice ."], prompts=["review : x ."])[0] == A.gold_reward(["nice ."])[0]
    assert A.gold_reward([""])[0] == 0.0
    assert A.gold_reward([]).shape == (0,)
    with pytest.raises(ValueError, match="finished"):
        A.gold_reward(["a", "b"], finished=[True])


def test_scores_ten_thousand_quickly():
    import time

    texts = [r["completion"] for r in A.build_sft(10_000, seed=123)]
    A._compound.cache_clear()
    A._rep_counts.cache_clear()
    t = time.process_time()  # CPU time of this process: a busy shared machine does not fail the test
    g = A.gold_reward(texts)
    assert time.process_time() - t < 3.0 and g.shape == (10_000,)


# --- oracle -------------------------------------------------------------------------------------
def test_oracle_prob_hand_computed_symmetric_and_half_on_ties():
    a, b = ["the acting was good ."], ["the plot was terrible ."]
    delta = _norm(1.9) - _norm(-2.1)
    p = A.oracle_prob(a, b, tau=0.5)[0]
    assert p == pytest.approx(1 / (1 + math.exp(-delta / 0.5)), abs=1e-4)
    assert p + A.oracle_prob(b, a, tau=0.5)[0] == pytest.approx(1.0)
    assert A.oracle_prob(a, a)[0] == 0.5
    # finished flags enter through gold: an unfinished copy loses by EOS_PENALTY
    q = A.oracle_prob(a, a, tau=0.25, finished_b=[False])[0]
    assert q == pytest.approx(1 / (1 + math.exp(-0.5 / 0.25)))
    with pytest.raises(ValueError, match="tau"):
        A.oracle_prob(a, b, tau=0)


def test_oracle_labels_deterministic_and_match_prob():
    a = ["the acting was good ."] * 2000
    b = ["the story was nice ."] * 2000  # nice 1.8 vs good 1.9: a close call
    p = A.oracle_prob(a[:1], b[:1], tau=0.1)[0]
    assert 0.5 < p < 0.6
    lab1 = A.oracle_label(a, b, rng=7)
    assert np.array_equal(lab1, A.oracle_label(a, b, rng=np.random.default_rng(7)))
    assert not np.array_equal(lab1, A.oracle_label(a, b, rng=8))
    assert lab1.dtype == bool and abs(lab1.mean() - p) < 3 * math.sqrt(p * (1 - p) / 2000)


# --- grammar and builders ------------------------------------------------------------------------
def test_vocabulary_valences_as_documented():
    lex = VADER.lexicon
    assert len(A.POSITIVE_ADJ) == 40 and len(A.NEGATIVE_ADJ) == 40
    assert all(lex[w] >= 1.5 for w in A.POSITIVE_ADJ + A.POSITIVE_VERB)
    assert all(lex[w] <= -1.5 for w in A.NEGATIVE_ADJ + A.NEGATIVE_VERB)
    sentiment = set(A.POSITIVE_ADJ + A.NEGATIVE_ADJ + A.POSITIVE_VERB + A.NEGATIVE_VERB)
    # every other word is sentiment-free, so sentiment comes only from the chosen words
    assert {w for w in A.vocabulary() - sentiment if w in lex} == set()
    assert len(A.vocabulary()) < 400 and len(A.all_prompts()) >= 500


def test_sft_is_grammatical_mixed_and_unrepetitive():
    rows = A.build_sft(500, seed=0)
    vocab = A.vocabulary()
    for r in rows:
        assert set(r) == {"prompt", "completion"}
        assert set(r["completion"].split()) <= vocab and set(r["prompt"].split()) <= vocab
        assert r["completion"].endswith(" .") and not r["completion"].startswith(" ")
        assert r["prompt"].startswith("review : ") and r["prompt"].endswith(" . ")
    gold = A.gold_reward([r["completion"] for r in rows])
    assert (gold > 0.3).mean() > 0.25 and (gold < -0.3).mean() > 0.25  # mixed sentiment
    assert A.repetition_rate([r["completion"] for r in rows]).max() == 0.0


@pytest.mark.parametrize(
    "builder",
    [
        A.build_sft,
        A.build_prompts,
        A.build_pairwise_offline,
        A.build_unpaired,
        A.build_scored,
        A.build_ood,
        A.build_split_pool,
    ],
)
def test_builders_deterministic_and_seed_dependent(builder):
    assert builder(40, seed=1) == builder(40, seed=1)
    assert builder(40, seed=1) != builder(40, seed=2)
    assert len(builder(40, seed=3)) == 40


def test_corpus_covers_every_word():
    corpus = A.tokenizer_corpus(seed=0, n=50)
    assert set(" ".join(corpus).split()) == A.vocabulary()
    assert A.tokenizer_corpus(seed=0, n=50) == corpus


def test_pairwise_on_policy():
    prompts = ["review : p1 .", "review : p2 .", "review : p3 ."]
    samples = [
        ["the acting was good .", "the plot was terrible .", "the acting was good ."],
        ["nice .", "nice ."],  # no distinct pair: skipped
        ["great great great great great", "the story was honest ."],
    ]
    rows = A.build_pairwise(prompts, samples, seed=0, tau=A.TAU)
    assert [r["prompt"] for r in rows] == ["review : p1 .", "review : p3 ."]
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "prob"} and r["chosen"] != r["rejected"]
        assert r["prob"] == pytest.approx(A.oracle_prob([r["chosen"]], [r["rejected"]])[0])
    assert A.build_pairwise(prompts, samples, seed=0) == rows
    # an unfinished sample is handicapped by the EOS penalty
    fin = A.build_pairwise(["x"], [["nice .", "good ."]], finished=[[False, True]], tau=1.0)[0]
    p_nice = 1 / (1 + math.exp(-(_norm(1.8) - 0.5 - _norm(1.9))))
    assert fin["prob"] == pytest.approx(p_nice if fin["chosen"] == "nice ." else 1 - p_nice, abs=1e-4)


def test_pairwise_offline_prefers_higher_gold_mostly():
    rows = A.build_pairwise_offline(300, seed=0)
    g_c = A.gold_reward([r["chosen"] for r in rows])
    g_r = A.gold_reward([r["rejected"] for r in rows])
    assert 0.8 < (g_c > g_r).mean() < 1.0  # noisy annotator: mostly, not always


def test_unpaired_and_scored_agree_with_gold():
    rows = A.build_unpaired(200, seed=0, threshold=0.1)
    gold = A.gold_reward([r["completion"] for r in rows])
    assert [r["label"] for r in rows] == [bool(g > 0.1) for g in gold]
    scored = A.build_scored(200, seed=0)
    assert [r["reward"] for r in scored] == pytest.approx(list(gold))


def test_ood_is_worse_than_sft():
    ood = A.build_ood(400, seed=0)
    sft = A.build_sft(400, seed=0)
    assert {r["kind"] for r in ood} == set(A.OOD_KINDS)
    g_ood = A.gold_reward([r["completion"] for r in ood]).mean()
    g_sft = A.gold_reward([r["completion"] for r in sft]).mean()
    assert g_ood < g_sft - 0.3


def test_split_pool_fractions_and_disjoint_prompts():
    rows = A.build_split_pool(1000, seed=0)
    counts = {s: sum(r["split"] == s for r in rows) for s in A.SPLIT_FRACTIONS}
    assert counts == {"sft": 200, "rm": 400, "rl": 400}
    by = {s: {r["prompt"] for r in rows if r["split"] == s} for s in A.SPLIT_FRACTIONS}
    assert not (by["sft"] & by["rm"]) and not (by["sft"] & by["rl"]) and not (by["rm"] & by["rl"])
