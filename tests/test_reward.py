"""Reward-model trainers: `alignkit rm` and `alignkit rm-ensemble` learn the built-in task, the
ensemble's members diverge and are more uncertain out of distribution, runs reload and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Interrupt

from alignkit import rewards
from alignkit.config import build_config
from alignkit.errors import UserError
from alignkit.trainers import reward


def _rm_cfg(out: Path, **over) -> reward.RMConfig:
    tree = {
        "model": {"name": "tiny", "device": "cpu"},
        "data": {"source": "builtin:pairwise", "max_samples": 640, "eval_fraction": 0.25, "seed": 1},
        "train": {"learning_rate": 1e-3, "epochs": 2, "batch_size": 32, "max_length": 96, "logging_steps": 2},
        "eval": {"ood_max_samples": 120},
        "output": {"dir": str(out)},
    }
    for key, value in over.items():
        section, field = key.split("__")
        tree.setdefault(section, {})[field] = value
    return reward.RMConfig.model_validate(tree)


def _ens_cfg(out: Path, base_model: Path, **over) -> reward.RMEnsembleConfig:
    base = _rm_cfg(out).model_dump()
    base["command"] = "rm-ensemble"
    base["model"]["name"] = str(base_model)
    base["model"]["lora"] = {"r": 8, "alpha": 16}
    base["data"]["max_samples"] = 1280
    base["train"].update(learning_rate=1e-2, epochs=3)
    base["ensemble"] = {"n_members": 3, "lam": 0.1}
    for key, value in over.items():
        section, field = key.split("__")
        base.setdefault(section, {})[field] = value
    return reward.RMEnsembleConfig.model_validate(base)


def test_rm_learns_the_oracle_preferences(tmp_path: Path, tiny_model_dir):
    summary = reward.run(_rm_cfg(tmp_path / "rm"))
    ev = summary["eval"]
    assert ev["pairs"] == 160 and ev["accuracy"] > 0.7, ev  # chance is 0.5
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["train_samples_per_s"] > 0 and summary["peak_gpu_memory_gib"] is None  # CPU: no GPU peak
    assert 0 < summary["trainable_pct"] <= 100
    out = Path(summary["output_dir"])
    assert (out / "plots" / "reliability.png").stat().st_size > 0
    assert ev["uncertainty_in_dist"] == 0 and ev["ood_auroc"] is None  # one model has no spread
    scorer = rewards.load_scorer(str(out))
    again = reward.evaluate_reward_model(scorer, *_heldout(out), None, 15)
    assert again["accuracy"] == pytest.approx(ev["accuracy"]) and again["ece"] == pytest.approx(ev["ece"])


def _heldout(run: Path):
    cfg = reward.RMConfig.model_validate(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    return reward._pairs(cfg)[1], None


@pytest.mark.slow  # 50 s: `make test-all`; the default run trains ensembles in the nnm and resume tests
def test_ensemble_diverges_beats_chance_and_is_uncertain_out_of_distribution(tmp_path: Path, sft_tiny_dir):
    # member_loss "each" (independent BT per member): the option that makes the members' disagreement
    # a deep-ensemble uncertainty (docs/algorithms/rm-ensemble.md, member_loss)
    summary = reward.run_ensemble(_ens_cfg(tmp_path / "ens", sft_tiny_dir, ensemble__member_loss="each"))
    ev = summary["eval"]
    assert ev["pairs"] == 320 and ev["accuracy"] > 0.65, ev  # chance is 0.5
    assert ev["uncertainty_ood"] > ev["uncertainty_in_dist"] > 0, ev
    assert ev["ood_auroc"] > 0.6, ev
    assert summary["trainable_pct"] < 50
    out = Path(summary["output_dir"])
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["n_members"] == 3 and len([p for p in (out / "members").iterdir() if p.is_dir()]) == 3
    # the members are different after training (not before: LoRA B starts at zero)
    ens = rewards.RewardEnsemble.load(out, device="cpu")
    ids = ens.tokenizer(["review : the film . the plot was good ."], return_tensors="pt")
    r = ens.forward(ids["input_ids"], ids["attention_mask"], mode="loop")
    assert r.shape == (3, 1) and float(r.detach().std()) > 1e-4
    # a saved ensemble reloads and scores identically
    prompts, completions = ["review : a . ", "review : b . "], ["the plot was good .", "great great great"]
    s1 = rewards.EnsembleScorer(ens, mode="mixed").score(prompts, completions)
    s2 = rewards.load_scorer(str(out)).score(prompts, completions)
    torch.testing.assert_close(s1.members, s2.members, atol=1e-6, rtol=1e-6)


def test_nnm_term_raises_diversity(tmp_path: Path, sft_tiny_dir):
    """λ > 0 must make the members' concatenated A matrices more diverse than λ = 0 (eq. 12)."""
    short = {"train__epochs": 1, "data__max_samples": 160}
    plain = reward.run_ensemble(_ens_cfg(tmp_path / "l0", sft_tiny_dir, ensemble__lam=0.0, **short))
    diverse = reward.run_ensemble(_ens_cfg(tmp_path / "l1", sft_tiny_dir, ensemble__lam=1.0, **short))
    nnm = {}
    for name, s in (("plain", plain), ("diverse", diverse)):
        metrics = [json.loads(x) for x in (Path(s["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        nnm[name] = [m["nnm"] for m in metrics if "nnm" in m][-1]
    assert nnm["diverse"] > nnm["plain"], nnm




def test_ensemble_resume_reproduces_the_uninterrupted_run(tmp_path: Path, sft_tiny_dir):
    short = {"train__save_steps": 2, "train__epochs": 1, "data__max_samples": 160}  # 4 steps
    straight = reward.run_ensemble(_ens_cfg(tmp_path / "a", sft_tiny_dir, **short))
    with pytest.raises(KeyboardInterrupt):
        reward.run_ensemble(_ens_cfg(tmp_path / "b", sft_tiny_dir, **short), callbacks=[Interrupt(3)])
    resumed = reward.run_ensemble(_ens_cfg(tmp_path / "b", sft_tiny_dir, output__resume=True, **short))
    assert resumed["steps"] == straight["steps"]
    a = rewards.RewardEnsemble.load(tmp_path / "a", device="cpu")
    b = rewards.RewardEnsemble.load(tmp_path / "b", device="cpu")
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    trained = [k for k, v in pa.items() if v.requires_grad]  # every member's LoRA weights and head
    assert len(trained) > 3 * 2
    for k in trained:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"ensemble.n_members": 1}, "n_members must be at least 2"),
        ({"ensemble.lam": -0.5}, "must be >= 0"),
        ({"ensemble.member_loss": "median"}, "ensemble.member_loss"),
        ({"ensemble.seeds": [1, 2]}, "2 seeds for 5 members"),
    ],
)
def test_ensemble_config_errors(over, message):
    with pytest.raises(UserError, match=message):
        build_config(reward.RMEnsembleConfig, {}, None, over)


def test_rm_refuses_non_pairwise_data(tmp_path: Path, tiny_model_dir):
    with pytest.raises(UserError, match="needs pairwise data but got sft"):
        reward.run(_rm_cfg(tmp_path / "x", data__source="builtin:sft"))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a 2-process launch or a benchmark: `make test-all`
def test_rm_two_processes_on_cpu(tmp_path: Path, tiny_model_dir, alignkit_cache):
    out = tmp_path / "rm2"
    cmd = [sys.executable, "-m", "alignkit.cli", "rm", "--model", "tiny", "--max-samples", "160",  # 128 train pairs
           "--batch-size", "8", "--max-length", "96", "--epochs", "1", "--lr", "2e-3", "--device", "cpu",
           "-o", str(out), "--num-processes", "2"]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data_parallel"]["examples_seen_by_every_rank"] == 0
    assert summary["data_parallel"]["examples_per_rank"] == [64, 64]  # one epoch: a shard per rank
    assert summary["eval"]["pairs"] == 32 and summary["eval"]["accuracy"] > 0.5  # learned something together
