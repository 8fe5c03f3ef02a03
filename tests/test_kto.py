"""KTO trainer (`alignkit kto`): learns the built-in preferences from the SFT model on pairwise data that
the loader unpairs, resume reproduces the uninterrupted run, bad inputs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupt
from safetensors.torch import load_file

from alignkit.errors import UserError
from alignkit.trainers import preference


def _cfg(out: Path, model: str, n: int = 128, **train) -> preference.KTOConfig:
    base = {"learning_rate": 5e-4, "batch_size": 16, "max_length": 96, "logging_steps": 1, "epochs": 1}
    return preference.KTOConfig(
        model={"name": model, "device": "cpu"},
        data={"source": "builtin:pairwise", "max_samples": n, "seed": 5},
        train={**base, **train},
        kto={"beta": 0.1},
        output={"dir": str(out)},
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_kto_learns_the_builtin_preferences(tmp_path: Path, sft_tiny_dir):
    cfg = _cfg(tmp_path / "run", str(sft_tiny_dir), n=512, logging_steps=4, learning_rate=2e-4, epochs=2)
    summary = preference.run_kto(cfg)
    out = Path(summary["output_dir"])
    rows = [m for m in _metrics(out) if "rewards/margins" in m]
    first, tail = rows[0], rows[-8:]  # batch metrics are noisy (16 rows): average the last 8 logged windows
    margin = sum(m["rewards/margins"] for m in tail) / len(tail)
    loss = sum(m["loss"] for m in tail) / len(tail)
    # desirable completions' implied reward rises above the undesirable ones' (it starts at 0: ref = policy)
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.5)
    assert margin > 0.3 and loss < 0.48, rows
    assert summary["train_rows"] == 1024 and summary["reference"] == "frozen copy of the starting policy"
    assert summary["kl_last"] is not None and summary["kl_last"] >= 0
    assert (out / "model" / "model.safetensors").is_file() and not (out / "checkpoints").exists()


def test_kto_resume_reproduces_the_uninterrupted_run(tmp_path: Path, tiny_model_dir):
    model = str(tiny_model_dir)
    straight = preference.run_kto(_cfg(tmp_path / "a", model, n=32, batch_size=8, save_steps=4))
    with pytest.raises(KeyboardInterrupt):
        preference.run_kto(_cfg(tmp_path / "b", model, n=32, batch_size=8, save_steps=4), callbacks=[Interrupt(6)])
    again = _cfg(tmp_path / "b", model, n=32, batch_size=8, save_steps=4)
    again.output.resume = True
    resumed = preference.run_kto(again)
    assert resumed["steps"] == straight["steps"] == 8
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_kto_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path: Path, tiny_model_dir):
    model = str(tiny_model_dir)
    only_good = tmp_path / "good.jsonl"
    row = json.dumps({"prompt": "p", "completion": "c", "label": True})
    only_good.write_text((row + "\n") * 4)
    cfg = _cfg(tmp_path / "g", model)
    cfg.data.source = str(only_good)
    with pytest.raises(UserError, match="every row is desirable"):
        preference.run_kto(cfg)
    cfg = _cfg(tmp_path / "s", model)
    cfg.data.source = "builtin:sft"
    with pytest.raises(UserError, match="needs unpaired or pairwise data"):
        preference.run_kto(cfg)
    with pytest.raises(Exception, match="batch_size must be >= 2"):
        _cfg(tmp_path / "b", model, batch_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]


def test_pairs_are_split_before_unpairing_and_every_split_is_shuffled(tmp_path: Path, tiny_model_dir):
    cfg = _cfg(tmp_path / "x", str(tiny_model_dir), n=200)
    cfg.data.eval_fraction = 0.25
    splits = preference._unpaired(cfg)
    train, ev = splits["train"].to_list(), splits["eval"].to_list()
    assert len(train) == 300 and len(ev) == 100  # 150 / 50 pairs, two rows each
    prompts_train = {r["prompt"] for r in train}
    # a pair's two rows never straddle the split (prompts can repeat across pairs, so check the completions)
    from alignkit import data

    pairs, _ = data.load("builtin:pairwise", max_samples=200, seed=5)
    by_text = {(r["prompt"], r["chosen"]): r["rejected"] for r in pairs.to_list()}
    train_rows = {(r["prompt"], r["completion"]) for r in train}
    for r in ev:
        if r["label"] and (r["prompt"], r["completion"]) in by_text:
            assert (r["prompt"], by_text[(r["prompt"], r["completion"])]) not in train_rows
    for part in (train, ev):  # shuffled: desirable and undesirable rows mix in every block of 16
        assert all(0 < sum(r["label"] for r in part[i:i + 16]) < 16 for i in range(0, len(part) - 15, 16))
    assert prompts_train
