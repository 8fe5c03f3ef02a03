"""DPO trainer (`alignkit dpo`): DPO, IPO and soft SPPO learn the built-in preferences from the SFT model,
resume reproduces the uninterrupted run, and bad inputs end with one UserError before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupt
from safetensors.torch import load_file

from alignkit.errors import UserError
from alignkit.trainers import preference


def _cfg(out: Path, model: str, loss: str = "dpo", n: int = 128, beta: float = 0.1, **train) -> preference.DPOConfig:
    base = {"learning_rate": 5e-4, "batch_size": 16, "max_length": 96, "logging_steps": 1, "epochs": 1}
    return preference.DPOConfig(
        model={"name": model, "device": "cpu"},
        data={"source": "builtin:pairwise", "max_samples": n, "seed": 5},
        train={**base, **train},
        pref={"loss": loss, "beta": beta},
        output={"dir": str(out)},
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# IPO's target is a per-token AVERAGE log-ratio gap of 1/(2β) (TRL): β = 0.1 asks for 5 nats a token, so it
# runs at β = 1 here (a gap of 1/2) for 2 epochs; its summed-reward accuracy (what TRL logs) is noisier.
@pytest.mark.parametrize(
    ("loss", "n", "beta", "epochs"),
    [("dpo", 512, 0.1, 1), pytest.param("ipo", 512, 1.0, 2, marks=pytest.mark.slow), ("sppo", 256, 0.1, 1)],
)
def test_preference_losses_learn_the_builtin_preferences(loss, n, beta, epochs, tmp_path: Path, sft_tiny_dir):
    cfg = _cfg(tmp_path / "run", str(sft_tiny_dir), loss, n=n, beta=beta, epochs=epochs, logging_steps=4)
    summary = preference.run(cfg)
    out = Path(summary["output_dir"])
    rows = [m for m in _metrics(out) if "rewards/accuracies" in m]
    tail = rows[-2:]  # the last logged windows
    acc = sum(m["rewards/accuracies"] for m in tail) / len(tail)
    margin = sum(m["rewards/margins"] for m in tail) / len(tail)
    assert acc > 0.6 and margin > 0, (loss, rows)
    assert summary["world_size"] == 1 and summary["rewards_accuracy_last"] == rows[-1]["rewards/accuracies"]
    assert (out / "model" / "model.safetensors").is_file() and (out / "plots" / "loss.png").stat().st_size > 0
    assert not (out / "checkpoints").exists()




def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, tiny_model_dir):
    model = str(tiny_model_dir)
    straight = preference.run(_cfg(tmp_path / "a", model, n=64, batch_size=8, save_steps=4))
    with pytest.raises(KeyboardInterrupt):
        preference.run(_cfg(tmp_path / "b", model, n=64, batch_size=8, save_steps=4), callbacks=[Interrupt(6)])
    assert (tmp_path / "b.partial" / "checkpoints" / "checkpoint-4").is_dir() and not (tmp_path / "b").exists()
    again = _cfg(tmp_path / "b", model, n=64, batch_size=8, save_steps=4)
    again.output.resume = True
    resumed = preference.run(again)
    assert resumed["steps"] == straight["steps"] == 8
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    steps = [m["step"] for m in _metrics(tmp_path / "b") if "loss" in m]
    assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path: Path, tiny_model_dir):
    model = str(tiny_model_dir)
    unpaired = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True}] * 4)
    no_prob = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)

    cfg = _cfg(tmp_path / "u", model)
    cfg.data.source = unpaired
    with pytest.raises(UserError, match="needs pairwise data"):
        preference.run(cfg)

    with pytest.raises(Exception, match="β must be > 0"):
        _cfg(tmp_path / "b", model).pref.beta = 0.0
    from alignkit.config import build_config

    with pytest.raises(UserError, match="β must be > 0"):
        build_config(preference.DPOConfig, {"command": "dpo"}, ["pref.beta=-1"])

    cfg = _cfg(tmp_path / "s", model, loss="sppo")
    cfg.data.source = no_prob
    with pytest.raises(UserError, match="loss sppo needs a prob column in \\[0,1\\]"):
        preference.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "u.jsonl"]


def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path: Path, tiny_model_dir):
    """With LoRA, TRL gets a peft_config: no reference model and no 'ref' adapter copy; the reference
    log-probs are those of the untouched base model."""
    cfg = _cfg(tmp_path / "lora", str(tiny_model_dir), n=32, batch_size=8, max_steps=2)
    cfg.model.lora.enabled = True
    from alignkit import models

    setup = preference._policy_and_reference(cfg, cfg.pref)
    assert setup["ref_model"] is None and setup["peft_config"] is not None
    assert "adapter disabled" in setup["reference"]
    summary = preference.run(cfg)
    assert summary["reference"] == setup["reference"] and summary["lora"]
    out = Path(summary["output_dir"])
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "model" / "ref").exists()
    assert summary["trainable_params"] < summary["total_params"] / 5
    # the disabled-adapter forward of the trained policy == the base model's forward
    from peft import PeftModel

    base, tok = models.load_causal_lm(str(tiny_model_dir), device="cpu")
    ids = tok("the movie was great", return_tensors="pt")["input_ids"]
    fresh, _ = models.load_causal_lm(str(tiny_model_dir), device="cpu")
    policy = PeftModel.from_pretrained(fresh, str(out / "model"))
    with torch.no_grad(), policy.disable_adapter():
        ref_logits = policy(ids).logits
    torch.testing.assert_close(ref_logits, base(ids).logits.detach())
    with torch.no_grad():
        assert not torch.allclose(policy(ids).logits, ref_logits), "the adapter must have been trained"


def test_precompute_and_explicit_reference(tmp_path: Path, tiny_model_dir, sft_tiny_dir):
    """--precompute-ref keeps no reference model and gives the same first loss (log 2 at step 1: policy = ref);
    --ref-model uses another frozen model (here the SFT model, so step 1 is no longer log 2)."""
    import math

    pre = _cfg(tmp_path / "pre", str(tiny_model_dir), n=32, batch_size=8, max_steps=1)
    pre.pref.precompute_ref_log_probs = True
    setup = preference._policy_and_reference(pre, pre.pref)
    assert setup["ref_model"] is None and setup["reference"].startswith("precomputed")
    first = _metrics(Path(preference.run(pre)["output_dir"]))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    other = _cfg(tmp_path / "ref", str(tiny_model_dir), n=32, batch_size=8, max_steps=1)
    other.pref.ref_model = str(sft_tiny_dir)
    summary = preference.run(other)
    assert summary["reference"] == f"frozen model {sft_tiny_dir}"
    assert abs(_metrics(Path(summary["output_dir"]))[0]["loss"] - math.log(2)) > 1e-2


@pytest.mark.slow  # a 2-process launch or a benchmark: `make test-all`
@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_two_process_cpu_launch_splits_the_data(command, tmp_path: Path, tiny_model_dir, alignkit_cache):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "alignkit.cli", command, "--model", "tiny", "--data", "builtin:pairwise",
        "--max-samples", "32", "--batch-size", "4", "--max-length", "96", "--lr", "5e-4",
        "--device", "cpu", "-o", str(out), "--num-processes", "2",
    ]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    par = summary["data_parallel"]
    rows = 32 if command == "dpo" else 64  # kto: each pair gives a desirable and an undesirable row
    assert summary["world_size"] == 2 and par["examples_per_rank"] == [rows // 2, rows // 2]
    assert par["examples_seen_by_every_rank"] == 0 and summary["steps"] == rows // 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_soft_sppo_prob_from_a_preference(tmp_path: Path, tiny_model_dir):
    """--preference oracle fills P(chosen ≻ rejected) for eq. 4.12 from the shared wrapper; data without a prob
    column then trains; the preference option is refused for the other losses."""
    from alignkit import arena

    no_prob = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in arena.build_pairwise_offline(16, seed=2)])
    cfg = _cfg(tmp_path / "s", str(tiny_model_dir), loss="sppo", n=16, batch_size=8, max_steps=1)
    cfg.data.source = no_prob
    cfg.pref.preference = "oracle"
    splits = preference._pairs(cfg)
    rows = splits["train"].to_list()
    want = arena.oracle_prob([r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert [r["prob"] for r in rows] == pytest.approx(want.tolist(), abs=1e-6)
    assert preference.run(cfg)["steps"] == 1
    with pytest.raises(Exception, match="read only by loss sppo"):
        _cfg(tmp_path / "d", str(tiny_model_dir), loss="dpo").pref.preference = "oracle"
