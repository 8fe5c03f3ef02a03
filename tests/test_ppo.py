"""`alignkit ppo`: PPO raises the gold reward of the SFT policy, resume reproduces the uninterrupted run bit
for bit (ū of UP-RLHF included), the critic-free advantages and the KL loss run, bad inputs are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, run_cli
from safetensors.torch import load_file

from alignkit import models
from alignkit.online import ranks, rollout
from alignkit.trainers import ppo
from alignkit.trainers.loop import Loop


def _cfg(out: Path, model: str = "tiny", **ppo_over) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        model={"name": str(model), "device": "cpu"},
        data={"max_samples": 64},
        ppo={"iterations": 4, "prompts_per_iteration": 4, "k": 2, "max_new_tokens": 8, "minibatch_size": 4,
             "ppo_epochs": 2, **ppo_over},
        train={"learning_rate": 1e-4, "save_steps": 2},
        output={"dir": str(out)},
    )


def _metrics(run: Path) -> list[dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in rows]


def test_ppo_raises_the_gold_reward_of_the_sft_policy(tmp_path: Path, sft_tiny_dir):
    cfg = ppo.PPOConfig(
        model={"name": str(sft_tiny_dir), "device": "cpu"}, data={"max_samples": 256},
        ppo={"iterations": 15, "prompts_per_iteration": 32, "max_new_tokens": 40, "minibatch_size": 16,
             "ppo_epochs": 4, "kl_coef": 0.02},
        train={"learning_rate": 1e-4, "save_steps": 0}, output={"dir": str(tmp_path / "run")},
    )
    summary = ppo.run(cfg)
    out = Path(summary["output_dir"])
    gold = [m["gold"] for m in _metrics(out)]
    assert len(gold) == 15 and summary["iterations"] == 15
    first, last = sum(gold[:4]) / 4, sum(gold[-4:]) / 4
    print("gold per iteration:", [round(g, 3) for g in gold])
    assert last > first + 0.15, gold
    row = _metrics(out)[-1]
    for key in ("reward", "kl_k1", "kl_k3", "entropy", "clipfrac", "value_loss", "explained_variance", "length",
                "eos_rate"):
        assert key in row, key
    times = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(times[f"time_{t}_s"] > 0 for t in ("rollout", "score", "reference_value", "update"))
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert (out / "plots" / "reward_vs_kl.png").stat().st_size > 0 and not (out / "checkpoints").exists()
    models.load_causal_lm(str(out), device="cpu")  # what `alignkit eval DIR` loads


def _interrupt_at(monkeypatch, iteration: int) -> None:
    """Ctrl-C right after `iteration` is logged: with save_steps=2 and iteration 3, the checkpoint of
    iteration 2 is the one to resume from and iteration 3 is done again."""
    real_log = Loop.log

    def log(self, row):
        out = real_log(self, row)
        if self.step == iteration:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Loop, "log", log)


@pytest.mark.parametrize("advantage, lora", [("gae", False), ("rloo", False), ("gae", True)])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path: Path, tiny_model_dir, monkeypatch, advantage,
                                                             lora):
    def cfg(out: Path) -> ppo.PPOConfig:
        c = _cfg(out, advantage=advantage, kl_target=0.5, kl_horizon=40)  # the adaptive β resumes too
        c.model.lora.enabled = lora
        return c

    straight = ppo.run(cfg(tmp_path / "a"))
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)  # past the checkpoint of iteration 2: iteration 3 is lost and redone
        with pytest.raises(KeyboardInterrupt):
            ppo.run(cfg(tmp_path / "b"))
    assert (tmp_path / "b.partial" / "checkpoints" / "step-2").is_dir() and not (tmp_path / "b").exists()
    again = cfg(tmp_path / "b")
    again.output.resume = True
    resumed = ppo.run(again)
    assert resumed["iterations"] == straight["iterations"] == 4
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    wa = load_file(str(tmp_path / "a" / "model" / weights))
    wb = load_file(str(tmp_path / "b" / "model" / weights))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert [m["step"] for m in _metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert len({m["kl_coef"] for m in _metrics(tmp_path / "b")}) == 4  # the controller moved β every iteration


def test_adaptive_kl_controller_by_hand():
    # e = clip(KL/target − 1, ±0.2); β ← β·(1 + e·n/horizon)
    assert ppo.adaptive_kl_coef(0.1, kl=3.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, kl=6.6, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, kl=60.0, target=6.0, n=1000, horizon=1000) == pytest.approx(0.12)
    assert ppo.adaptive_kl_coef(0.1, kl=6.0, target=6.0, n=10, horizon=10) == 0.1


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_critic_free_advantages_run_from_the_cli(tmp_path: Path, tiny_model_dir, monkeypatch, capsys, advantage):
    out = tmp_path / advantage
    code, _, err = run_cli(["ppo", "--model", "tiny", "--device", "cpu", "--advantage", advantage, "--k", "2",
                            "--iterations", "2", "--prompts-per-iteration", "3", "--max-new-tokens", "8",
                            "--max-samples", "16", "-o", str(out)], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["advantage"] == advantage
    rows = _metrics(out)
    assert len(rows) == 2 and "value_loss" not in rows[0] and "clipfrac" in rows[0]


def test_kl_loss_mode_runs(tmp_path: Path, tiny_model_dir):
    summary = ppo.run(_cfg(tmp_path / "run", kl_mode="loss", beta1=0.1, iterations=2))
    rows = _metrics(Path(summary["output_dir"]))
    assert len(rows) == 2 and all(m["kl_loss"] >= 0 for m in rows) and rows[1]["kl_loss"] > 0
    assert rows[0]["kl_k1"] == rows[0]["kl_k3"] == 0.0  # the rollout of iteration 1 comes from the reference itself


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-member reward-LoRA ensemble trained for a few steps: enough for its members to disagree."""
    from alignkit.trainers import reward

    out = tmp_path_factory.mktemp("ens") / "run"
    reward.run_ensemble(reward.RMEnsembleConfig(
        model={"name": "tiny", "device": "cpu", "lora": {"r": 4, "alpha": 8}},
        data={"source": "builtin:pairwise", "max_samples": 64},
        train={"learning_rate": 1e-2, "epochs": 1, "batch_size": 16, "max_length": 64, "logging_steps": 2},
        ensemble={"n_members": 2, "lam": 0.1}, eval={"ood_max_samples": 8}, output={"dir": str(out)},
    ))
    return out


