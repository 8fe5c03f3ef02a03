"""`alignkit bench ppo-rollout`: a tiny run has every figure, and the rollout samples the ids `generate` does."""

from __future__ import annotations

import pytest

from alignkit import bench


@pytest.mark.slow
def test_ppo_rollout_bench_structure_and_identical_ids():
    r = bench.ppo_rollout(n_prompts=8, repeats=2, iterations=2, ppo_prompts=8)
    assert r["same_tokens"] is True  # (i) generate, (ii) rollout.sample, (iii) + score_tokens: same token ids
    assert set(r["median_s"]) == set(bench.ROLLOUT_MODES) == set(r["samples_per_s"])
    assert all(len(t) == 2 for t in r["seconds"].values())
    assert r["ratio_sample_vs_generate"] > 0 and r["ratio_sample_score_vs_generate"] > 0
    assert r["settings"]["n_prompts"] == 8 and r["machine"]["cores"] >= 1
    split = r["ppo"]["time_split_s"]
    assert set(split) == {"rollout", "reference_value", "score", "update"}
    assert all(s > 0 for s in split.values())
    assert sum(r["ppo"]["time_split_share"].values()) == pytest.approx(1.0)
