"""`alignkit bench grpo-trl`: both sides run the same job (prompts per step, reward, settings), the curve
statistics are right by hand, and a short run reports every figure."""

from __future__ import annotations

import inspect
import json
import math

import pytest
from helpers import one_line_error, run_cli

from alignkit.bench import grpo_trl


def test_curve_stats_by_hand():
    s = grpo_trl.curve_stats([0, 1, 2, 3, 4, 5, 6, 7])  # quarters of 2 steps, a half of 4
    assert s == {"first_quarter": 0.5, "last_quarter": 6.5, "gain": 6.0, "last_half": 5.5}
    assert grpo_trl.curve_stats([3.0, 5.0]) == {"first_quarter": 3.0, "last_quarter": 5.0, "gain": 2.0,
                                                "last_half": 5.0}


def test_compare_curves_agreement_and_difference():
    a = [[0.0, 0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.6], [0.1, 0.0, 0.2, 0.4, 0.3, 0.6, 0.5, 0.8]]
    same = grpo_trl.compare_curves(a, a)
    assert same["agree"] and same["last_half"]["diff"] == 0 and same["paired_by_step"]["mean_diff"] == 0
    # a constant offset of +1: the level differs (last half, paired), the gain does not
    up = grpo_trl.compare_curves([[x + 1 for x in c] for c in a], a)
    assert up["last_half"]["diff"] == pytest.approx(1.0) and not up["last_half"]["agree"]
    assert up["paired_by_step"]["mean_diff"] == pytest.approx(1.0) and not up["paired_by_step"]["agree"]
    assert up["gain"]["diff"] == pytest.approx(0.0) and up["gain"]["agree"]
    assert not up["agree"]
    # one seed: the SE comes from the spread inside the windows (last half 0.5, 0.4, 0.7, 0.6)
    one = grpo_trl.compare_curves(a[:1], a[:1])
    assert one["last_half"]["alignkit_se"] == pytest.approx(0.1290994 / 2)
    with pytest.raises(ValueError):
        grpo_trl.compare_curves(a, a[:1])


def test_trl_gold_reward_reads_finished_from_the_ids():
    from alignkit import rewards

    eos = 2
    fn = grpo_trl.trl_gold_reward([eos])
    completions = ["the cat sat on the mat.", "the cat sat on the mat."]
    got = fn(prompts=["p", "p"], completions=completions, completion_ids=[[5, 6, eos], [5, 6, 7]], trainer_state=None)
    want = rewards.load_scorer("gold").score(["p", "p"], completions, [True, False]).mean.tolist()
    assert got == pytest.approx(want)
    assert got[0] != got[1]  # finished matters to the gold reward, so it must be read from the ids


def test_the_two_configs_describe_the_same_job(tmp_path):
    import torch

    n, k, T, lr = 3, 4, 16, 5e-4
    ours = grpo_trl.alignkit_config("tiny", tmp_path / "a", 7, n, k, T, lr, seed=5)
    trl = grpo_trl.trl_config(tmp_path / "t", 7, n, k, T, lr, seed=5)
    p = ours.ppo
    assert (p.advantage, p.k, p.prompts_per_iteration, p.iterations) == ("grpo", k, n, 7)
    assert (p.ppo_epochs, p.minibatch_size, p.whiten_advantages, p.kl_mode, p.kl_coef) == (1, n * k, False,
                                                                                          "reward", 0.0)
    # one generation batch of n prompts × k = one optimiser step, on the same prompts
    assert (trl.generation_batch_size, trl.steps_per_generation, trl.num_iterations) == (n * k, 1, 1)
    assert (trl.gradient_accumulation_steps, trl.num_generations, trl.max_steps) == (1, k, 7)
    assert (trl.beta, trl.loss_type, trl.scale_rewards, trl.shuffle_dataset) == (0.0, "dapo", "group", False)
    assert (trl.max_completion_length, trl.temperature, trl.top_k, trl.top_p) == (T, p.temperature, 0, 1.0)
    assert (trl.learning_rate, trl.lr_scheduler_type, trl.warmup_steps) == (ours.train.learning_rate, "constant", 0)
    assert trl.max_grad_norm == ours.train.max_grad_norm and trl.epsilon == p.clip_eps and trl.seed == 5
    assert trl.bf16 is False and trl.gradient_checkpointing is False
    # ours builds torch.optim.AdamW with its defaults: TRL's weight decay must be that default
    assert trl.weight_decay == inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    assert trl.optim == "adamw_torch"


