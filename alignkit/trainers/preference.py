"""Direct preference optimisation (ALGORITHMS.md §2–3): `alignkit dpo` with loss dpo, ipo, sppo-hard or sppo.

What TRL 1.16's `DPOTrainer` does (and alignkit keeps): it appends EOS to chosen/rejected, tokenises
prompt, prompt+chosen and prompt+rejected (the completion starts where they diverge), drops rows whose
prompt alone fills `max_length`, pads [chosen; rejected] into one batch, and takes SUMMED completion
log-probs for policy and reference. Losses with Δ = logratio_w − logratio_l:

* `dpo` → `loss_type="sigmoid"`: −log σ(β Δ)  (TRL's sigmoid ignores label_smoothing).
* `ipo` → `loss_type="ipo"`: (Δ̄ − 1/(2β))², where TRL AVERAGES each log-ratio over the completion
  tokens (Δ̄); the SPPO reference code sums. We keep TRL's per-token average.
* `sppo-hard` → `loss_type="sppo_hard"`: (lr_w − 0.5/β)² + (lr_l + 0.5/β)²  (eq. 4.12 with P = 1).
* `sppo` (soft, eq. 4.12): NOT in TRL. alignkit overrides only this: the pairwise data's `prob` column
  (P(y_w ≻ y_l) ∈ [0, 1]) is kept through TRL's preprocessing (TRL's `map` keeps extra columns, but
  `remove_unused_columns` would drop it, so it is added to the signature columns) and carried into the
  batch by a wrapping collator; `_compute_loss` then computes the summed log-probs exactly as TRL does
  (policy forward with TRL's fused LM head; reference via TRL's own `compute_ref_log_probs` or the
  precomputed columns), applies `alignkit.losses.sppo_loss` and logs TRL's metrics
  (rewards/chosen, rejected, accuracies, margins; logps/chosen, rejected).

Reference model (verified in TRL 1.16's `DPOTrainer.__init__` / `_compute_loss`):

* LoRA: no `ref_model` is passed and TRL keeps `ref_model=None` (no second model). Because
  `models.load_causal_lm` hands TRL a model that is ALREADY a PeftModel, TRL 1.16 treats it as "re-training
  an existing adapter" and copies the fresh adapter into a second adapter named "ref" (its reference forward
  runs `use_adapter(model, "ref")`). A fresh LoRA has B = 0, so "ref" computes exactly the base model; the
  cost is one extra adapter (small), and it is saved alongside as `model/ref/`. (Had the adapter been
  created by TRL from a `peft_config`, TRL would disable adapters instead — same reference.)
* Full fine-tuning: TRL loads a SECOND copy of the model from `model.config._name_or_path`
  (`create_model_from_path`, same dtype), so weights take twice the memory (no optimiser state for the
  copy). With `precompute_ref_log_probs: true` TRL instead scores the whole training set with the
  untrained policy once before training and keeps no reference model at all (not under FSDP).

Everything else (run directory, metrics stream, resume, save, loss plot, launcher) is shared with
`sft` and `rm` through `alignkit.trainers._hf`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from alignkit.config import Block, DataSection, JobConfig, TrainSection

TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo", "sppo-hard": "sppo_hard", "sppo": "sppo_hard"}  # sppo: overridden


class DPODataSection(DataSection):
    source: str = "builtin:pairwise"


class DPOTrainSection(TrainSection):
    learning_rate: float = Field(1e-6, gt=0.0, description="TRL DPOConfig default")


class PrefSection(Block):
    loss: Literal["dpo", "ipo", "sppo-hard", "sppo"] = Field(
        "dpo", description="dpo (TRL sigmoid), ipo, sppo-hard (P = 1), sppo (soft eq. 4.12, needs a prob column)"
    )
    beta: float = Field(0.1, description="β: KL strength (IPO's τ; SPPO's η = 1/β)")
    precompute_ref_log_probs: bool = Field(
        False, description="score the data with the reference once before training; no reference model kept"
    )

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"pref.beta: β must be > 0 (got {v})")
        return v


class DPOConfig(JobConfig):
    command: str = "dpo"
    data: DPODataSection = Field(default_factory=DPODataSection)
    train: DPOTrainSection = Field(default_factory=DPOTrainSection)
    pref: PrefSection = Field(default_factory=PrefSection)


# ---------------------------------------------------------------------------------- soft SPPO


class _ProbCollator:
    """TRL's preference collator plus a float tensor `prob` (B,) taken from each row."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        import torch

        out = self.base(examples)
        out["prob"] = torch.tensor([float(e["prob"]) for e in examples], dtype=torch.float32)
        return out


