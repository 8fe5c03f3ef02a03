"""`alignkit bench up-rlhf` (alignkit/paper_tables/up_rlhf.py): UP-RLHF's RL experiment on the built-in task.
The statistics are checked by hand on made-up curves; a tiny whole run checks the result's shape."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner


def test_run_stats_by_hand():
    from alignkit.paper_tables.up_rlhf import run_stats

    # gold rises then falls while the proxy keeps rising: over-optimised (window 1 = raw values)
    curve = {"gold": [0.0, 0.5, 1.0, 0.4, 0.2], "reward": [0.0, 1.0, 2.0, 3.0, 4.0], "kl_k1": [0, 1, 2, 3, 4]}
    s = run_stats(curve, window=1)
    assert s["peak_gold"] == 1.0 and s["peak_gold_iteration"] == 3 and s["peak_gold_kl"] == 2
    assert s["final_gold"] == 0.2 and s["final_proxy"] == 4.0 and s["final_kl"] == 4
    assert s["gold_drop_after_peak"] == pytest.approx(0.8) and s["proxy_rise_after_gold_peak"] == 2.0
    assert s["over_optimised"]
    # window 2: trailing means [0, .25, .75, .7, .3]; the peak is .75 at iteration 3, the end .3
    s = run_stats(curve, window=2)
    assert s["peak_gold"] == pytest.approx(0.75) and s["final_gold"] == pytest.approx(0.3)
    assert s["final_gold_se"] == pytest.approx(0.1)  # sd of (0.4, 0.2) / √2
    assert s["over_optimised"]
    # gold still rising at the end: not over-optimised
    rising = {"gold": [0.0, 0.1, 0.2, 0.3], "reward": [0, 1, 2, 3], "kl_k1": [0, 1, 2, 3]}
    assert not run_stats(rising, window=1)["over_optimised"]
    # a fall while the proxy falls too is not over-optimisation either
    both = {"gold": [0.0, 1.0, 0.0, -1.0], "reward": [0, 3, 2, 1], "kl_k1": [0, 1, 2, 3]}
    assert not run_stats(both, window=1)["over_optimised"]


def test_bench_up_rlhf_is_registered():
    from alignkit.cli import app

    out = CliRunner().invoke(app, ["bench", "up-rlhf", "--help"])
    assert out.exit_code == 0 and "--pairs" in out.output and "--iterations" in out.output


@pytest.mark.slow  # trains two proxies and three PPO runs: `make test-all`
def test_up_rlhf_table_tiny(sft_tiny_dir, tmp_path):
    from alignkit.paper_tables.up_rlhf import UP_RUNS, up_rlhf_plot, up_rlhf_table

    r = up_rlhf_table(pairs=48, n_members=2, lora_r=4, iterations=3, prompts_per_iteration=4, max_new_tokens=12,
                      ppo_epochs=1, window=2, ppo_seeds=(0, 1), sft_model=str(sft_tiny_dir))
    assert set(r["runs"]) == set(UP_RUNS) == {"rlhf", "ensemble", "up_rlhf"}
    assert set(r["proxies"]) == {"rm", "ensemble"}
    for p in r["proxies"].values():
        assert 0 <= p["accuracy"] <= 1 and p["eval_pairs"] == 12
    assert r["proxies"]["ensemble"]["uncertainty_in_dist"] > 0
    for name, x in r["runs"].items():
        c = x["curve"]
        assert c["iteration"] == [1, 2, 3]
        for key in ("reward", "gold", "kl_k1", "kl_k3"):
            assert len(c[key]) == 3, (name, key)
        assert ("u" in c) == (name != "rlhf")  # the full-FT RM has no members
        # the run's curve is the per-iteration mean of its two PPO seeds
        seeds = x["per_seed"]
        assert set(seeds) == {0, 1}
        assert c["gold"] == pytest.approx([(g0 + g1) / 2 for g0, g1 in zip(seeds[0]["curve"]["gold"],
                                                                           seeds[1]["curve"]["gold"], strict=True)])
        s = x["stats"]
        assert s["iterations"] == 3 and s["start_gold"] == c["gold"][0]
        assert s["peak_gold"] >= s["final_gold"] - 1e-12 and isinstance(s["over_optimised"], bool)
    assert r["runs"]["rlhf"]["ppo"] == {"kl_mode": "reward", "kl_coef": r["settings"]["kl_coef"]}
    assert r["runs"]["ensemble"]["ppo"]["beta2"] == 0 and r["runs"]["up_rlhf"]["ppo"]["beta2"] > 0
    # the first rollout comes from the same SFT policy with the same seed and prompts in every run
    assert len({x["curve"]["gold"][0] for x in r["runs"].values()}) == 1
    assert r["settings"]["ppo_seeds"] == [0, 1] and r["settings"]["sft"] == "given" and r["machine"]["cores"] >= 1
    assert up_rlhf_plot(r, tmp_path / "plot.png").stat().st_size > 0
    json.dumps(r, default=str)  # the CLI writes it as JSON
