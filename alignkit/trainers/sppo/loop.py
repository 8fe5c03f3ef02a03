"""Iterative SPPO (Wu et al. 2024, Algorithm 1), and iterative DPO / IPO on the same loop: for t = 1..T,
sample K completions per prompt from π_t → judge all K×K pairs → P̂ → train π_{t+1} from π_t → evaluate.

Read top to bottom: setup, then per iteration the four stages (alignkit.trainers.sppo.stages writes their
files into DIR/iter-t), a training loop over the kept pairs, the evaluation and a checkpoint. The reference
of iteration t is π_t itself: its log-probs are computed once, right after sampling, so training holds
one model. docs/algorithms/sppo.md explains the choices.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from alignkit.trainers.sppo.config import SPPOConfig


def split_prompts(n: int, iterations: int, eval_prompts: int, split: bool,
                  seed: int) -> tuple[list[int], list[list[int]]]:
    """(evaluation indices, one index list per iteration) over a pool of n prompts: one seeded permutation,
    its first `eval_prompts` held out, the rest cut into T disjoint near-equal parts (or all of it, T
    times, with `split` False)."""
    import numpy as np

    order = np.random.default_rng([seed, 1]).permutation(n).tolist()
    held, rest = order[:eval_prompts], order[eval_prompts:]
    if not split:
        return held, [rest] * iterations
    return held, [part.tolist() for part in np.array_split(np.array(rest, dtype=np.int64), iterations)]


def unique_prompts(prompts: list[Any]) -> tuple[list[Any], int]:
    """The prompts without repeats (first kept) and how many repeats were dropped."""
    seen, out = set(), []
    for prompt in prompts:
        key = json.dumps(prompt, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out, len(prompts) - len(out)


def run(cfg: SPPOConfig, progress: Any | None = None) -> dict[str, Any]:
    """Train; returns the summary (also written to summary.json)."""
    import torch

    from alignkit import data, generation, models, rewards
    from alignkit.config import to_yaml
    from alignkit.errors import UserError
    from alignkit.online import ranks, rollout, selfplay
    from alignkit.trainers import _hf
    from alignkit.trainers.loop import Loop, Trainable
    from alignkit.trainers.sppo import stages

    p, tr = cfg.sppo, cfg.train
    out, is_main = _hf.begin(cfg)
    rank, world, device = ranks.start_ranks(cfg.model.device)

    # -- setup: every check that can fail cheaply comes before the run directory is opened ----------
    rewards.check_preference_spec(p.preference)
    ds, _ = data.load_source(cfg.data, expected=("prompts",))
    pool, repeats = unique_prompts(list(ds["prompt"]))
    if repeats and is_main:  # a repeat would be sampled twice per iteration, or land in training and evaluation
        print(f"warning: {cfg.data.source}: {repeats} repeated prompt(s) dropped (each prompt is used once)",
              file=sys.stderr)
    if p.eval_prompts >= len(pool):
        raise UserError(f"{cfg.data.source}: {len(pool)} distinct prompts, but sppo.eval_prompts={p.eval_prompts} "
                        "are held out: lower it or give more prompts")
    n_train = len(pool) - p.eval_prompts
    if p.split_prompts and n_train < p.iterations:
        raise UserError(f"{cfg.data.source}: {n_train} training prompts cannot be split into T={p.iterations} parts: "
                        "give more prompts, lower sppo.iterations, or set sppo.split_prompts=false")
    if p.split_prompts and n_train // p.iterations < world:
        raise UserError(f"{n_train // p.iterations} prompts per iteration for {world} processes: give more prompts")
    held, parts = split_prompts(len(pool), p.iterations, p.eval_prompts, p.split_prompts, tr.seed)
    preference = rewards.load_preference(p.preference, device=device)
    gold = rewards.load_scorer("gold") if cfg.data.source == "builtin:prompts" else None

    policy, tokenizer, load, lora = rollout.load_policy(cfg.model, device, tr.seed)
    chat = generation.chat_mode(p.chat, cfg.data.source)
    generation.check_chat(tokenizer, chat)
    policy.eval()  # dropout off (as TRL's DPO): the log-ratio is exactly 0 before the first step of an iteration
    trainable, total = models.trainable_parameters(policy)
    names = [name for name, q in policy.named_parameters() if q.requires_grad]
    # fsdp / zero2 / zero3 on N ranks: FSDP2 shards the policy; every rank then takes part in every forward
    # (the evaluation too), and parameters are looked up after sharding (it replaces them)
    sharding = ranks.sharding(cfg.launch.accelerate_config, world)
    if sharding:
        ranks.shard(policy, sharding)
    named = dict(policy.named_parameters())
    params = {name: named[name] for name in names}
    evaluates = is_main or sharding is not None  # the ranks that run the evaluation's forwards
    beta = 1.0 / p.eta if p.loss == "sppo" else p.beta
    sample_kw = dict(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                     batch_size=p.sample_batch_size, minibatch=tr.micro_batch_size, chat=chat)

    def base_logp(batches: list[Any]) -> list[torch.Tensor]:
        """log π_0 of the batches' completions: the adapter disabled with LoRA, else the starting weights
        loaded once for the purpose (the trained policy stays in memory) and freed after."""
        if lora is not None:
            with policy.disable_adapter():
                return [stages.sequence_logprobs(policy, b, tr.micro_batch_size) for b in batches]
        base = models.load_causal_lm(cfg.model.name, **load)[0].eval()
        try:
            return [stages.sequence_logprobs(base, b, tr.micro_batch_size) for b in batches]
        finally:
            del base

    loop = Loop.open(out, overwrite=cfg.output.overwrite, resume=cfg.output.resume, config_yaml=to_yaml(cfg),
                     total=sum(_steps(len(part), tr.batch_size, tr.epochs) for part in parts), desc="sppo",
                     unit="step", progress=progress is None)
    ranks.barrier(world)  # the main rank has prepared DIR.partial before any rank reads from it
    loop.sharded = sharding is not None  # every rank checkpoints its own shards
    run_dir = loop.run
    results: list[dict[str, Any]] = []
    with loop:
        # -- where a resumed run stands: the checkpoint says the iteration and the step inside it -----
        peek = loop.peek()
        start = peek["stats"]["iteration"] if peek else 0
        if peek and peek["stats"]["iteration_step"] == 0:  # stopped between iterations: π_start is all it needs
            loop.restore({"policy": Trainable(params)})
        for t in range(start):
            results.append(json.loads(run_dir.path(f"iter-{t + 1}", "results.json").read_text()))
        # -- π_0 on the evaluation prompts, once --------------------------------------------------
        eval_prompts = [pool[i] for i in held]
        base_eval = previous_eval = None
        base_figures: dict[str, float] = {}
        if eval_prompts:
            path = run_dir.path("eval-0.jsonl")
            with loop.timer("eval"):
                base_eval = (stages.eval_samples(
                    policy if start == 0 or path.is_file() else _fresh(cfg, load), tokenizer, eval_prompts, path,
                    base_logp=lambda bs: [torch.zeros(len(b)) for b in bs], seed=tr.seed, write=is_main,
                    **_eval_kw(sample_kw)) if evaluates else None)
            previous_eval = base_eval
            if is_main:  # π_0's own figures, the 0th point of every per-iteration curve
                base_figures = {"win_rate_vs_base": 0.5, "lc_win_rate_vs_base": 0.5, "kl_to_base": 0.0,
                                "length": sum(r["n_tokens"] for r in base_eval) / len(base_eval)}
                if gold is not None:
                    base_figures["gold"] = float(gold.score([r["prompt"] for r in base_eval],
                                                            [r["completion"] for r in base_eval],
                                                            [r["finished"] for r in base_eval]).mean.mean())
            if start > 0 and is_main:
                previous_eval = [json.loads(line) for line in
                                 run_dir.path(f"iter-{start}", "eval.jsonl").read_text().splitlines()]

        for t in range(start, p.iterations):
            where = run_dir.path(f"iter-{t + 1}")
            times_before = dict(loop.times)
            prompts = [pool[i] for i in parts[t]]
            # -- 1. sample K completions per prompt from π_t, and log π_t of each (the reference) ------
            records = stages.sample_chunks(
                policy, tokenizer, prompts, where / "samples", k=p.k, seed=tr.seed * 1_000_003 + (t + 1) * 10_007,
                chunk_prompts=p.chunk_prompts, world=world, rank=rank, is_main=is_main, loop=loop,
                on_chunk=lambda c, n, t=t: loop.note(f"iteration {t + 1}: sampled chunk {c}/{n}"), **sample_kw)
            # -- 2. judge all K×K pairs; P̂(y_i ≻ π_t) = row mean, self included -----------------------
            with loop.timer("score"):
                matrix = stages.score(preference, records, where / "preference.pt", world=world, rank=rank,
                                      is_main=is_main)
            p_hat = selfplay.p_hat(matrix)
            winner, loser, kept = selfplay.winner_loser(p_hat)
            if is_main and not (where / "pairs.jsonl").is_file():
                stages.write_samples(where, records, p_hat, winner, loser, kept)
            examples = _examples(records, p_hat, winner, loser, kept, p.select)
            # -- 3. train π_{t+1} from π_t on the kept pairs ------------------------------------------
            n_steps = _steps(len(examples), tr.batch_size, tr.epochs)
            opt = _optimizer(tr, list(params.values()))
            sched = _scheduler(tr, opt, n_steps)
            objects = {"policy": Trainable(params), "optimizer": opt, "scheduler": sched}
            first = 0
            if peek and t == start and peek["stats"]["iteration_step"] > 0:  # stopped inside this iteration's training
                loop.restore(objects)
                first = loop.stats["iteration_step"]
            loop.set_total(loop.step - first + n_steps + sum(_steps(len(part), tr.batch_size, tr.epochs)
                                                             for part in parts[t + 1 :]))
            with loop.timer("train"):
                for s in range(first, n_steps):
                    row = _train_step(policy, tokenizer, examples, s, t, p, tr, beta, world, rank, opt, sched, loop)
                    loop.advance(f"iteration {t + 1}/{p.iterations} loss {row['loss']:.4g}")
                    loop.log({"iteration": t + 1, **row})
                    if tr.save_steps and loop.step % tr.save_steps == 0 and s + 1 < n_steps:
                        loop.stats = {"iteration": t, "iteration_step": s + 1}
                        loop.save(objects)
            loop.guard(None, policy)
            # -- 4. save π_{t+1}, evaluate it, checkpoint --------------------------------------------
            figures: dict[str, Any] = {}
            full = ranks.full_state_dict(policy) if sharding else None  # a collective: every rank takes part
            if is_main:
                _save_model(policy, tokenizer, where / "model", full)
            if eval_prompts and evaluates:
                with loop.timer("eval"):
                    new_eval = stages.eval_samples(policy, tokenizer, eval_prompts, where / "eval.jsonl",
                                                   base_logp=base_logp, seed=tr.seed, write=is_main,
                                                   **_eval_kw(sample_kw))
                    if is_main:
                        figures = stages.win_rates(preference, gold, new_eval, base_eval, previous_eval)
                previous_eval = new_eval
            result = {"iteration": t + 1, "prompts": len(records), "pairs": int(kept.sum()),
                      "dropped_ties": int((~kept).sum()), "steps": n_steps, **figures,
                      "mean_p_hat_winner": float(p_hat.gather(1, winner[:, None]).mean()),
                      "mean_p_hat_loser": float(p_hat.gather(1, loser[:, None]).mean()),
                      "time_s": {k: v - times_before.get(k, 0.0) for k, v in loop.times.items()}}
            if is_main:
                from alignkit.runs import atomic_write_text, strict_json

                atomic_write_text(where / "results.json", strict_json(result) + "\n")
            results.append(result)
            loop.stats = {"iteration": t + 1, "iteration_step": 0}
            loop.save({"policy": Trainable(params)})
            ranks.barrier(world)

    # -- the run's summary and plot ----------------------------------------------------------------
    if is_main:
        import shutil

        _plot(results, run_dir.path("plots", "iterations.png"), f"{p.loss} {cfg.model.name}")
        shutil.rmtree(run_dir.path("checkpoints"), ignore_errors=True)
    last = results[-1] if results else {}
    summary = {
        "command": "sppo", "model": cfg.model.name, "loss": p.loss, "preference": p.preference,
        "iterations": len(results), "k": p.k, **({"eta": p.eta} if p.loss == "sppo" else {"beta": p.beta}),
        "select": p.select, "lora": lora is not None, "trainable_params": trainable, "total_params": total,
        "repeated_prompts_dropped": repeats, "eval_prompts": len(held),
        "last_win_rate_vs_base": last.get("win_rate_vs_base"),
        "last_lc_win_rate_vs_base": last.get("lc_win_rate_vs_base"),
        "base": base_figures, "per_iteration": results, "model_dir": str(Path(out) / f"iter-{len(results)}" / "model"),
    }
    final = loop.finish(summary, readme=_readme(cfg, summary) if is_main else None)
    summary["output_dir"] = str(final)
    return summary


# ------------------------------------------------------------------------------ training
def _steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_examples / batch_size) * epochs


def _examples(records: list[dict[str, Any]], p_hat: Any, winner: Any, loser: Any, kept: Any,
              select: str) -> list[dict[str, Any]]:
    """What training reads: per kept prompt a winner/loser pair, or (select all) one example per sample."""
    out = []
    for n, r in enumerate(records):
        if select == "all":
            out += [{"prompt_ids": r["prompt_ids"], "ids": [r["completion_ids"][i]], "ref": [r["ref_logp"][i]],
                     "p_hat": [float(p_hat[n, i])]} for i in range(len(r["completions"]))]
        elif kept[n]:
            w, lo = int(winner[n]), int(loser[n])
            out.append({"prompt_ids": r["prompt_ids"], "ids": [r["completion_ids"][w], r["completion_ids"][lo]],
                        "ref": [r["ref_logp"][w], r["ref_logp"][lo]],
                        "p_hat": [float(p_hat[n, w]), float(p_hat[n, lo])]})
    return out


def _train_step(policy: Any, tokenizer: Any, examples: list[dict[str, Any]], s: int, t: int, p: Any, tr: Any,
                beta: float, world: int, rank: int, opt: Any, sched: Any, loop: Any) -> dict[str, float]:
    """Optimiser step `s` of iteration t: the global batch's examples (in a seeded order per epoch), this
    rank's share of them in micro-batches, gradients averaged over ranks, clipped, one step."""
    import torch

    from alignkit import losses
    from alignkit.online import ranks, rollout

    per_epoch = math.ceil(len(examples) / tr.batch_size)
    epoch, j = divmod(s, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(tr.seed * 7919 + t * 101 + epoch))
    batch_idx = order[j * tr.batch_size : (j + 1) * tr.batch_size].tolist()
    usable = len(batch_idx) - len(batch_idx) % world or len(batch_idx)  # every rank takes an equal share
    mine = batch_idx[:usable][rank::world]
    # a rank without rows (a last batch smaller than the ranks) still runs one forward and backward, weighted
    # 0: a sharded model's backward is a collective every rank joins
    weight = 1.0 if mine else 0.0
    mine = mine or batch_idx[:1]
    opt.zero_grad(set_to_none=True)
    # every rank logs the same keys (a rank may hold no rows of a small last batch): sums over its rows,
    # scaled so that the mean over ranks is the mean over the global batch
    names = ("loss", "logratio") if p.select == "all" else ("loss", "logratio_winner", "logratio_loser")
    stats: dict[str, float] = dict.fromkeys(names, 0.0)
    for lo in range(0, len(mine), tr.micro_batch_size):
        micro = [examples[i] for i in mine[lo : lo + tr.micro_batch_size]]
        per = len(micro[0]["ids"])  # 2: winner, loser; 1: one sample
        batch = rollout.pack([e["prompt_ids"] for e in micro for _ in range(per)],
                             [ids for e in micro for ids in e["ids"]], tokenizer.pad_token_id)
        logp = rollout.token_logprobs(rollout.completion_logits(policy, batch), batch).sum(-1).double()
        ref = torch.tensor([r for e in micro for r in e["ref"]], dtype=torch.float64, device=logp.device)
        target = torch.tensor([q for e in micro for q in e["p_hat"]], dtype=torch.float64, device=logp.device)
        if per == 1:
            loss = losses.sppo_sample_loss(logp - ref, target, beta)
        elif p.loss == "sppo":
            loss = losses.sppo_self_play_loss(logp[0::2] - ref[0::2], logp[1::2] - ref[1::2], target[0::2],
                                              target[1::2], beta)
        else:
            fn = losses.dpo_loss if p.loss == "dpo" else losses.ipo_loss
            loss = fn(logp[0::2], logp[1::2], ref[0::2], ref[1::2], beta)
        loop.guard(loss)
        (loss * weight * len(micro) * world / usable).backward()  # the global batch's mean, after the rank average
        lr = (logp - ref).detach()
        for key, value in (("loss", loss.item()), *((("logratio_winner", float(lr[0::2].mean())),
                                                       ("logratio_loser", float(lr[1::2].mean()))) if per == 2
                                                     else (("logratio", float(lr.mean())),))):
            stats[key] += value * weight * len(micro) * world / usable
    ranks.average_gradients(list(q for group in opt.param_groups for q in group["params"]), world)
    grad_norm = ranks.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], tr.max_grad_norm)
    lr_now = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    return ranks.mean_over_ranks({**stats, "grad_norm": float(grad_norm), "learning_rate": lr_now,
                                  "examples": float(usable)}, world)