def test_trl_trains_on_our_prompts_at_every_step(tmp_path):
    """TRL's own dataloader yields, at step t, the prompts `alignkit ppo` samples at iteration t, each k times."""
    from alignkit import data, models
    from alignkit.online.rollout import prompt_indices
    from alignkit.trainers.ppo import PPODataSection

    pool = list(data.load_source(PPODataSection(), expected=("prompts",))[0]["prompt"])
    steps, n, k, seed = 3, 4, 2, 7
    trainer = grpo_trl.trl_trainer(models.build_tiny(), pool, tmp_path / "t", steps, n, k, 8, 1e-3, seed)
    batches = [[row["prompt"] for row in b] for b, _ in zip(trainer.get_train_dataloader(), range(steps), strict=False)]
    want = [[pool[i] for i in prompt_indices(len(pool), it, n, seed) for _ in range(k)] for it in range(steps)]
    assert batches == want
    assert len({p for b in want for p in b}) > n  # the steps do get different prompts
    # and TRL tokenises them into the ids `alignkit ppo` samples from (BOS included)
    from alignkit import generation

    assert trainer._tokenize_prompts(want[0])[0] == generation.prompt_ids(trainer.processing_class, want[0])


def test_same_batch_gives_trl_and_us_the_same_advantages_and_gradient(tmp_path):
    """On one batch TRL sampled and scored, TRL's advantages are `rl_losses.grpo_advantages` of its rewards and
    its loss (loss_type dapo, beta 0) has the gradient of `rl_losses.policy_loss` on the same ids: the two runs
    optimise the same objective, so their curves can differ only by sampling noise."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit import data, models
    from alignkit import rl_losses as rl
    from alignkit.online import rollout
    from alignkit.trainers.ppo import PPODataSection

    pool = list(data.load_source(PPODataSection(), expected=("prompts",))[0]["prompt"])
    n, k = 3, 4
    trainer = grpo_trl.trl_trainer(models.build_tiny(), pool, tmp_path / "t", 1, n, k, 12, 1e-3, 0)
    theirs = trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in grpo_trl.step_prompts(pool, 1, n, 0)[0]
                                                   for _ in range(k)])
    gold = torch.tensor(list(trainer._logs["rewards"]["gold"]))
    assert torch.allclose(out["advantages"], rl.grpo_advantages(gold, k), atol=1e-6)
    assert out["advantages"].abs().max() > 0.1
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop
    trainer._compute_loss(theirs, out).backward()

    ours = AutoModelForCausalLM.from_pretrained(models.build_tiny(), dtype=torch.float32).eval()
    mask = out["completion_mask"].float()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    batch = rollout.Batch(prompts=[""] * len(ids), completions=[""] * len(ids),
                          finished=torch.zeros(len(ids), dtype=torch.bool), lengths=mask.sum(1).long(),
                          input_ids=ids, attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], 1),
                          mask=mask, prompt_len=out["prompt_ids"].shape[1])
    lp = rollout.token_logprobs(rollout.completion_logits(ours, batch), batch)
    loss, _ = rl.policy_loss(lp, lp.detach(), out["advantages"][:, None] * mask, mask)
    loss.backward()
    scale = max(p.grad.abs().max().item() for p in ours.parameters())
    assert scale > 0
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5 * scale, rtol=1e-4), name


def test_bad_flags_are_one_line(monkeypatch, capsys):
    code, _, err = run_cli(["bench", "grpo-trl", "--lr", "0"], monkeypatch, capsys)
    one_line_error(code, err, "--lr")
    code, _, err = run_cli(["bench", "grpo-trl", "--seed", "-1"], monkeypatch, capsys)
    one_line_error(code, err, "--seed")


@pytest.mark.slow
def test_grpo_trl_bench_short_run(tmp_path, monkeypatch, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    code, stdout, err = run_cli(["bench", "grpo-trl", "--steps", "2", "--prompts", "2", "--k", "2",
                                 "--max-new-tokens", "8", "--seed", "0", "--seed", "1", "--json", str(out),
                                 "--plot", str(plot)], monkeypatch, capsys)
    assert code == 0, err
    assert "ratio alignkit/TRL" in stdout and plot.stat().st_size > 0
    r = json.loads(out.read_text())
    for side in ("alignkit", "trl"):
        assert [run["seed"] for run in r[side]["runs"]] == [0, 1]
        assert all(run["steps"] == 2 and len(run["rewards"]) == 2 and run["wall_s"] > 0 for run in r[side]["runs"])
        assert len(r["reward_curves"][side]) == 2 and all(len(c) == 2 for c in r["reward_curves"][side])
        assert all(math.isfinite(x) for c in r["reward_curves"][side] for x in c)
    assert [run["order"] for run in r["alignkit"]["runs"]] == [0, 1]  # alternating: alignkit first, then second
    assert r["ratio_wall"] > 0 and len(r["pair_ratios_wall"]) == 2
    assert {"last_half", "gain", "paired_by_step", "agree"} <= set(r["curves"])
