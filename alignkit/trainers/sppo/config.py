"""The configuration of `alignkit sppo` (iterative SPPO, and iterative DPO / IPO on the same loop).

Defaults are the SPPO paper's (Wu et al. 2024, §5 and its reference code) where it gives one; the
recipe `recipes/sppo-mistral-7b.yaml` spells them out. Torch-free: `--help` and `--dry-run` import it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from alignkit.config import CHAT_HELP, Block, ChatMode, DataSection, JobConfig


class SPPODataSection(DataSection):
    source: str = Field("builtin:prompts", description="prompts: a file, dataset dir, hub id or builtin:prompts")


class SPPOTrainSection(Block):
    """The optimiser of each iteration (a fresh one per iteration, as the paper's runs), and bookkeeping."""

    learning_rate: float = Field(5e-7, gt=0.0, description="peak learning rate (SPPO: 5e-7)")
    optimizer: Literal["rmsprop", "adamw"] = Field("rmsprop", description="rmsprop (SPPO) or adamw")
    lr_scheduler: Literal["linear", "constant"] = Field(
        "linear", description="linear: warm up, then decay to 0 over the iteration (SPPO); constant: after warm-up")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of an iteration's steps spent warming up")
    batch_size: int = Field(64, ge=1, description="global batch: pairs (or samples with select all) per step")
    micro_batch_size: int = Field(8, ge=1, description="pairs per forward on each rank (gradient accumulation)")
    epochs: int = Field(1, ge=1, description="passes over each iteration's pairs")
    max_grad_norm: float = Field(1.0, gt=0.0, description="clip the gradient norm to this")
    save_steps: int = Field(50, ge=0, description="checkpoint every N optimiser steps for --resume (0: only at "
                            "the end of each iteration)")
    seed: int = Field(42, ge=0, description="seed of sampling, prompt split and pair order")


class SPPOSection(Block):
    """Self-play settings (SPPO Algorithm 1)."""

    preference: str = Field("oracle", description="who judges the K×K pairs: oracle (built-in task), pairrm, or a "
                            "reward model / function as Bradley–Terry (docs/rewards.md)")
    iterations: int = Field(3, description="T: self-play iterations (≥ 1)")
    k: int = Field(5, description="K: completions per prompt (≥ 2)")
    eta: float = Field(1000.0, description="η = 1/β of SPPO eq. 4.7 (> 0): the log-ratio target η(P̂ − ½)")
    loss: Literal["sppo", "dpo", "ipo"] = Field(
        "sppo", description="sppo (SPPO eq. 4.7), or dpo / ipo on the same winner/loser pairs (iterative baselines)")
    beta: float = Field(0.1, gt=0.0, description="β of dpo / ipo (not used by sppo, whose scale is eta)")
    select: Literal["pair", "all"] = Field(
        "pair", description="pair: the winner (argmax P̂) and loser (argmin P̂) of each prompt; all: every sample "
        "with its own P̂ (sppo only)")
    split_prompts: bool = Field(True, description="true: the prompts are split into T disjoint parts, one per "
                                "iteration (SPPO); false: every iteration uses all prompts")
    max_new_tokens: int = Field(128, ge=1, description="completion tokens per sample")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature (SPPO: 1.0)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (SPPO: 1.0)")
    chat: ChatMode = Field("auto", description=CHAT_HELP)
    sample_batch_size: int = Field(64, ge=1, description="sequences per generate call")
    chunk_prompts: int = Field(64, ge=1, description="prompts per saved sampling chunk (what --resume keeps)")
    eval_prompts: int = Field(64, ge=0, description="held-out prompts for the per-iteration win rates (0: none)")

    @model_validator(mode="after")
    def _check(self) -> SPPOSection:
        if self.iterations < 1:
            raise ValueError(f"sppo.iterations (T) must be 1 or more, got {self.iterations}")
        if self.k < 2:
            raise ValueError(f"sppo.k (K) must be 2 or more: P̂ compares a prompt's samples with each other, "
                             f"got {self.k}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"sppo.eta must be > 0 (η = 1/β of SPPO eq. 4.7), got {self.eta}")
        if self.select == "all" and self.loss != "sppo":
            raise ValueError(f"sppo.select=all needs sppo.loss=sppo: {self.loss} learns from pairs")
        if "beta" in self.model_fields_set and self.loss == "sppo":
            raise ValueError("sppo.beta is the β of dpo / ipo; sppo's scale is sppo.eta (η = 1/β)")
        if "eta" in self.model_fields_set and self.loss != "sppo":
            raise ValueError(f"sppo.eta acts only with sppo.loss=sppo; {self.loss} uses sppo.beta")
        return self


def _outputs(cfg: SPPOConfig) -> dict[str, str]:
    """What a pipeline's later steps may name (`${sppo.model}`, ...), relative to the run directory."""
    last = f"iter-{cfg.sppo.iterations}"
    return {"model": f"{last}/model", "pairs": f"{last}/pairs.jsonl"}


class SPPOConfig(JobConfig):
    OUTPUTS: ClassVar[Any] = staticmethod(_outputs)
    SHARDS_ITSELF: ClassVar[bool] = True  # fsdp / zero2 / zero3: online.ranks.shard, not accelerate's plugin
    command: str = "sppo"
    data: SPPODataSection = Field(default_factory=SPPODataSection)
    train: SPPOTrainSection = Field(default_factory=SPPOTrainSection)  # type: ignore[assignment]
    sppo: SPPOSection = Field(default_factory=SPPOSection)

    @model_validator(mode="after")
    def _check_sppo(self) -> SPPOConfig:
        from alignkit.online.ranks import check_launch

        check_launch(self.launch.accelerate_config, "sppo", self.model.load_in_4bit)
        if self.data.eval_fraction > 0:
            raise ValueError("sppo holds out sppo.eval_prompts itself: data.eval_fraction must be 0")
        if self.sppo.chunk_prompts < self.launch.num_processes:
            raise ValueError(f"sppo.chunk_prompts={self.sppo.chunk_prompts} must be at least launch.num_processes="
                             f"{self.launch.num_processes}: every rank samples a share of every chunk")
        return self

    def plan(self) -> list[tuple[str, str]]:
        """What `--dry-run` prints: the work of the run, what it downloads and the GPUs it expects. Counts are
        exact for the built-in prompts and per N prompts otherwise (nothing is downloaded to count them)."""
        from alignkit import model_names

        p, T, K = self.sppo, self.sppo.iterations, self.sppo.k
        n = _builtin_count(self.data.source, self.data.max_samples)
        if n is None:
            n_text, per, scale = "N", f"(N − {p.eval_prompts}){'/T' if p.split_prompts else ''}", None
        else:
            n_text = str(n)
            scale = max(0, n - p.eval_prompts) // (T if p.split_prompts else 1)
            per = str(scale)

        def times(m: int) -> str:
            return f"{m * scale:,}" if scale is not None else f"{m} × {per}"

        alias = model_names.ALIASES.get(self.model.name)
        downloads = [f"{alias.hub_id if alias and alias.hub_id else self.model.name}"
                     + (f" ({alias.params_b:g}B parameters)" if alias and alias.params_b else "")
                     for _ in [0] if not model_names.is_available_locally(self.model.name)]
        if p.preference == "pairrm":
            downloads.append("llm-blender/PairRM (0.4B) + the llm-blender package")
        if n is None and not self.data.source.startswith("builtin:"):
            downloads.append(f"the prompts {self.data.source} (unless a file or a cached dataset)")
        gpus = f"{self.launch.num_processes} process(es), one GPU each (cuda:LOCAL_RANK)"
        if alias is not None and alias.params_b and not self.model.lora.enabled:
            # weights + gradients + the optimiser's state per parameter, in bf16 (no fp32 master copy)
            per_gpu = alias.params_b * 2 * (2 + (1 if self.train.optimizer == "rmsprop" else 2))
            gpus += f"; full fine-tuning of {alias.params_b:g}B parameters holds ≈ {per_gpu:.0f} GB per GPU before "
            gpus += "activations (bf16 weights, gradients and optimiser state; no ZeRO sharding yet: 80 GB GPUs)"
        return [
            ("prompts", f"{n_text} from {self.data.source}: {p.eval_prompts} held out for the win rates, {per} per "
                        f"iteration ({'T disjoint parts' if p.split_prompts else 'all of them every iteration'})"),
            ("iterations", f"T = {T}; K = {K} completions per prompt, ≤ {p.max_new_tokens} new tokens, "
                           f"temperature {p.temperature}, top-p {p.top_p}"),
            ("completions", f"{times(K)} per iteration, {times(K * T)} in all, + {p.eval_prompts} per iteration "
                            "(and once for π_0) for the win rates"),
            ("preference", f"{p.preference}: one {K}×{K} matrix per prompt in batched calls, {times(1)} per "
                           f"iteration ({times(K * K)} pair judgements)"),
            ("loss", f"{p.loss} " + (f"η = {p.eta:g}" if p.loss == "sppo" else f"β = {p.beta:g}")
                     + f" on {'winner/loser pairs' if p.select == 'pair' else 'every sample'}; "
                     f"{self.train.optimizer} lr {self.train.learning_rate:g}, global batch {self.train.batch_size}, "
                     f"{self.train.epochs} epoch(s) per iteration; reference = the iteration's starting policy"),
            ("downloads", ", ".join(downloads) or "nothing (everything is local)"),
            ("devices", gpus if self.model.device != "cpu" else "CPU (model.device cpu)"),
        ]


def _builtin_count(source: str, max_samples: int | None) -> int | None:
    """How many prompts `builtin:prompts` gives (torch-free); None for other sources."""
    if source != "builtin:prompts":
        return None
    from alignkit.arena import all_prompts

    n = len({prompt for prompt, _ in all_prompts()})  # distinct: the loop drops repeats
    return min(n, max_samples) if max_samples else n


__all__ = ["SPPOConfig", "SPPODataSection", "SPPOSection", "SPPOTrainSection"]
