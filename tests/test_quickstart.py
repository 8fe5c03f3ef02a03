"""The quickstart and the tiny recipes run end to end (the shipped YAML files, not copies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_python_runs

from alignkit.cli import recipes_dir, validate_recipe
from alignkit.quickstart import QuickstartConfig, run
from alignkit.trainers import load


def test_quickstart_small_writes_a_complete_run(tmp_path: Path, tiny_model_dir):
    cfg = QuickstartConfig(
        data={"max_samples": 256}, train={"epochs": 1}, dpo={"pair_prompts": 16, "k": 2},
        qprobe={"train_prompts": 8, "n": 4, "k": 2},
        eval={"n_prompts": 6, "k": 2, "max_new_tokens": 16}, output={"dir": str(tmp_path / "qs")},
    )
    summary = run(cfg)
    out = Path(summary["output_dir"])
    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["policies"]) == ["untrained", "sft", "dpo"]
    for row in saved["policies"].values():
        assert {"gold_mean", "gold_sd", "win_rate", "kl", "eos_rate", "repetition_rate", "samples_per_s"} <= set(row)
    assert saved["policies"]["sft"]["win_rate"] == 0.5 and abs(saved["policies"]["sft"]["kl"]) < 1e-4
    assert saved["pairs"]["pairs"] > 0 and saved["dpo"]["steps"] > 0
    q = saved["qprobe"]
    assert q["k"] == 2 and q["layer"] >= 1 and q["best_of_k"] >= q["probe"] - 1e-9 and q["fit_seconds"] > 0
    assert (out / "qprobe" / "probe" / "probe.safetensors").is_file()
    for plot in ("gold_reward.png", "reward_vs_kl.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    assert (out / "sft" / "model" / "model.safetensors").is_file() and (out / "pairs.jsonl").is_file()
    assert (out / "dpo" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", [
    "sft-tiny", "sft-tiny-lora", "rm-tiny", pytest.param("rm-ensemble-tiny", marks=pytest.mark.slow),  # 12 s; the
    "dpo-tiny", "kto-tiny"])  # default run trains ensembles in test_reward.py
def test_tiny_recipes_run(name: str, tmp_path: Path, tiny_model_dir):
    cfg = validate_recipe(recipes_dir() / f"{name}.yaml")
    cfg.output.dir = str(tmp_path / name)
    cfg.data.max_samples = 128  # the recipe itself, made shorter
    if hasattr(cfg, "eval"):
        cfg.eval.ood_max_samples = 16
    summary = load(cfg.command)[1](cfg)
    assert summary["steps"] > 0 and Path(summary["output_dir"]).is_dir()


@pytest.mark.slow
def test_full_quickstart_sft_beats_untrained(tmp_path: Path, tiny_model_dir):
    cfg = validate_recipe(recipes_dir() / "quickstart.yaml")
    cfg.output.dir = str(tmp_path / "qs")
    summary = run(cfg)
    pol = summary["policies"]
    assert pol["sft"]["gold_mean"] > pol["untrained"]["gold_mean"] + 1.0
    assert pol["sft"]["eos_rate"] > 0.9 and pol["sft"]["repetition_rate"] < 0.1
    assert pol["dpo"]["gold_mean"] > pol["sft"]["gold_mean"] and pol["dpo"]["win_rate"] > 0.5
    assert summary["qprobe"]["probe"] > summary["qprobe"]["base"]
    assert summary["wall_seconds"] < 240


def test_quickstart_config_imports_without_torch():
    # `alignkit --help`, `recipes validate` and `run --dry-run` read QuickstartConfig: it must not pull in torch

    code = (
        "import sys\n"
        "from alignkit.quickstart import QuickstartConfig\n"
        "QuickstartConfig()\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    assert_python_runs(code)
