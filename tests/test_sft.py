"""SFT trainer: it learns the built-in task, resume reproduces the uninterrupted run, LoRA saves an
adapter that loads, and a 2-process CPU launch really splits the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, run_cli
from safetensors.torch import load_file
from transformers import TrainerCallback

from alignkit import arena, generation, models
from alignkit.trainers import sft


def _cfg(out: Path, **train) -> sft.SFTConfig:
    base = {"learning_rate": 3e-3, "batch_size": 16, "max_length": 96, "logging_steps": 1, "epochs": 1}
    return sft.SFTConfig(
        model={"name": "tiny", "device": "cpu"},
        data={"source": "builtin:sft", "max_samples": 192, "seed": 3},
        train={**base, **train},
        output={"dir": str(out)},
    )


def _sample_stats(model_dir: str, n: int = 24) -> dict[str, float]:
    model, tok = models.load_causal_lm(model_dir, device="cpu")
    prompts = [r["prompt"] for r in arena.build_prompts(n, seed=99)]
    samples = generation.generate(model, tok, prompts, k=1, max_new_tokens=40, seed=0, progress=False)
    gold = arena.gold_reward([s.completion for s in samples], [s.finished for s in samples])
    return {"eos": sum(s.finished for s in samples) / n, "gold": float(gold.mean())}


def test_sft_learns_the_builtin_task(sft_tiny_dir: Path, tiny_model_dir):
    """On the session's SFT run (conftest.sft_tiny_dir: 1024 rows, 2 epochs), trained once for every test
    that starts from an SFT policy."""
    out = sft_tiny_dir.parent
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < 0.6 * summary["first_loss"], summary
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "training_args.bin").exists()
    assert {"config.yaml", "metrics.jsonl", "summary.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "loss.png").stat().st_size > 0
    assert summary["train_tokens"] > 1024 and summary["train_tokens_per_s"] == pytest.approx(
        summary["train_tokens"] / summary["train_runtime_s"], rel=1e-9)
    assert not out.with_name(out.name + ".partial").exists() and not (out / "checkpoints").exists()
    before, after = _sample_stats(str(tiny_model_dir)), _sample_stats(str(out))
    # the untrained model babbles until max tokens; the SFT policy writes reviews that end with EOS
    assert after["eos"] >= 0.8 > before["eos"] + 0.3, (before, after)
    assert after["gold"] > before["gold"] + 0.8, (before, after)




def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, tiny_model_dir):
    straight = sft.run(_cfg(tmp_path / "a", save_steps=4))
    with pytest.raises(KeyboardInterrupt):
        sft.run(_cfg(tmp_path / "b", save_steps=4), callbacks=[Interrupt(6)])
    assert (tmp_path / "b.partial" / "checkpoints" / "checkpoint-4").is_dir() and not (tmp_path / "b").exists()
    again = _cfg(tmp_path / "b", save_steps=4)
    again.output.resume = True
    resumed = sft.run(again)
    assert resumed["steps"] == straight["steps"] == 12
    assert resumed["train_tokens"] == straight["train_tokens"] and resumed["train_tokens_per_s"] > 0
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    logged = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    steps_b = [m["step"] for m in logged if "loss" in m]
    assert len(steps_b) == len(set(steps_b)), "a resumed run must not log a step twice"
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert set(la) == set(range(1, 13)) and all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)


def test_token_throughput_counts_the_tokens_of_this_process_s_training_time():
    from alignkit.trainers._hf import token_throughput

    rows = [{"step": 1, "num_tokens": 100.0}, {"step": 2, "loss": 1.0}, {"step": 4, "num_tokens": 400.0},
            {"step": 6, "num_tokens": 700.0}]
    assert token_throughput(rows, 0, 7.0) == {"train_tokens": 700, "train_tokens_per_s": 100.0}
    # resumed at step 4: TRL's count restarts at 0, so step 6 logs the 300 tokens since the checkpoint
    resumed = rows[:3] + [{"step": 6, "num_tokens": 300.0}]
    assert token_throughput(resumed, 4, 3.0) == {"train_tokens": 700, "train_tokens_per_s": 100.0}
    assert token_throughput(rows[:1] + resumed[3:], 4, 3.0) == {"train_tokens": None, "train_tokens_per_s": 100.0}
    # resumed twice (at 2, then at 4): each segment's count restarts; the total adds every segment's end
    twice = [{"step": 1, "num_tokens": 100.0}, {"step": 2, "num_tokens": 200.0}, {"step": 3, "num_tokens": 100.0},
             {"step": 4, "num_tokens": 200.0}, {"step": 6, "num_tokens": 300.0}]
    assert token_throughput(twice, 4, 3.0) == {"train_tokens": 700, "train_tokens_per_s": 100.0}
    assert token_throughput([{"step": 1, "loss": 1.0}], 0, 1.0) == {}  # a trainer without num_tokens


def _losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def test_lora_sft_saves_an_adapter_that_loads(tmp_path: Path, tiny_model_dir):
    cfg = _cfg(tmp_path / "lora", learning_rate=1e-2)
    cfg.model.lora.enabled = True
    summary = sft.run(cfg)
    model_dir = Path(summary["output_dir"]) / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    assert summary["trainable_params"] < 0.2 * summary["total_params"]
    merged, _ = models.load_causal_lm(str(tmp_path / "lora"), device="cpu")  # run dir -> adapter -> merged
    base, _ = models.load_causal_lm(str(tiny_model_dir), device="cpu")
    diffs = [not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values())]
    assert any(diffs), "the merged adapter must change the base weights"


@pytest.mark.slow  # a 2-process launch or a benchmark: `make test-all`
def test_two_process_cpu_launch_splits_the_data(tmp_path: Path, tiny_model_dir, alignkit_cache):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "alignkit.cli", "sft", "--model", "tiny", "--data", "builtin:sft",
        "--max-samples", "64", "--batch-size", "8", "--max-length", "96", "--lr", "3e-3",
        "--device", "cpu", "-o", str(out), "--num-processes", "2",
    ]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching: " in proc.stderr and "--num_processes 2" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    par = summary["data_parallel"]
    assert par["world_size"] == 2 and summary["world_size"] == 2
    assert par["examples_per_rank"] == [32, 32] and par["examples_seen_by_every_rank"] == 0
    # rank 0 alone wrote: one finished directory, nothing left behind, each step logged once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(steps) == len(set(steps))
    assert summary["steps"] == 4  # 64 rows / (2 ranks x 8)


# --------------------------------------------------------------------------- rows that cannot be trained on


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _long_and_short(n: int, every: int) -> list[dict]:
    """n prompt/completion rows; every `every`-th prompt is ~200 words, far past max_length 64."""
    return [{"prompt": "word " * (200 if i % every == 0 else 5) + str(i), "completion": " a good review"}
            for i in range(n)]


class _TrainSetSize(TrainerCallback):
    """Records how many rows TRL's prepared training set really holds."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows = len(kwargs["train_dataloader"].dataset)