def _optimizer(tr: Any, params: list[Any]) -> Any:
    import torch

    if tr.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=tr.learning_rate)
    return torch.optim.AdamW(params, lr=tr.learning_rate)


def _scheduler(tr: Any, opt: Any, n_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(tr.warmup_ratio * n_steps)
    name = "linear" if tr.lr_scheduler == "linear" else "constant_with_warmup"
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=max(1, n_steps))


# ------------------------------------------------------------------------------ files
def _eval_kw(sample_kw: dict[str, Any]) -> dict[str, Any]:
    return {k: sample_kw[k] for k in ("max_new_tokens", "temperature", "top_p", "batch_size", "minibatch", "chat")}


def _fresh(cfg: SPPOConfig, load: dict[str, Any]) -> Any:
    """π_0 again (a resumed run's policy is no longer it): only used when eval-0.jsonl is missing."""
    from alignkit import models

    return models.load_causal_lm(cfg.model.name, **load)[0].eval()


def _save_model(policy: Any, tokenizer: Any, where: Path, full: dict[str, Any] | None) -> None:
    """π_{t+1} as safetensors (the adapter with LoRA), written beside and renamed into place; `full`: the
    gathered state dict of a sharded policy."""
    import os
    import shutil

    tmp = where.with_name(f".{where.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": full} if full is not None else {}))
    tokenizer.save_pretrained(str(tmp))
    if where.exists():
        shutil.rmtree(where)
    os.replace(tmp, where)


