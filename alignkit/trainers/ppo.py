"""PPO for RLHF, and UP-RLHF's uncertainty-penalised PPO: an explicit rollout → score → update loop.

Setup → for each iteration: rollout → score → advantages → `ppo_epochs` × minibatches update → log →
checkpoint, top to bottom, on `trainers.loop.Loop` (run directory, metrics, checkpoints that resume
bit-exactly). The maths are the pure functions of `alignkit.rl_losses`; the rollout and scoring stages are
`alignkit.online`. Equations and the choices below: docs/algorithms/ppo.md.

- Actor–critic PPO (Schulman et al. 2017): GAE(γ, λ) advantages (Schulman et al. 2016), whitened per
  rollout batch, the clipped surrogate and the clipped value loss, the critic a value head on its own
  copy of the policy. `advantage: rloo | grpo` swaps GAE for the critic-free estimators over the K
  samples of a prompt (no critic is built), broadcast to every token of the completion.
- `kl_mode: reward` is classic RLHF (InstructGPT): −kl_coef·(log π − log π_ref) on every token, the
  sequence reward at the last one; with `kl_target` the coefficient follows Ziegler et al.'s adaptive
  controller (its value resumes with the run). `kl_mode: loss` is UP-RLHF eq. 15: β1·E[(log π − log π_ref)²] (k2,
  a per-token mean) added to the policy loss, the reward left free of KL (eq. 16).
- UP-RLHF eq. 14: with an ensemble scorer the reward is r̄ − β2·(u − ū), ū the running mean of u over
  every sample seen so far (this batch included), checkpointed with the run.
- Deviations: the reference is the starting policy (π_SFT when `model.name` is an SFT run); old
  log-probs come from a teacher-forced forward, not from `generate` (alignkit.online.rollout); dropout
  is off in every model (as OpenRLHF), so that the ratio is exactly 1 before the first step; no reward
  whitening, no learning-rate schedule, no entropy bonus (entropy is logged).
- On N ranks (launch.num_processes; gloo on CPU / nccl on GPU) each rank samples its own disjoint
  shard of every iteration's prompts; gradients are averaged over ranks, ū is updated with every
  rank's u, the logged metrics are means over ranks, and advantages are whitened per rank.
  ZeRO / FSDP are refused with one line.
- Full fine-tuning keeps separate copies of policy, reference and critic. With LoRA (model.lora) the
  three share one frozen base: the reference is the base with the adapter disabled, the critic a second
  adapter on the same peft model plus the value head (`ppo.share_base: false` keeps separate copies).
  The weights train in the dtype they load in (model.dtype; auto is bf16 on a capable GPU, with no fp32
  master copy): set model.dtype=float32 for small learning rates on a GPU.
- Time split: `rollout` (sampling), `reference_value` (the teacher-forced forwards of the policy for π_old,
  the reference and the critic), `score`, `update`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from alignkit.config import CHAT_HELP, Block, ChatMode, DataSection, JobConfig


class PPODataSection(DataSection):
    source: str = Field("builtin:prompts", description="prompts: a file, dataset dir, hub id or builtin:prompts")


class PPOTrainSection(Block):
    """The optimiser and run bookkeeping. One step of the loop is one PPO iteration."""

    learning_rate: float = Field(1e-5, gt=0.0, description="policy learning rate (AdamW)")
    critic_learning_rate: float | None = Field(
        None, gt=0.0, description="critic learning rate (default: learning_rate); the critic has its own model and "
        "optimiser, so this, not a value-loss weight, sets how fast it learns")
    max_grad_norm: float = Field(1.0, gt=0.0, description="clip each model's gradient norm to this")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule over all optimiser steps of the run (both models)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of the optimiser steps spent warming up")
    save_steps: int = Field(10, ge=0, description="checkpoint every N iterations for --resume (0: none)")
    seed: int = Field(42, ge=0, description="seed of sampling, minibatch order and prompt order")


class PPOSection(Block):
    """PPO and UP-RLHF settings; defaults from TRL's former PPOConfig and the PPO/UP-RLHF papers."""

    reward: str = Field("gold", description="scorer: gold, an rm / rm-ensemble run dir, a reward-model dir, "
                        "module:function or mbpp:SOURCE (docs/rewards.md)")
    iterations: int = Field(100, ge=1, description="rollout → update iterations")
    prompts_per_iteration: int = Field(16, ge=1, description="prompts sampled per iteration (rollout batch)")
    k: int = Field(1, ge=1, description="completions per prompt (rloo and grpo need 2 or more)")
    advantage: Literal["gae", "rloo", "grpo"] = Field(
        "gae", description="gae (actor-critic), rloo (leave-one-out) or grpo (group-normalised) over the k samples")
    kl_mode: Literal["reward", "loss"] = Field(
        "reward", description="reward: −kl_coef·log(π/π_ref) per token in the reward; loss: β1·k2 KL loss "
        "(UP-RLHF eq. 15)")
    kl_coef: float = Field(0.05, ge=0.0, description="per-token KL penalty in the reward (kl_mode reward); the "
                           "starting value when kl_target is set")
    kl_target: float | None = Field(None, gt=0.0, description="adaptive KL controller (Ziegler et al. 2019): steer "
                                     "kl_coef towards this KL per sequence (none: kl_coef stays fixed)")
    kl_horizon: int = Field(10000, ge=1, description="the adaptive controller's horizon, in samples")
    beta1: float = Field(0.05, ge=0.0, description="weight of the k2 KL loss (kl_mode loss, UP-RLHF eq. 15)")
    beta2: float = Field(0.0, ge=0.0, description="uncertainty penalty r̄ − β2·(u − ū) (UP-RLHF eq. 14; needs "
                         "an ensemble reward)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount γ")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ")
    clip_eps: float = Field(0.2, gt=0.0, description="PPO ratio clip ε")
    vf_clip: float = Field(0.2, gt=0.0, description="value clip around the rollout's values")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    minibatch_size: int = Field(8, ge=1, description="sequences per optimiser step")
    whiten_advantages: bool = Field(True, description="whiten the advantages of each rollout batch over its "
                                    "completion tokens (TRL's GRPO/RLOO do not: false to compare with them)")
    max_new_tokens: int = Field(48, ge=1, description="completion tokens per sample")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward: each minibatch's gradient "
                                         "is accumulated over micro-batches of this size (none: one forward)")
    share_base: bool = Field(True, description="with LoRA, policy, reference and critic share one frozen base "
                             "(reference = adapter disabled, critic = a second adapter + value head); false: "
                             "separate copies, as full fine-tuning has (for comparison)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (log-probs use the same)")
    chat: ChatMode = Field("auto", description=CHAT_HELP)
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="rollout sampler: hf (transformers generate) or vllm (colocated, the policy's weights "
        "pushed before every rollout; docs/vllm.md)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="GPU share of the colocated vLLM "
                                               "engine (backend vllm)")