def test_rows_whose_prompt_fills_max_length_are_dropped_counted_and_reported(tmp_path: Path, tiny_model_dir, capsys):
    cfg = _cfg(tmp_path / "run", max_length=64, batch_size=4, max_steps=1)
    cfg.data.source, cfg.data.max_samples = _jsonl(tmp_path / "d.jsonl", _long_and_short(24, 6)), None
    seen = _TrainSetSize()
    summary = sft.run(cfg, callbacks=[seen])
    assert summary["dropped_rows"] == {"too_long": 4} and summary["train_rows"] == 20 == seen.rows
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dropped_rows"] == {"too_long": 4}
    err = capsys.readouterr().err
    assert "d.jsonl: dropped 4 of 24 rows (too_long: 4" in err and "--max-length" in err
    # nothing to drop: the count says so
    cfg = _cfg(tmp_path / "short", max_length=64, batch_size=4, max_steps=1)
    cfg.data.source = _jsonl(tmp_path / "s.jsonl", _long_and_short(8, 100)[1:])
    assert sft.run(cfg)["dropped_rows"] == {}


def test_every_row_too_long_fails_before_writing(tmp_path: Path, tiny_model_dir, monkeypatch, capsys):
    src = _jsonl(tmp_path / "long.jsonl", _long_and_short(6, 1))
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--model", "tiny", "--data", src, "--max-length", "64", "--device", "cpu",
                            "-o", str(out)], monkeypatch, capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "long.jsonl: all 6 rows were dropped (too_long: 6" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"], "nothing may look like a run"


def test_messages_column_holding_a_string_is_one_line(tmp_path: Path, monkeypatch, capsys):
    src = _jsonl(tmp_path / "m.jsonl", [{"messages": "hello there"}, {"messages": "general kenobi"}])
    code, _, err = run_cli(["sft", "--model", "tiny", "--data", src, "--device", "cpu", "-o", str(tmp_path / "run")],
                           monkeypatch, capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "m.jsonl: row 1: field 'messages' holds a string" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.slow  # 12 s in a subprocess (a hang regression): `make test-all`
def test_huge_max_length_with_long_rows_finishes(tmp_path: Path, tiny_model_dir, alignkit_cache):
    """Packing into 10^8-token blocks built a bin tree of 2^27 entries (TRL's BFD packing) and hung:
    max_length is capped to the model's positions (256 for tiny)."""
    src = _jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 3000, "completion": " good"}] * 4)
    cmd = [sys.executable, "-m", "alignkit.cli", "sft", "--model", "tiny", "--data", src, "--device", "cpu",
           "--max-length", "100000000", "--max-steps", "1", "--batch-size", "2", "--set", "train.packing=true",
           "-o", str(tmp_path / "run")]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