def _plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per iteration: win rates (vs π_0, vs π_{t−1}, length-controlled), gold, length and KL to π_0."""
    from alignkit.runs import pyplot, save_figure

    if not results or "win_rate_vs_base" not in results[0]:
        return
    its = [r["iteration"] for r in results]
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.2))
    for key, label in (("win_rate_vs_base", "vs π_0"), ("win_rate_vs_previous", "vs π_{t−1}"),
                       ("lc_win_rate_vs_base", "LC vs π_0")):
        axes[0].plot(its, [r[key] for r in results], marker="o", label=label)
    axes[0].axhline(0.5, color="grey", lw=0.5)
    axes[0].set_title("win rate")
    axes[0].legend()
    for key, ax in (("gold", axes[1]), ("length", axes[2])):
        if key in results[0]:
            ax.plot(its, [r[key] for r in results], marker="o", label=key)
    ax2 = axes[2].twinx()
    ax2.plot(its, [r["kl_to_base"] for r in results], marker="s", color="C3", label="KL to π_0")
    axes[1].set_title("gold reward")
    axes[2].set_title("length (tokens) and KL to π_0 (red)")
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.suptitle(title)
    save_figure(fig, path)


def _readme(cfg: SPPOConfig, summary: dict[str, Any]) -> str:
    from alignkit.runs import run_readme

    p = cfg.sppo
    return run_readme(
        f"{p.loss.upper()} self-play run",
        f"Policy: `{cfg.model.name}`; prompts: `{cfg.data.source}`; preference: `{p.preference}`; T={p.iterations} "
        f"iterations of K={p.k} samples per prompt; loss {p.loss}.",
        "Per iteration: iter-t/samples.jsonl (K completions, P̂), pairs.jsonl, eval.jsonl, results.json and "
        "model/ (the policy after iteration t). Win rates per iteration: plots/iterations.png, summary.json.",
        f"The last policy: `{summary['model_dir']}` (`alignkit generate --model` / `alignkit eval` read it).",
    )


__all__ = ["run", "split_prompts", "unique_prompts"]