# fields that only act under one setting: giving one under another is an error, not a silent no-op
_ONLY_WHEN = {
    "kl_coef": ("kl_mode", "reward"), "kl_target": ("kl_mode", "reward"), "kl_horizon": ("kl_mode", "reward"),
    "beta1": ("kl_mode", "loss"),
    "gamma": ("advantage", "gae"), "lam": ("advantage", "gae"),
    "vf_clip": ("advantage", "gae"),
}


class PPOConfig(JobConfig):
    SHARDS_ITSELF: ClassVar[bool] = True  # fsdp / zero2 / zero3: online.ranks.shard, not accelerate's plugin
    command: str = "ppo"
    data: PPODataSection = Field(default_factory=PPODataSection)
    train: PPOTrainSection = Field(default_factory=PPOTrainSection)  # type: ignore[assignment]
    ppo: PPOSection = Field(default_factory=PPOSection)

    @model_validator(mode="after")
    def _check_ppo(self) -> PPOConfig:
        p = self.ppo
        if p.advantage != "gae" and p.k < 2:
            raise ValueError(f"ppo.advantage={p.advantage} compares the k samples of a prompt: set ppo.k to 2 or more "
                             f"(got {p.k})")
        if p.prompts_per_iteration * p.k < 2:
            raise ValueError("ppo.prompts_per_iteration × ppo.k must be 2 or more: advantage whitening and explained "
                             "variance need at least 2 samples per iteration")
        for name, (switch, value) in _ONLY_WHEN.items():
            if name in p.model_fields_set and getattr(p, switch) != value:
                raise ValueError(f"ppo.{name} acts only with ppo.{switch}={value} (got ppo.{switch}="
                                 f"{getattr(p, switch)}): drop it or change ppo.{switch}")
        if "kl_horizon" in p.model_fields_set and p.kl_target is None:
            raise ValueError("ppo.kl_horizon acts only with the adaptive controller: set ppo.kl_target too, or drop it")
        from alignkit.online.ranks import SHARDING, check_launch

        check_launch(self.launch.accelerate_config, "ppo", self.model.load_in_4bit)
        if self.launch.accelerate_config in SHARDING and p.backend == "vllm":
            raise ValueError("ppo.backend=vllm cannot take weights from a sharded policy: use accelerate_config ddp "
                             "(or backend hf)")
        if p.prompts_per_iteration % self.launch.num_processes:
            raise ValueError(f"ppo.prompts_per_iteration={p.prompts_per_iteration} must be a multiple of "
                             f"launch.num_processes={self.launch.num_processes}: every rank samples an equal shard")
        if self.data.eval_fraction > 0:
            raise ValueError("ppo holds out no prompts: data.eval_fraction must be 0 (evaluate with `alignkit eval`)")
        return self


