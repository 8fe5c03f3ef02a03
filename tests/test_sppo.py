"""`alignkit sppo`: P̂, the kept pairs, the self-play loss and the LC win rate by hand; the reference log-probs
stored at sampling equal a fresh forward; a 2-iteration run; a stop while sampling, scoring or training
resumes to the uninterrupted run's numbers with the finished iteration's files untouched; bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, run_cli

from alignkit import losses, models
from alignkit.online import rollout, selfplay
from alignkit.trainers.loop import Loop
from alignkit.trainers.sppo import SPPOConfig, run, stages
from alignkit.trainers.sppo.loop import split_prompts, unique_prompts


# ------------------------------------------------------------------------------ by hand
def test_p_hat_is_the_row_mean_with_self_as_one_half():
    # P(y_0 ≻ y_1) = 0.8, P(y_0 ≻ y_2) = 0.6, P(y_1 ≻ y_2) = 0.3; the diagonal as given is ignored
    m = torch.tensor([[[9.0, 0.8, 0.6], [0.2, 9.0, 0.3], [0.4, 0.7, 9.0]]])
    p = selfplay.p_hat(m)
    assert torch.allclose(p, torch.tensor([[(0.5 + 0.8 + 0.6) / 3, (0.2 + 0.5 + 0.3) / 3, (0.4 + 0.7 + 0.5) / 3]]))
    winner, loser, kept = selfplay.winner_loser(p)
    assert winner.tolist() == [0] and loser.tolist() == [1] and kept.tolist() == [True]
    # K = 2: P̂_w = ¼ + P(y_w ≻ y_l)/2 (self included), not the ½ + P/2 the paper prints
    assert selfplay.p_hat(torch.tensor([[[0.5, 0.9], [0.1, 0.5]]]))[0, 0].item() == pytest.approx(0.25 + 0.45)


def test_a_prompt_whose_samples_all_tie_is_not_kept():
    winner, loser, kept = selfplay.winner_loser(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.7, 0.4]]))
    assert kept.tolist() == [False, True] and winner.tolist() == [0, 1] and loser.tolist() == [0, 0]


def test_self_play_loss_on_given_log_ratios():
    # η = 1/β = 10: targets 10·(0.7 − ½) = 2 and 10·(0.4 − ½) = −1
    lw, ll = torch.tensor([1.0]), torch.tensor([0.5])
    loss = losses.sppo_self_play_loss(lw, ll, torch.tensor([0.7]), torch.tensor([0.4]), beta=0.1)
    assert loss.item() == pytest.approx(0.5 * ((1 - 2) ** 2 + (0.5 + 1) ** 2))  # 1.625
    both = losses.sppo_sample_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.7, 0.4]), 0.1)
    assert both.item() == pytest.approx(1.625)
    with pytest.raises(ValueError):
        losses.sppo_sample_loss(lw, torch.tensor([1.2]), 0.1)


def test_length_controlled_win_rate():
    # no length difference: the plain mean
    assert selfplay.length_controlled_win_rate(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(4)) == 0.75
    # wins only where the new answer is longer, symmetric lengths: at zero difference a coin flip
    wins = torch.tensor([1.0, 1.0, 0.0, 0.0] * 5)
    diff = torch.tensor([5.0, 3.0, -5.0, -3.0] * 5)
    assert selfplay.length_controlled_win_rate(wins, diff) == pytest.approx(0.5, abs=1e-6)
    # outcomes exactly on a logistic curve σ(a + b·tanh(d / std d)), a = 0.5, b = 1: LC = σ(0.5) = 0.6225
    diff = torch.tensor([-6.0, -2.0, 0.0, 1.0, 3.0, 8.0] * 3)
    wins = torch.sigmoid(0.5 + torch.tanh(diff / diff.std()))
    assert selfplay.length_controlled_win_rate(wins, diff) == pytest.approx(0.622459, abs=1e-3)
    # a policy that wins more where it is longer, longer on average: LC is below the raw win rate
    wins, diff = torch.tensor([0.9, 0.9, 0.9, 0.4]), torch.tensor([5.0, 5.0, 5.0, -5.0])
    assert selfplay.length_controlled_win_rate(wins, diff) < float(wins.mean())


def test_prompts_are_split_into_disjoint_parts_and_repeats_dropped():
    held, parts = split_prompts(23, 3, 5, split=True, seed=0)
    flat = held + [i for part in parts for i in part]
    assert sorted(flat) == list(range(23)) and len(held) == 5 and [len(p) for p in parts] == [6, 6, 6]
    _, same = split_prompts(23, 3, 5, split=False, seed=0)
    assert same[0] == same[2] and len(same[0]) == 18
    assert unique_prompts(["a", "b", "a", {"m": 1}, {"m": 1}]) == (["a", "b", {"m": 1}], 2)


# ------------------------------------------------------------------------------ runs
def _cfg(out: Path, **sppo) -> SPPOConfig:
    return SPPOConfig(
        model={"name": "tiny", "device": "cpu"}, data={"max_samples": 40},
        sppo={"iterations": 2, "k": 3, "eval_prompts": 8, "max_new_tokens": 8, "chunk_prompts": 8, **sppo},
        train={"learning_rate": 1e-3, "optimizer": "adamw", "batch_size": 3, "micro_batch_size": 2, "save_steps": 1},
        output={"dir": str(out)},
    )


def _numbers(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_it = [{k: v for k, v in r.items() if k != "time_s"}
              for r in json.loads((out / "summary.json").read_text())["per_iteration"]]
    return rows, per_it


def _digest(where: Path) -> dict[str, str]:
    return {str(f.relative_to(where)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(where.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    summary = run(_cfg(tmp_path_factory.mktemp("sppo") / "run"))
    return Path(summary["output_dir"])


def test_two_iterations_write_every_file_and_learn(uninterrupted: Path, tiny_model_dir):
    out = uninterrupted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and len(summary["per_iteration"]) == 2
    for t in (1, 2):
        it = out / f"iter-{t}"
        for name in ("samples.jsonl", "pairs.jsonl", "eval.jsonl", "results.json", "model/model.safetensors"):
            assert (it / name).is_file(), name
        result = json.loads((it / "results.json").read_text())
        for key in ("win_rate_vs_base", "win_rate_vs_previous", "lc_win_rate_vs_base", "gold", "length",
                    "kl_to_base", "pairs"):
            assert key in result, key
        assert set(result["time_s"]) >= {"sample", "reference", "score", "train", "eval"}
        sample = json.loads((it / "samples.jsonl").read_text().splitlines()[0])
        assert len(sample["completions"]) == 3 and len(sample["p_hat"]) == 3
    assert (out / "plots" / "iterations.png").stat().st_size > 0 and not (out / "checkpoints").exists()
    # iteration 2 trains from π_1: its reference log-probs are π_1's, not π_0's, so the policy moved
    rows, _ = _numbers(out)
    assert {r["iteration"] for r in rows} == {1, 2} and all(r["loss"] >= 0 for r in rows)
    # the reference log-probs stored at sampling equal a fresh teacher-forced forward of π_t
    for t, model_dir in ((1, tiny_model_dir), (2, out / "iter-1" / "model")):
        chunk = torch.load(out / f"iter-{t}" / "samples" / "chunk-00000.pt", weights_only=True)
        policy, tok = models.load_causal_lm(str(model_dir), device="cpu")
        r = chunk[0]
        batch = rollout.pack([r["prompt_ids"]] * 3, r["completion_ids"], tok.pad_token_id)
        fresh = stages.sequence_logprobs(policy.eval(), batch, 8)
        assert torch.allclose(fresh, torch.tensor(r["ref_logp"], dtype=torch.float64), atol=1e-4), (t, fresh)


def _stop_when(monkeypatch, target, condition):
    """Raise KeyboardInterrupt (a Ctrl-C; kill -9 is the slow test) the first time `condition(*args)` holds
    when `target` (module, name) is called."""
    module, name = target
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if condition(*args, **kwargs):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("where", ["training", pytest.param("sampling", marks=pytest.mark.slow),
                                   pytest.param("scoring", marks=pytest.mark.slow)])
def test_a_stopped_run_resumes_to_the_uninterrupted_numbers(where, uninterrupted: Path, tmp_path: Path, monkeypatch):
    from alignkit.trainers.sppo import loop as sppo_loop

    out = tmp_path / "run"
    if where == "training":  # the 2nd optimiser step of iteration 2 (checkpoints every step)
        _stop_when(monkeypatch, (sppo_loop, "_train_step"), lambda *a, **kw: a[3] == 1 and a[4] == 1)  # s, t
    elif where == "sampling":  # iteration 2's second chunk
        _stop_when(monkeypatch, (rollout, "sample"),
                   lambda *a, **kw: (out.with_suffix(".partial") / "iter-2" / "samples" / "chunk-00000.pt").is_file())
    else:
        _stop_when(monkeypatch, (stages, "score"), lambda *a, **kw: "iter-2" in str(a[2]))
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(out))
    before = _digest(out.with_suffix(".partial") / "iter-1")
    monkeypatch.undo()
    cfg = _cfg(out)
    cfg.output.resume = True
    run(cfg)
    assert _digest(out / "iter-1") == before  # the finished iteration was not redone
    assert _numbers(out) == _numbers(uninterrupted)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, words", [
    (["--k", "1"], ["k", "2 or more"]),
    (["--iterations", "0"], ["iterations", "1 or more"]),
    (["--eta", "0"], ["eta", "> 0"]),
    (["--eta", "-5"], ["eta", "> 0"]),
    (["--select", "all", "--loss", "dpo"], ["select", "sppo"]),
    (["--max-samples", "10", "--eval-prompts", "8", "--iterations", "3"], ["2 training prompts", "T=3"]),
    (["--preference", "/no/such/rm"], ["/no/such/rm"]),
    (["--preference", "oracle:abc"], ["oracle"]),
])
def test_bad_input_is_one_line(argv, words, tmp_path: Path, monkeypatch, capsys):
    code, _, err = run_cli(["sppo", "--model", "tiny", "--device", "cpu", "-o", str(tmp_path / "run"), *argv],
                           monkeypatch, capsys)
    one_line_error(code, err, *words)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_pairrm_without_its_extra_is_one_line(tmp_path: Path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_blender" else real(name, *a))
    code, _, err = run_cli(["sppo", "--model", "tiny", "--device", "cpu", "--preference", "pairrm",
                            "-o", str(tmp_path / "run")], monkeypatch, capsys)
    one_line_error(code, err, "alignkit[pairrm]")


def test_repeated_prompts_are_dropped_with_a_warning(tmp_path: Path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i % 6}"}) + "\n" for i in range(12)))
    _stop_when(monkeypatch, (Loop, "open"), lambda *a, **kw: True)  # stop once the checks have passed
    with pytest.raises(KeyboardInterrupt):
        run(SPPOConfig(model={"name": "tiny", "device": "cpu"}, data={"source": str(prompts)},
                       sppo={"iterations": 2, "eval_prompts": 2}, output={"dir": str(tmp_path / "run")}))
    assert "6 repeated prompt(s) dropped" in capsys.readouterr().err


def test_dry_run_prints_the_plan_for_mistral_7b(monkeypatch, capsys):
    code, out, _ = run_cli(["sppo", "--base", "mistral-7b", "--dry-run"], monkeypatch, capsys)
    assert code == 0
    text = " ".join(out.split())
    for words in ("mistralai/Mistral-7B-Instruct-v0.2", "T = 3", "K = 5", "pair judgements", "downloads",
                  "GB per GPU", "completions"):
        assert words in text, words


# ------------------------------------------------------------------------------ processes
@pytest.mark.slow  # a 2-process launch
def test_two_process_run_samples_disjoint_shards(tmp_path: Path, tiny_model_dir, alignkit_cache):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "alignkit.cli", "sppo", "--model", "tiny", "--device", "cpu", "--iterations", "2",
           "--k", "2", "--max-new-tokens", "6", "--max-samples", "40", "--eval-prompts", "4", "--lr", "1e-3",
           "--batch-size", "4", "-o", str(out), "--num-processes", "2"]
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loop"]["world_size"] == 2 and summary["iterations"] == 2
    for t in (1, 2):  # every prompt of the iteration sampled once: the two shards are disjoint and complete
        rows = [json.loads(line) for line in (out / f"iter-{t}" / "samples.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows]
        assert len(prompts) == len(set(prompts)) == summary["per_iteration"][t - 1]["prompts"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


@pytest.mark.slow  # kill -9 of a real process, twice
def test_kill_9_while_training_then_resume_matches(uninterrupted: Path, tmp_path: Path, alignkit_cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_sppo import _cfg; "
            "from alignkit.trainers.sppo import run; cfg = _cfg(Path(sys.argv[1])); "
            "cfg.output.resume = sys.argv[2] == '1'; run(cfg)")
    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), "0"], env=env, cwd=Path(__file__).parent.parent)
    ckpt = out.with_suffix(".partial") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # stop inside iteration 2's training
        if (out.with_suffix(".partial") / "iter-2" / "preference.pt").is_file() and ckpt.is_dir() and any(
                (c / "COMPLETE").is_file() for c in ckpt.iterdir() if c.name.startswith("step-")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (a fast machine)")
    assert proc.returncode == -signal.SIGKILL
    subprocess.run([sys.executable, "-c", code, str(out), "1"], env=env, check=True, cwd=Path(__file__).parent.parent)
    assert _numbers(out) == _numbers(uninterrupted)


@pytest.mark.slow  # two 2-process launches
def test_fsdp_sharded_run_computes_what_ddp_computes(tmp_path: Path, tiny_model_dir, alignkit_cache):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ALIGNKIT_CACHE": str(alignkit_cache), "OMP_NUM_THREADS": "1"}
    runs = {}
    for config in ("ddp", "fsdp"):
        out = tmp_path / config
        cmd = [sys.executable, "-m", "alignkit.cli", "sppo", "--model", "tiny", "--device", "cpu", "--iterations", "2",
               "--k", "2", "--max-new-tokens", "6", "--max-samples", "40", "--eval-prompts", "4", "--lr", "1e-3",
               "--batch-size", "4", "-o", str(out), "--num-processes", "2",
               "--set", f"launch.accelerate_config={config}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[config] = _numbers(out)
    (rows_a, its_a), (rows_b, its_b) = runs["ddp"], runs["fsdp"]
    for a, b in zip(rows_a + its_a, rows_b + its_b, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert value == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_the_sppo_tiny_recipe_runs_shortened(tmp_path: Path, tiny_model_dir, monkeypatch, capsys):
    code, _, err = run_cli(["run", "sppo-tiny", "sppo.iterations=1", "data.max_samples=24", "sppo.eval_prompts=4",
                            "sppo.max_new_tokens=6", "sppo.k=2", f"output.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["command"] == "sppo" and summary["iterations"] == 1 and (tmp_path / "run" / "iter-1").is_dir()