def test_up_rlhf_penalises_uncertainty_and_resumes_the_running_mean(tmp_path: Path, tiny_ensemble, monkeypatch):
    over = {"reward": str(tiny_ensemble), "beta2": 0.5, "kl_mode": "loss", "beta1": 0.05}
    straight = ppo.run(_cfg(tmp_path / "a", **over))
    rows = _metrics(tmp_path / "a")
    assert all(m["u"] > 0 for m in rows) and "gold" in rows[0]  # a proxy on the built-in task: gold logged too
    # ū is the running mean of u over every sample so far: with equal batches, the mean of the batch means
    for i, m in enumerate(rows):
        assert m["u_bar"] == pytest.approx(sum(r["u"] for r in rows[: i + 1]) / (i + 1), rel=1e-6)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            ppo.run(_cfg(tmp_path / "b", **over))
    again = _cfg(tmp_path / "b", **over)
    again.output.resume = True
    ppo.run(again)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b") and straight["iterations"] == 4


def _empty(tmp: Path) -> str:
    (tmp / "empty.jsonl").write_text("")
    return str(tmp / "empty.jsonl")


@pytest.mark.parametrize("args, words", [
    (["--beta1", "-1"], ["beta1"]),
    (["--beta2", "-0.5"], ["beta2"]),
    (["--beta2", "0.1"], ["beta2", "gold", "members"]),
    (["--advantage", "rloo"], ["ppo.k", "2"]),
    (["--advantage", "grpo", "--k", "1"], ["ppo.k"]),
    (["--kl-mode", "loss", "--kl-coef", "0.1"], ["kl_coef", "kl_mode"]),
    (["--set", "ppo.kl_horizon=100"], ["kl_horizon", "kl_target"]),
    (["--set", "launch.accelerate_config=zero2", "--set", "ppo.backend=vllm"], ["vllm", "sharded"]),
    (["--set", "launch.accelerate_config=deepspeed"], ["accelerate_config"]),
    (["--set", "launch.num_processes=2", "--prompts-per-iteration", "3"], ["multiple", "num_processes"]),
    ("EMPTY", ["empty.jsonl"]),
])
def test_bad_inputs_are_one_line(tmp_path: Path, monkeypatch, capsys, args, words):
    if args == "EMPTY":
        args = ["--data", _empty(tmp_path)]
    out = tmp_path / "run"
    code, _, err = run_cli(["ppo", "--model", "tiny", "--device", "cpu", "-o", str(out), *args], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert not out.exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("recipe", ["ppo-tiny", "up-rlhf-tiny"])
def test_recipes_run_shortened(tmp_path: Path, tiny_model_dir, monkeypatch, capsys, recipe):
    out = tmp_path / recipe
    code, _, err = run_cli(["run", recipe, "ppo.iterations=2", "ppo.prompts_per_iteration=4", "ppo.max_new_tokens=8",
                            "model.device=cpu", f"output.dir={out}"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("module, body, words", [
    ("nan_reward", "[float('nan')] * len(completions)", ["nan_reward:reward", "NaN"]),
    ("short_reward", "[0.0]", ["short_reward:reward", "1 scores for"]),
])
def test_a_reward_that_returns_nan_or_the_wrong_count_is_one_line(tmp_path: Path, tiny_model_dir, monkeypatch,
                                                                  capsys, module, body, words):
    (tmp_path / f"{module}.py").write_text(f"def reward(prompts, completions):\n    return {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(["ppo", "--model", "tiny", "--device", "cpu", "--reward", f"{module}:reward",
                            "--iterations", "1", "--prompts-per-iteration", "2", "--max-new-tokens", "4",
                            "-o", str(tmp_path / "run")], monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert not (tmp_path / "run").exists()  # the unfinished run stays in run.partial, never looks finished


def test_lora_policy_uses_its_base_as_the_reference_and_saves_an_adapter(tmp_path: Path, tiny_model_dir):
    cfg = _cfg(tmp_path / "lora", iterations=3)
    cfg.model.lora.enabled = True
    cfg.train.learning_rate = 1e-2
    summary = ppo.run(cfg)
    out = Path(summary["output_dir"])
    assert summary["lora"] and summary["trainable_params"] < 0.2 * summary["total_params"]
    rows = _metrics(out)
    # iteration 1 samples from the untouched adapter (B = 0): policy = reference; then the adapter moves
    # away from the base it is compared with
    assert rows[0]["kl_k1"] == 0.0 and rows[-1]["kl_k3"] > 0 and "value_loss" in rows[-1]
    model_dir = out / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    merged, _ = models.load_causal_lm(str(out), device="cpu")  # run dir -> adapter -> merged
    base, _ = models.load_causal_lm(str(tiny_model_dir), device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


def test_shared_base_layout_computes_what_separate_copies_compute_and_checkpoints_only_adapters(tmp_path: Path):
    """With LoRA, policy, reference and critic share one frozen base (the critic a second adapter on the
    policy's peft model): the same numbers as separate copies, and a checkpoint holds no base weight."""
    rows, states = {}, {}
    for share in (True, False):
        cfg = _cfg(tmp_path / str(share), iterations=2)
        cfg.model.lora.enabled, cfg.ppo.share_base, cfg.train.learning_rate = True, share, 1e-2
        cfg.train.save_steps = 1
        def save(self, objects, share=share, real_save=Loop.save):  # read each checkpoint back (removed at the end)
            path = real_save(self, objects)
            states[share] = torch.load(path / "state.pt", weights_only=True)["objects"]
            return path

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Loop, "save", save)
            summary = ppo.run(cfg)
        assert summary["layout"] == ("shared base" if share else "separate copies")
        rows[share] = _metrics(Path(summary["output_dir"]))
    assert rows[True] == rows[False] and rows[True][-1]["kl_k3"] > 0
    shared = states[True]
    assert shared["policy"] and all("lora_" in k for k in shared["policy"])
    assert all("lora_" in k and ".critic." in k or k.startswith("head.") for k in shared["critic"])
    assert {k.replace(".critic.", ".default.") for k in shared["critic"] if "lora_" in k} == set(shared["policy"])
    # the run's model is the policy's adapter only
    model_dir = tmp_path / "True" / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and not (model_dir / "critic").exists()
    assert all(".critic." not in k for k in load_file(model_dir / "adapter_model.safetensors"))


def test_each_rank_samples_a_disjoint_shard_of_the_iterations_prompts():
    for it in range(5):  # 5 iterations of 6 prompts from a pool of 16: passes over the pool wrap around
        whole = rollout.prompt_indices(16, it, 6, seed=3)
        shards = [rollout.prompt_indices(16, it, 6, seed=3, rank=r, world_size=3) for r in range(3)]
        assert sorted(sum(shards, [])) == sorted(whole) and all(len(s) == 2 for s in shards)
    first_pass = sum((rollout.prompt_indices(16, it, 4, seed=3) for it in range(4)), [])
    assert sorted(first_pass) == list(range(16))  # one pass visits every prompt once


@pytest.mark.slow  # a 2-process launch: `make test-all`
def test_two_process_cpu_run_splits_the_prompts(tmp_path: Path, tiny_model_dir, alignkit_cache):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "alignkit.cli", "ppo", "--model", "tiny", "--device", "cpu", "--iterations", "2",
           "--prompts-per-iteration", "4", "--k", "2", "--max-new-tokens", "8", "--max-samples", "32",
           "-o", str(out), "--num-processes", "2"]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loop"]["world_size"] == 2 and summary["iterations"] == 2
    assert summary["data_parallel"] == {"world_size": 2, "prompts_per_rank": [4, 4], "prompts_sampled_by_two_ranks": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_beta2_with_a_single_reward_model_is_one_line(tmp_path: Path, tiny_model_dir, monkeypatch, capsys):
    rm, tok = models.load_sequence_classifier(str(tiny_model_dir), device="cpu")  # one model: no members
    rm.save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    capsys.readouterr()  # transformers' loading bar above is the test's, not the command's
    code, _, err = run_cli(["ppo", "--model", "tiny", "--device", "cpu", "--reward", str(tmp_path / "rm"),
                            "--beta2", "0.1", "-o", str(tmp_path / "run")], monkeypatch, capsys)
    one_line_error(code, err, "beta2", "no members", str(tmp_path / "rm"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def _average_on_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a = torch.nn.Parameter(torch.full((2, 2), float(rank)))  # rank 0's value wins the broadcast
    b, c, d = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2))
    ranks.broadcast([a], world)
    a.grad, b.grad = torch.full((2, 2), 1.0 + rank), torch.tensor([2.0, 4.0, 6.0]) * (rank + 1)  # c: no gradient
    if rank == 0:  # d: a gradient on rank 0 only (rank 1 had no rows)
        d.grad = torch.tensor([4.0, 8.0])
    ranks.average_gradients([a, b, c, d], world)
    torch.save({"a": a.detach(), "a_grad": a.grad, "b_grad": b.grad, "c_grad": c.grad, "d_grad": d.grad},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes
def test_gradients_are_averaged_over_ranks_and_weights_start_equal(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["a"], torch.zeros(2, 2))  # broadcast from rank 0
        assert torch.equal(got["a_grad"], torch.full((2, 2), 1.5))  # (1 + 2) / 2
        assert torch.equal(got["b_grad"], torch.tensor([3.0, 6.0, 9.0]))  # ([2,4,6] + [4,8,12]) / 2
        assert got["c_grad"] is None  # no rank had one: stays None, as on one process
        assert torch.equal(got["d_grad"], torch.tensor([2.0, 4.0]))  # ([4, 8] + zeros) / 2


def test_gradient_accumulation_over_micro_batches_matches_one_forward(tmp_path: Path):
    """micro_batch_size 1 (4 forwards per minibatch of 4, each weighted by its share of the tokens) trains
    what one forward of the minibatch trains: the same metrics up to float rounding."""
    rows = {}
    for micro in (None, 1):
        cfg = _cfg(tmp_path / str(micro), iterations=2, micro_batch_size=micro)
        cfg.train.lr_scheduler, cfg.train.warmup_ratio = "linear", 0.25
        rows[micro] = _metrics(Path(ppo.run(cfg)["output_dir"]))
    for a, b in zip(rows[None], rows[1], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows[1][-1]["kl_k3"] > 0


def _launch_ppo(out: Path, env: dict, *extra: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "alignkit.cli", "ppo", "--model", "tiny", "--device", "cpu", "--iterations", "4",
           "--prompts-per-iteration", "4", "--k", "2", "--max-new-tokens", "8", "--max-samples", "32", "-o", str(out),
           "--num-processes", "2", "--set", "train.save_steps=2", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_tree(pid: int, sig: int) -> None:
    import os
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, sig)  # first the parent, so that it cannot start anything new
    for child in children:
        _kill_tree(int(child), sig)


@pytest.mark.slow  # three 2-process launches
def test_fsdp_sharded_run_matches_ddp_and_resumes_from_per_rank_shards(tmp_path: Path, tiny_model_dir,
                                                                       alignkit_cache):
    """accelerate_config fsdp: FSDP2 shards policy, reference and critic over the 2 ranks; the run computes
    what DDP computes, and a kill -9 after the first checkpoint resumes from every rank's own shards."""
    import os
    import signal
    import time

    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, config in (("ddp", "ddp"), ("fsdp", "fsdp")):
        proc = _launch_ppo(tmp_path / name, env, "--set", f"launch.accelerate_config={config}")
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        runs[name] = _metrics(tmp_path / name)
    for a, b in zip(runs["ddp"], runs["fsdp"], strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # kill -9 the whole launch once iteration 2's checkpoint (both ranks' shards) is complete, then resume
    out = tmp_path / "killed"
    proc = _launch_ppo(out, env, "--set", "launch.accelerate_config=fsdp")
    ckpt = out.with_suffix(".partial") / "checkpoints" / "step-2"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (ckpt / "COMPLETE").is_file():
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    _kill_tree(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started (in sessions of their own)
    proc.wait()
    assert (ckpt / "state-rank1.pt").is_file()  # rank 1's shards beside rank 0's state.pt
    proc = _launch_ppo(out, env, "--set", "launch.accelerate_config=fsdp", "--resume")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    for a, b in zip(runs["fsdp"], _metrics(out), strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow  # three runs in subprocesses
def test_kill_9_then_resume_is_bit_exact(tmp_path: Path, tiny_model_dir, alignkit_cache):
    """A real kill -9 of one process after its first checkpoint; `--resume` ends with the uninterrupted run's
    metrics, bit for bit (CPU), with LoRA and the shared-base critic."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "alignkit.cli", "ppo", "--model", "tiny", "--device", "cpu",
                                 "--iterations", "6", "--prompts-per-iteration", "4", "--k", "2", "--max-new-tokens",
                                 "8", "--max-samples", "32", "--lora", "--lr", "1e-2", "--set", "train.save_steps=2",
                                 "-o", str(out), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    straight = launch(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    proc = launch(tmp_path / "killed")
    ckpt = tmp_path / "killed.partial" / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = launch(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "straight")