def adaptive_kl_coef(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (§2.2; TRL's former AdaptiveKLController):
    e = clip(KL / target − 1, −0.2, 0.2), β ← β·(1 + e·n / horizon), after a batch of n samples whose
    mean KL per sequence is `kl`."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n / horizon)


def _scheduler(train: PPOTrainSection, opt: Any, n_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[train.lr_scheduler]
    return get_scheduler(name, opt, num_warmup_steps=math.ceil(train.warmup_ratio * n_steps),
                         num_training_steps=max(1, n_steps))


def iteration_seed(seed: int, iteration: int) -> int:
    """The sampling seed of `iteration`: a pure function of (seed, iteration), so that a resumed run
    samples what the uninterrupted run sampled. `generate` seeds batch b with seed + b."""
    return seed * 1_000_003 + iteration * 10_007


def run(cfg: PPOConfig, progress: Any | None = None) -> dict[str, Any]:
    """Train; returns the summary (also written to summary.json)."""
    import copy
    import shutil

    import torch

    from alignkit import data, generation, models, rewards
    from alignkit import rl_losses as rl
    from alignkit.config import to_yaml
    from alignkit.online import ranks, rollout, score
    from alignkit.trainers import _hf
    from alignkit.trainers import loop as loop_mod
    from alignkit.trainers.loop import Loop

    p = cfg.ppo
    out, _ = _hf.begin(cfg)
    rank, world, device = ranks.start_ranks(cfg.model.device)

    # -- setup: every check that can fail cheaply comes before the run directory is opened ----------
    rewards.check_scorer_spec(p.reward)
    from alignkit import vllm_backend

    vllm_backend.check_backend(p.backend, cfg.model.device)  # the launch's device, not this rank's cuda:N
    ds, _ = data.load_source(cfg.data, expected=("prompts",))
    pool = list(ds["prompt"])
    scorer = rewards.load_scorer(p.reward, device=device, trust_remote_code=cfg.model.trust_remote_code)
    score.check_uncertainty(scorer, p.reward, p.beta2)
    # the built-in task has a gold reward: with a proxy scorer, log it too (over-optimisation shows)
    gold = rewards.load_scorer("gold") if p.reward != "gold" and cfg.data.source == "builtin:prompts" else None

    policy, tokenizer, load, lora = rollout.load_policy(cfg.model, device, cfg.train.seed)
    chat = generation.chat_mode(p.chat, cfg.data.source)
    generation.check_chat(tokenizer, chat)
    engine = (vllm_backend.VLLMEngine.from_spec(
        cfg.model.name, dtype=cfg.model.dtype, seed=cfg.train.seed + rank, tokenizer=tokenizer,
        gpu_memory_utilization=p.vllm_gpu_memory_utilization, trust_remote_code=cfg.model.trust_remote_code)[0]
        if p.backend == "vllm" else None)
    trainable, total = models.trainable_parameters(policy)
    policy_names = [name for name, q in policy.named_parameters() if q.requires_grad]  # before a critic adapter
    shared = lora is not None and p.share_base
    # π_ref = π_SFT, the starting policy, frozen: on the shared base the policy's own base with its adapter
    # disabled (None), else a copy
    reference = (None if shared else copy.deepcopy(policy).requires_grad_(False) if lora is None
                 else models.load_causal_lm(cfg.model.name, **load)[0].requires_grad_(False))
    critic = (None if p.advantage != "gae" else rollout.Critic.on_policy_base(policy) if shared
              else rollout.Critic(models.load_causal_lm(cfg.model.name, **load)[0], lora))
    for m in (policy, reference, critic):
        if m is not None:
            m.eval()  # dropout off everywhere: the ratio is 1 before the first step (gradients still flow)
    # fsdp / zero2 / zero3 on N ranks: FSDP2 shards every model (sharding replaces the parameters: look
    # them up after); otherwise each rank holds whole models and gradients are averaged over ranks
    sharding = ranks.sharding(cfg.launch.accelerate_config, world)
    for m in (policy, reference, critic.body if critic is not None and not shared else None):
        if sharding and m is not None:
            ranks.shard(m, sharding)
    named = dict(policy.named_parameters())
    policy_trainable = {name: named[name] for name in policy_names}
    policy_params = list(policy_trainable.values())
    critic_params = list(critic.trainable.values()) if critic is not None else []
    opt = torch.optim.AdamW(policy_params, lr=cfg.train.learning_rate)
    critic_opt = (torch.optim.AdamW(critic_params, lr=cfg.train.critic_learning_rate or cfg.train.learning_rate)
                  if critic is not None else None)
    # one schedule over every optimiser step of the run: iterations × ppo_epochs × minibatches of a rank's batch
    n_steps = p.iterations * p.ppo_epochs * math.ceil(p.prompts_per_iteration // world * p.k / p.minibatch_size)
    sched = _scheduler(cfg.train, opt, n_steps)
    critic_sched = _scheduler(cfg.train, critic_opt, n_steps) if critic is not None else None
    # on N ranks every rank starts from rank 0's trainable weights; gradients are averaged before each step
    ranks.broadcast(policy_params + critic_params, world)
    u_bar = rl.RunningMean()  # ū of UP-RLHF eq. 14
    kl_coef = p.kl_coef if p.kl_mode == "reward" else 0.0  # moves only with the adaptive controller

    loop = Loop.open(out, overwrite=cfg.output.overwrite, resume=cfg.output.resume, config_yaml=to_yaml(cfg),
                     total=p.iterations, desc="ppo", unit="iteration", progress=progress is None)
    loop.sharded = sharding is not None  # every rank checkpoints its own shards
    task = None  # the CLI passes its live rich Progress: one bar there, not a second live display
    ranks.barrier(world)  # the main rank has prepared DIR.partial before any rank looks for a checkpoint in it
    seen: set[tuple[int, int]] = set()  # (iteration, pool index) of this rank's prompts: the shard report
    # a checkpoint holds what trains (with LoRA the adapters and the value head, not the frozen base)
    objects: dict[str, Any] = {"policy": loop_mod.Trainable(policy_trainable),
                               "optimizer": opt}
    if critic is not None:
        objects |= {"critic": loop_mod.Trainable(critic.trainable), "critic_optimizer": critic_opt}
    last: dict[str, Any] = {}
    with loop:
        if loop.restore(objects):
            u_bar.load_state_dict(loop.stats["u_bar"])
            kl_coef = loop.stats["kl_coef"]
        if progress is not None:
            task = progress.add_task("ppo", total=loop.total, completed=loop.step)
        while loop.step < loop.total:
            it = loop.step
            # -- rollout: K completions per prompt, then π_old, π_ref and V from one forward each ---------
            with loop.timer("rollout"):
                index = rollout.prompt_indices(len(pool), it, p.prompts_per_iteration, cfg.train.seed, rank, world)
                seen.update((it, i) for i in index)
                with ranks.gathered(policy):  # sharded: every layer's weights gathered once for all tokens
                    batch = rollout.sample(policy, tokenizer, [pool[i] for i in index], k=p.k,
                                           max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                           seed=iteration_seed(cfg.train.seed, it) + 7919 * rank, engine=engine,
                                           chat=chat)
            # one update on the whole batch, nothing in the advantages from π_old: π_old is that update's own
            # forward, detached (ratio exactly 1), as TRL's GRPOTrainer does; one forward saved
            once = (critic is None and kl_coef == 0 and p.ppo_epochs == 1 and p.minibatch_size >= len(batch))
            with loop.timer("reference_value"):
                rollout.score_tokens(batch, policy, reference, critic, p.temperature, p.minibatch_size, old=not once)
            # -- score: the proxy reward (and the gold one, for the plot) -----------------------------
            with loop.timer("score"):
                scores = score.score(scorer, batch)
                gold_mean = (float(score.score(gold, batch).mean.mean()) if gold is not None
                             else float(scores.mean.mean()) if p.reward == "gold" else None)
            u_bar.update(ranks.gather(scores.uncertainty, world))  # ū over every sample of every rank
            seq_reward = (rl.uncertainty_penalised_reward(scores.mean, scores.uncertainty, u_bar.mean, p.beta2)
                          if p.beta2 > 0 else scores.mean)
            mask, lp, ref = batch.mask, batch.logprobs, batch.ref_logprobs
            # -- advantages -------------------------------------------------------------------------
            if critic is not None:
                token_r = rl.token_rewards(seq_reward, lp, ref, mask, kl_coef)
                adv, returns = rl.gae(token_r, batch.values, mask, p.gamma, p.lam)
            else:  # critic-free: the KL-penalised sequence reward, compared within each prompt's k samples
                kl_seq = 0.0 if once else torch.where(mask.bool(), lp - ref, torch.zeros_like(lp)).sum(1)
                adv = rl.ADVANTAGES[p.advantage](seq_reward - kl_coef * kl_seq, p.k)[:, None] * mask
                returns = None
            if p.whiten_advantages:
                adv = rl.masked_whiten(adv, mask)
            beside = next(policy.parameters()).device  # the update's tensors live beside the policy
            adv, d_mask, d_ref = (t.to(beside) for t in (adv, mask, ref))
            d_lp = None if once else lp.to(beside)
            if critic is not None:
                d_values, d_returns = batch.values.to(beside), returns.to(beside)
            # -- update: ppo_epochs × minibatches ----------------------------------------------------
            stats: dict[str, list[float]] = {}
            with loop.timer("update"):
                for epoch in range(p.ppo_epochs):
                    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(
                        iteration_seed(cfg.train.seed, it) + 1 + epoch))
                    for rows in order.split(p.minibatch_size):
                        # one optimiser step per minibatch; its gradient accumulated over micro-batches, each
                        # loss weighted by its share of the minibatch's completion tokens (= the token mean)
                        tokens = d_mask[rows].sum().clamp(min=1)
                        st: dict[str, float] = {}
                        opt.zero_grad(set_to_none=True)
                        for micro in rows.split(p.micro_batch_size or p.minibatch_size):
                            share = float(d_mask[micro].sum() / tokens)
                            logits = rollout.completion_logits(policy, batch, micro, p.temperature)
                            new_lp = rollout.token_logprobs(logits, batch, micro)
                            if once:  # π_old = this forward: fill the rollout's log-probs for the KL metrics
                                lp = torch.zeros_like(ref) if lp is None else lp
                                lp[micro.cpu()] = new_lp.detach().cpu()
                            old_lp = new_lp.detach() if once else d_lp[micro]
                            loss, mst = rl.policy_loss(new_lp, old_lp, adv[micro], d_mask[micro], p.clip_eps)
                            mst["policy_loss"] = loss.item()
                            if p.kl_mode == "loss":
                                kl_loss = rl.kl_k2_loss(new_lp, d_ref[micro], d_mask[micro], p.beta1)
                                mst["kl_loss"] = kl_loss.item()
                                loss = loss + kl_loss
                            mst["entropy"] = rl.entropy_from_logits(logits.detach(), d_mask[micro]).item()
                            loop.guard(loss)
                            (loss * share).backward()
                            for key, value in mst.items():
                                st[key] = st.get(key, 0.0) + value * share
                        ranks.average_gradients(policy_params, world)
                        ranks.clip_grad_norm_(policy_params, cfg.train.max_grad_norm)
                        opt.step()
                        sched.step()
                        if critic is not None:
                            critic_opt.zero_grad(set_to_none=True)
                            for micro in rows.split(p.micro_batch_size or p.minibatch_size):
                                share = float(d_mask[micro].sum() / tokens)
                                v_loss, vst = rl.value_loss(critic(batch, micro), d_values[micro],
                                                            d_returns[micro], d_mask[micro], p.vf_clip)
                                loop.guard(v_loss)
                                (v_loss * share).backward()
                                st["value_loss"] = st.get("value_loss", 0.0) + v_loss.item() * share
                                st["vf_clipfrac"] = st.get("vf_clipfrac", 0.0) + vst["vf_clipfrac"] * share
                            ranks.average_gradients(critic_params, world)
                            ranks.clip_grad_norm_(critic_params, cfg.train.max_grad_norm)
                            critic_opt.step()
                            critic_sched.step()
                        for key, value in st.items():
                            stats.setdefault(key, []).append(value)
            # -- log ------------------------------------------------------------------------------------
            kl = rl.kl_estimates(lp, ref, mask)
            last = {
                "reward": float(scores.mean.mean()),
                **({"gold": gold_mean} if gold_mean is not None else {}),
                **({"reward_penalised": float(seq_reward.mean()), "u": float(scores.uncertainty.mean()),
                    "u_bar": u_bar.mean} if score.has_members(scorer) else {}),
                "kl_k1": float(kl["k1"].mean()), "kl_k3": float(kl["k3"].mean()),
                **({"kl_coef": kl_coef} if p.kl_mode == "reward" else {}),
                **{key: sum(v) / len(v) for key, v in stats.items()},
                **({"explained_variance": rl.explained_variance(batch.values, returns, mask)}
                   if critic is not None else {}),
                "length": float(batch.lengths.float().mean()), "eos_rate": float(batch.finished.float().mean()),
            }
            last = ranks.mean_over_ranks(last, world)
            if p.kl_target is not None:  # for the next iteration, from this rollout's KL (the same on every rank)
                kl_coef = adaptive_kl_coef(kl_coef, last["kl_k1"], p.kl_target, len(batch) * world, p.kl_horizon)
            loop.advance(f"reward {last['reward']:.3f} kl {last['kl_k1']:.2f}")
            if task is not None:
                progress.update(task, completed=loop.step)
            loop.log(last)
            # -- checkpoint -------------------------------------------------------------------------
            if cfg.train.save_steps and loop.step % cfg.train.save_steps == 0 and loop.step < loop.total:
                loop.guard(None, *[m for m in (policy, critic) if m is not None])
                loop.stats |= {"u_bar": u_bar.state_dict(), "kl_coef": kl_coef}
                loop.save(objects)
        loop.guard(None, *[m for m in (policy, critic) if m is not None])
    if engine is not None:
        engine.close()

    # -- save: the policy as safetensors + tokenizer in DIR/model (`alignkit eval DIR` reads it) ---------
    parallel = ranks.shard_report(seen, world)
    full = ranks.full_state_dict(policy) if sharding else None  # a collective: every rank takes part
    if loop.run.is_main:
        policy.save_pretrained(str(loop.run.path("model")), safe_serialization=True,
                               **({"selected_adapters": [policy.active_adapter]} if shared else {}),
                               **({"state_dict": full} if full is not None else {}))
        tokenizer.save_pretrained(str(loop.run.path("model")))
        _plot(loop.run.read_metrics(), loop.run.path("plots", "reward_vs_kl.png"),
              title=f"PPO {cfg.model.name} ({p.reward})")
        shutil.rmtree(loop.run.path("checkpoints"), ignore_errors=True)
    metrics = loop.run.read_metrics() if loop.run.is_main else []
    on = next(policy.parameters()).device
    first = metrics[0] if metrics else {}
    summary = {
        "command": "ppo", "model": cfg.model.name, "reward": p.reward, "advantage": p.advantage,
        "kl_mode": p.kl_mode, "iterations": loop.step, "lora": lora is not None,
        "layout": "shared base" if shared else "separate copies",
        "trainable_params": trainable, "total_params": total,
        "first_reward": first.get("reward"), "last_reward": last.get("reward"),
        "first_gold": first.get("gold"), "last_gold": last.get("gold"),
        "peak_gold": max((m["gold"] for m in metrics if m.get("gold") is not None), default=None),
        "last_kl_k1": last.get("kl_k1"), "last_kl_k3": last.get("kl_k3"),
        # this rank's peak GPU memory over the run (policy, reference, critic, optimisers, activations); None on CPU
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(on) / 2**30 if on.type == "cuda" else None),
    }
    if parallel:
        summary["data_parallel"] = parallel
    final = loop.finish(summary, readme=_readme(cfg, summary) if loop.run.is_main else None)
    summary["output_dir"] = str(final)
    return summary


def _plot(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Gold and proxy reward against KL to the reference (k1), one point per iteration (UP-RLHF Figs. 4–5)."""
    from alignkit.runs import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    for key, label in (("reward", "proxy reward"), ("gold", "gold reward")):
        pts = [(m["kl_k1"], m[key]) for m in metrics if m.get(key) is not None and m.get("kl_k1") is not None
               and math.isfinite(m[key])]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_xlabel("KL(π ‖ π_ref), k1 per sequence")
    ax.set_ylabel("reward")
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    save_figure(fig, path)


def _readme(cfg: PPOConfig, summary: dict[str, Any]) -> str:
    from alignkit.runs import run_readme

    p = cfg.ppo
    kl = f"KL in the reward (β={p.kl_coef})" if p.kl_mode == "reward" else f"k2 KL loss (β1={p.beta1})"
    tuned = f"LoRA r={cfg.model.lora.r} (DIR/model is a peft adapter)" if cfg.model.lora.enabled else "full fine-tuning"
    return run_readme(
        "PPO run",
        f"Policy: `{cfg.model.name}`; prompts: `{cfg.data.source}`; reward: `{p.reward}`"
        f"{f', uncertainty penalty β2={p.beta2}' if p.beta2 else ''}; advantage {p.advantage}, {kl}; {tuned}.",
        f"{summary['iterations']} iterations; proxy reward {summary['first_reward']:.3f} → "
        f"{summary['last_reward']:.3f}, "
        f"KL (k1) {summary['last_kl_k1']:.3f} at the end. Curves: plots/reward_vs_kl.png, metrics.jsonl.",
        "Load the policy with `alignkit generate --model <this dir>/model`; evaluate it with `alignkit eval`.",
    )
