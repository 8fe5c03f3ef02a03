"""QLoRA (`--load-in-4bit`) on CPU: bitsandbytes >= 0.46.1 runs 4-bit NF4 there, so the real path (4-bit
loading, LoRA training through TRL, saving and reloading the adapter) is tested without a GPU. The tests
that need bitsandbytes skip without it; the one-line refusals fake its absence. docs/models.md ("QLoRA").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, run_cli
from safetensors.torch import load_file

from alignkit import models, placement
from alignkit.errors import UserError
from alignkit.models import LoraSpec


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _layer_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


# ------------------------------------------------------------------------------- the real 4-bit path


def test_bitsandbytes_runs_4bit_on_this_cpu():
    pytest.importorskip("bitsandbytes")
    assert placement._bitsandbytes_cpu_problem.__wrapped__() is None  # the detector's own tiny matmul


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_4bit_tiny_has_linear4bit_layers_and_trains_only_lora(tiny_model_dir, device, monkeypatch):
    pytest.importorskip("bitsandbytes")
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tok = models.load_causal_lm("tiny", load_in_4bit=True, lora=LoraSpec(r=4, dropout=0.0))
    assert "Linear4bit" in _layer_types(model)
    if device == "cpu":
        assert placement.training_dtype(model) == torch.float32  # auto on CPU: fp32 compute
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = tok(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True).to(device)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast(device, dtype=placement.training_dtype(model), enabled=device == "cuda"):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach(), before) for n, before in trainable.items())


def test_sft_qlora_on_cpu_trains_saves_and_reloads(tmp_path, tiny_model_dir, no_cuda, monkeypatch, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--lora", "--load-in-4bit", "--max-samples", "48", "-o", str(out),
                            "--set", "train.learning_rate=5e-3", "--set", "train.logging_steps=1",
                            "--set", "train.batch_size=8"], monkeypatch, capsys)
    assert code == 0, err
    losses = _losses(out)
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    adapter = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())  # only the adapter trained
    # fp32 compute: the adapter stays fp32 (TRL alone would have made it bf16)
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    # the run loads as a policy: the adapter merged into the full-precision base (the default), or the 4-bit one
    full, _ = models.load_causal_lm(str(out))
    assert "Linear4bit" not in _layer_types(full) and "Linear" in _layer_types(full)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(full.state_dict()[key], base[key])  # the adapter is in it
    with pytest.warns(UserWarning, match="4-bit linear"):  # peft re-quantises the merged weights
        four, _ = models.load_causal_lm(str(out), load_in_4bit=True)
    assert "Linear4bit" in _layer_types(four)


def test_rm_qlora_on_cpu_trains_the_adapter_and_head_and_scores(tmp_path, tiny_model_dir, no_cuda):
    pytest.importorskip("bitsandbytes")
    from alignkit import rewards
    from alignkit.trainers import reward

    cfg = reward.RMConfig(
        model={"name": "tiny", "load_in_4bit": True, "lora": {"enabled": True, "r": 4}},
        data={"source": "builtin:pairwise", "max_samples": 20},
        train={"batch_size": 8, "max_steps": 2, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 96},
        eval={"ood_source": None}, output={"dir": str(tmp_path / "rm")},
    )
    summary = reward.run(cfg)
    assert summary["steps"] == 2 and all(map(torch.isfinite, torch.tensor(_losses(tmp_path / "rm"))))
    adapter = load_file(str(tmp_path / "rm" / "model" / "adapter_model.safetensors"))
    assert any("score" in k for k in adapter) and all("lora_" in k or "score" in k for k in adapter)
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    scorer = rewards.load_scorer(str(tmp_path / "rm"))  # full-precision base + merged adapter and head
    assert "Linear4bit" not in _layer_types(scorer.model)
    assert torch.isfinite(scorer.score(["p"], ["a reply"]).mean).all()


def test_rm_ensemble_qlora_on_cpu_trains_the_members_and_loads_on_the_full_base(tmp_path, tiny_model_dir, no_cuda):
    pytest.importorskip("bitsandbytes")
    from alignkit import rewards
    from alignkit.trainers import reward

    cfg = reward.RMEnsembleConfig(
        model={"name": "tiny", "load_in_4bit": True, "lora": {"r": 4}},
        data={"source": "builtin:pairwise", "max_samples": 20},
        train={"batch_size": 8, "max_steps": 2, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 96},
        ensemble={"n_members": 2}, eval={"ood_source": None}, output={"dir": str(tmp_path / "ens")},
    )
    summary = reward.run_ensemble(cfg)
    assert summary["steps"] == 2 and all(map(torch.isfinite, torch.tensor(_losses(tmp_path / "ens"))))
    info = json.loads(next((tmp_path / "ens").rglob("ensemble.json")).read_text())
    assert info["trained_on_4bit"] is True
    for member in ("m0", "m1"):  # LoRA and the member's head, in fp32 (TRL's bf16 cast undone)
        adapter = load_file(str(tmp_path / "ens" / "members" / member / "adapter_model.safetensors"))
        assert any("score" in k for k in adapter) and {t.dtype for t in adapter.values()} == {torch.float32}
    ensemble = rewards.load_scorer(str(tmp_path / "ens"))  # the members on the full-precision base
    assert "Linear4bit" not in _layer_types(ensemble.ensemble.model)
    scores = ensemble.score(["p", "q"], ["a reply", "another reply"])
    assert scores.members.shape == (2, 2) and torch.isfinite(scores.members).all()
    assert not torch.equal(scores.members[0], scores.members[1])  # two trained members, not copies


@pytest.mark.parametrize("command", ["ppo", "sppo"])
def test_online_loops_train_lora_on_a_4bit_policy_on_cpu(command, tmp_path, tiny_model_dir, no_cuda, monkeypatch):
    """ppo and sppo load their policy through the same loader: LoRA on 4-bit weights, a saved fp32 adapter."""
    pytest.importorskip("bitsandbytes")
    from alignkit.online import rollout

    loaded = []
    load_policy = rollout.load_policy
    monkeypatch.setattr(rollout, "load_policy", lambda *a, **k: loaded.append(load_policy(*a, **k)) or loaded[-1])
    model = {"name": "tiny", "device": "cpu", "load_in_4bit": True, "lora": {"enabled": True, "r": 4}}
    out = tmp_path / command
    if command == "ppo":
        from alignkit.trainers import ppo

        ppo.run(ppo.PPOConfig(model=model, data={"max_samples": 16}, output={"dir": str(out)},
                              ppo={"iterations": 1, "prompts_per_iteration": 4, "k": 2, "max_new_tokens": 6,
                                   "minibatch_size": 4, "ppo_epochs": 1}))
        adapter = out / "model" / "adapter_model.safetensors"
    else:
        from alignkit.trainers.sppo import loop
        from alignkit.trainers.sppo.config import SPPOConfig

        loop.run(SPPOConfig(model=model, data={"max_samples": 24}, output={"dir": str(out)},
                            sppo={"iterations": 1, "k": 2, "eval_prompts": 4, "max_new_tokens": 6, "chunk_prompts": 8},
                            train={"optimizer": "adamw", "batch_size": 4}))
        adapter = out / "iter-1" / "model" / "adapter_model.safetensors"
    assert loaded and "Linear4bit" in _layer_types(loaded[0][0])
    weights = load_file(str(adapter))
    assert weights and all("lora_" in k for k in weights) and {t.dtype for t in weights.values()} == {torch.float32}


def test_dpo_qlora_on_cpu_one_step(tmp_path, tiny_model_dir, no_cuda):
    pytest.importorskip("bitsandbytes")
    from alignkit.trainers import preference

    cfg = preference.DPOConfig(
        model={"name": "tiny", "load_in_4bit": True, "lora": {"enabled": True, "r": 4}},
        data={"source": "builtin:pairwise", "max_samples": 16},
        train={"batch_size": 8, "max_steps": 1, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 96},
        output={"dir": str(tmp_path / "dpo")},
    )
    summary = preference.run(cfg)
    assert summary["steps"] == 1 and summary["reference"].startswith("the base with the LoRA adapter disabled")
    assert torch.isfinite(torch.tensor(_losses(tmp_path / "dpo"))).all()
    adapter = load_file(str(tmp_path / "dpo" / "model" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)


# ------------------------------------------------------------------------------- where it runs, refusals


def test_4bit_plan_on_cpu_quantises_on_the_cpu(no_cuda, monkeypatch):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: True)
    monkeypatch.setattr(placement, "_bitsandbytes_cpu_problem", lambda: None)
    plan = models.plan_loading("auto", "auto", load_in_4bit=True)
    kwargs = plan.from_pretrained_kwargs()
    assert plan.device.type == "cpu" and not plan.move and kwargs["device_map"] == {"": "cpu"}
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float32  # fp32 on CPU unless asked


def test_no_cuda_and_no_bitsandbytes_is_one_line_with_both_ways_out(no_cuda, monkeypatch):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: False)
    with pytest.raises(UserError) as err:
        models.plan_loading("auto", "auto", load_in_4bit=True)
    message = str(err.value)
    assert "no CUDA GPU is visible" in message and "pip install 'alignkit[qlora]'" in message
    assert "run on a CUDA machine" in message and "drop --load-in-4bit" in message and "\n" not in message


def test_no_cuda_and_bitsandbytes_without_a_cpu_backend_is_one_line(tmp_path, no_cuda, monkeypatch, capsys):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: True)
    monkeypatch.setattr(placement, "_bitsandbytes_cpu_problem", lambda: "bitsandbytes 0.45.5 has no CPU backend")
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--lora", "--load-in-4bit", "--max-samples", "8", "-o", str(out)],
                           monkeypatch, capsys)
    one_line_error(code, err, "0.45.5 has no CPU backend", "bitsandbytes>=0.46.1", "CUDA machine")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_an_old_bitsandbytes_is_refused_by_its_version_without_importing_it(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    problem = placement._bitsandbytes_cpu_problem.__wrapped__()
    assert problem == "bitsandbytes 0.45.5 has no CPU backend"


def test_a_failing_cpu_kernel_is_a_problem_not_a_crash(monkeypatch):
    import importlib.metadata
    import sys

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.50.2")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    problem = placement._bitsandbytes_cpu_problem.__wrapped__()
    assert problem.startswith("bitsandbytes 0.50.2 cannot run 4-bit on CPU (ModuleNotFoundError")


def test_dry_run_does_not_probe_bitsandbytes(tmp_path, no_cuda, monkeypatch, capsys):
    def refuse():
        raise AssertionError("bitsandbytes was probed on the dry-run path")

    monkeypatch.setattr(placement, "_bitsandbytes_cpu_problem", refuse)
    code, _, err = run_cli(["sft", "--lora", "--load-in-4bit", "--dry-run", "-o", str(tmp_path / "r")],
                           monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.parametrize("compute, expected", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_adapters_leave_bf16_unless_the_compute_dtype_is_bf16(compute, expected):
    """TRL casts a 4-bit model's trainable weights to bf16: back to fp32 under fp32 and fp16 compute (fp16
    adapters without loss scaling would underflow), left alone under bf16; frozen weights are not touched."""
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    model.bias.requires_grad_(False)
    model.is_loaded_in_4bit = True
    model.config = SimpleNamespace(quantization_config=SimpleNamespace(bnb_4bit_compute_dtype=compute))
    placement.adapters_in_compute_dtype(model)
    assert model.weight.dtype == expected and model.bias.dtype == torch.bfloat16