def _soft_sppo_trainer():
    from trl import DPOTrainer

    class SoftSPPOTrainer(DPOTrainer):
        """DPOTrainer with the loss replaced by `losses.sppo_loss` on the batch's `prob` (see module doc)."""

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "prob" not in self._signature_columns:
                self._signature_columns.append("prob")

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "prob"})

        def _compute_loss(self, model, inputs, return_outputs):
            from alignkit import losses

            mode = "train" if self.model.training else "eval"
            prob = inputs["prob"]
            inputs = {k: v for k, v in inputs.items() if k != "prob"}
            kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                     "ref_rejected_logps")}
            kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            seq_len = completion_mask.size(1) - 1
            outputs = model(**kwargs, labels=labels, fused_lm_head=True)
            chosen, rejected = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)  # as TRL (ld_alpha None)
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
            loss = losses.sppo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, prob.to(chosen.dtype))
            rc, rr = losses.preference_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)
            gather, m = self.accelerator.gather, self._metrics[mode]
            m["rewards/chosen"].append(gather(rc).mean().item())
            m["rewards/rejected"].append(gather(rr).mean().item())
            m["rewards/accuracies"].append(gather((rc > rr).float()).mean().item())
            m["rewards/margins"].append(gather(rc - rr).mean().item())
            m["logps/chosen"].append(gather(chosen.detach()).mean().item())
            m["logps/rejected"].append(gather(rejected.detach()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftSPPOTrainer


# ------------------------------------------------------------------------------------- run


def _pairs(cfg: DPOConfig):
    from alignkit import data
    from alignkit.errors import UserError

    ds, _ = data.load_source(cfg.data, expected=("pairwise",))
    if "prompt" not in ds.column_names:
        raise UserError(f"{cfg.data.source}: dpo needs an explicit prompt column (--columns prompt=<col>)")
    if cfg.pref.loss == "sppo":
        probs = ds["prob"] if "prob" in ds.column_names else None
        if probs is None or any(p is None or not 0.0 <= p <= 1.0 for p in probs):
            raise UserError(f"{cfg.data.source}: loss sppo needs a prob column in [0,1] (P(chosen ≻ rejected)); "
                            "use --loss sppo-hard for hard labels")
    splits = {"train": ds, "eval": None}
    if cfg.data.eval_fraction > 0:
        f = cfg.data.eval_fraction
        splits = data.split(ds, (1 - f, f), cfg.data.seed, ("train", "eval"))
    return splits


def run(cfg: DPOConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """Train; returns the summary (also written to summary.json). `callbacks` are extra TrainerCallbacks."""
    import torch
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from alignkit import models
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup: data and model are loaded (and validated) before anything is written -------------
    splits = _pairs(cfg)
    set_seed(cfg.train.seed)  # LoRA A matrices are initialised from the global RNG
    model, tokenizer = models.load_causal_lm(
        cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code,
        lora=models.LoraSpec(**cfg.model.lora.model_dump(exclude={"enabled"})) if cfg.model.lora.enabled else None,
    )
    trainable, total = models.trainable_parameters(model)
    bf16 = next(model.parameters()).dtype == torch.bfloat16

    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    soft = cfg.pref.loss == "sppo"
    args = TRLDPOConfig(
        **_hf.training_args(cfg, run_dir, bf16=bf16),
        beta=cfg.pref.beta,
        loss_type=[TRL_LOSS[cfg.pref.loss]],
        precompute_ref_log_probs=cfg.pref.precompute_ref_log_probs,
        max_length=cfg.train.max_length,
        eval_strategy="epoch" if splits["eval"] is not None else "no",
    )
    collator = None
    if soft:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = _ProbCollator(DataCollatorForPreference(
            pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
        ))
    trainer_cls = _soft_sppo_trainer() if soft else DPOTrainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["eval"],
        processing_class=tokenizer, data_collator=collator,  # ref_model=None: see the module docstring
        callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])],
    )

    # -- train ---------------------------------------------------------------------------------------
    result, parallel = _hf.fit(trainer, run_dir)

    # -- save ------------------------------------------------------------------------------------
    metrics = _hf.save_final(trainer, tokenizer, run_dir, title=f"{cfg.pref.loss} {cfg.model.name}")
    last = [m for m in metrics if "rewards/accuracies" in m]
    summary = {
        "command": "dpo",
        "loss": cfg.pref.loss,
        "beta": cfg.pref.beta,
        "model": cfg.model.name,
        "train_pairs": len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        **_hf.loss_summary(metrics),
        "rewards_accuracy_last": last[-1]["rewards/accuracies"] if last else None,
        "rewards_margin_last": last[-1]["rewards/margins"] if last else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_s": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable,
        "total_params": total,
        "lora": cfg.model.lora.enabled,
        "reference": "precomputed" if cfg.pref.precompute_ref_log_probs else (
            "initial LoRA adapter copy (= base)" if cfg.model.lora.enabled else "frozen copy"),
        "world_size": trainer.accelerator.num_processes,
    }
    if parallel:
        summary["data_parallel"] = parallel
    final = run_dir.finish(summary, readme=_readme(cfg, summary))
    summary["output_dir"] = str(final)
    return summary


def _readme(cfg: DPOConfig, summary: dict[str, Any]) -> str:
    acc = summary["rewards_accuracy_last"]
    return (
        f"# DPO run (loss {cfg.pref.loss}, β={cfg.pref.beta})\n\nStart policy `{cfg.model.name}`; "
        f"data `{cfg.data.source}`; "
        f"{'LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled else 'full fine-tuning'}; "
        f"reference: {summary['reference']}.\n\n"
        f"Steps: {summary['steps']}, mean training loss {summary['train_loss']:.4f}"
        + (f", last logged reward accuracy {acc:.3f}" if acc is not None else "") + ".\n\n"
        "Load the policy with `alignkit generate --model <this dir>/model` "
        "(LoRA runs save a peft adapter: `PeftModel.from_pretrained`).\n"
    )
