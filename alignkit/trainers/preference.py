"""Direct preference optimisation on TRL: `alignkit dpo` (loss dpo, ipo, sppo-hard, or soft sppo of
SPPO eq. 4.12) and `alignkit kto` (KTO eq. 7). Losses, the reference model alignkit builds (always the
policy the run starts from), soft SPPO's one override of TRL and KTO's data order are described in
docs/algorithms/dpo.md. The run directory, metrics, resume and save are shared through `_hf`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignkit.config import Block, DataSection, JobConfig, TrainSection

TRL_LOSS = {"dpo": "sigmoid", "ipo": "ipo", "sppo-hard": "sppo_hard", "sppo": "sppo_hard"}  # sppo: overridden


def _positive_beta(section: str, v: float) -> float:
    if not v > 0:  # (inf/nan are refused by config.Block: β = inf would make every loss a constant)
        raise ValueError(f"{section}.beta: β must be > 0 (got {v})")
    return v


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
    ref_model: str | None = Field(
        None, description="frozen reference model spec (default: the starting policy itself, docs/algorithms/dpo.md)"
    )
    preference: str | None = Field(
        None, description="loss sppo: compute prob = P(chosen ≻ rejected) with this Preference spec (oracle, "
        "pairrm, a reward model) instead of reading the data's prob column"
    )

    _beta = field_validator("beta")(classmethod(lambda cls, v: _positive_beta("pref", v)))

    @model_validator(mode="after")
    def _preference_only_for_sppo(self) -> PrefSection:
        if self.preference is not None and self.loss != "sppo":
            raise ValueError(f"pref.preference is read only by loss sppo (got loss {self.loss}): drop it")
        return self


class DPOConfig(JobConfig):
    command: str = "dpo"
    data: DPODataSection = Field(default_factory=DPODataSection)
    train: DPOTrainSection = Field(default_factory=DPOTrainSection)
    pref: PrefSection = Field(default_factory=PrefSection)


class KTODataSection(DataSection):
    source: str = "builtin:unpaired"


class KTOTrainSection(TrainSection):
    learning_rate: float = Field(1e-6, gt=0.0, description="TRL KTOConfig default")


class KTOSection(Block):
    loss: Literal["kto", "apo-zero-unpaired"] = Field("kto", description="kto (KTO eq. 7) or apo-zero-unpaired")
    beta: float = Field(0.1, description="β > 0 (TRL default 0.1)")
    desirable_weight: float = Field(1.0, gt=0.0, description="λ_D, weight of desirable rows")
    undesirable_weight: float = Field(1.0, gt=0.0, description="λ_U, weight of undesirable rows")
    precompute_ref_log_probs: bool = Field(False, description="reference log-probs once before training")
    ref_model: str | None = Field(None, description="frozen reference model spec (default: the starting policy)")

    _beta = field_validator("beta")(classmethod(lambda cls, v: _positive_beta("kto", v)))


class KTOConfig(JobConfig):
    command: str = "kto"
    data: KTODataSection = Field(default_factory=KTODataSection)
    train: KTOTrainSection = Field(default_factory=KTOTrainSection)
    kto: KTOSection = Field(default_factory=KTOSection)

    @model_validator(mode="after")
    def _kl_needs_two_rows(self) -> KTOConfig:
        if self.kto.loss == "kto" and self.train.batch_size < 2:
            raise ValueError("kto: train.batch_size must be >= 2 — z0 (the KL estimate) pairs each prompt "
                             "with another row's completion in the same batch")
        return self


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
        """DPOTrainer with the loss replaced by `losses.sppo_loss` (eq. 4.12) on the batch's `prob`; the
        summed log-probs are computed exactly as TRL's `_compute_loss` does (docs/algorithms/dpo.md)."""

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


def _pairs(cfg: DPOConfig, dropped: dict[str, int] | None = None) -> dict[str, Any]:
    from alignkit import data
    from alignkit.errors import UserError

    ds, _ = data.load_source(cfg.data, expected=("pairwise",), dropped=dropped)
    if "prompt" not in ds.column_names:
        raise UserError(f"{cfg.data.source}: dpo needs an explicit prompt column (--columns prompt=<col>)")
    if cfg.pref.loss == "sppo" and cfg.pref.preference is not None:
        # P(chosen ≻ rejected) from the shared wrapper, one batched call over the whole dataset (eq. 4.12's P)
        from alignkit.rewards import load_preference

        judge = load_preference(cfg.pref.preference, device=cfg.model.device)
        prob = judge.prob(list(ds["prompt"]), list(ds["chosen"]), list(ds["rejected"])).double().tolist()
        ds = ds.remove_columns([c for c in ("prob",) if c in ds.column_names]).add_column("prob", prob)
    if cfg.pref.loss == "sppo":
        probs = ds["prob"] if "prob" in ds.column_names else None
        if probs is None or any(p is None or not 0.0 <= p <= 1.0 for p in probs):
            raise UserError(f"{cfg.data.source}: loss sppo needs a prob column in [0,1] (P(chosen ≻ rejected)) "
                            "or --preference SPEC to compute it; use --loss sppo-hard for hard labels")
    return data.train_eval_split(ds, cfg.data)


def _unpaired(cfg: KTOConfig, dropped: dict[str, int] | None = None) -> dict[str, Any]:
    """Unpaired rows; pairwise data is unpaired by the shared loader (chosen → desirable, rejected → not)."""
    from alignkit import data
    from alignkit.errors import UserError

    ds, kind = data.load_source(cfg.data, expected=("unpaired", "pairwise"), dropped=dropped)
    # split BEFORE unpairing, so that a pair's two rows stay on one side of the train/eval split
    splits = data.train_eval_split(ds, cfg.data)
    if kind == "pairwise":
        splits = {name: None if part is None else data.unpair(part) for name, part in splits.items()}
    labels = splits["train"]["label"]
    if cfg.kto.loss == "kto" and (all(labels) or not any(labels)):
        which = "desirable" if all(labels) else "undesirable"
        raise UserError(f"{cfg.data.source}: every row is {which}; KTO needs both desirable and undesirable rows")
    # TRL's KTO reads its data SEQUENTIALLY (z0 pairs each row with its batch neighbours' completions,
    # precomputed in a fixed order), and `unpair` lists a block's chosen rows before its rejected ones: shuffle
    # each split once here (seeded) so that batches mix desirable and undesirable rows.
    return {name: None if part is None else part.shuffle(seed=cfg.train.seed).flatten_indices()
            for name, part in splits.items()}


def _policy_and_reference(cfg: DPOConfig | KTOConfig, section: PrefSection | KTOSection) -> dict[str, Any]:
    """The policy (no adapter yet), its tokenizer, the reference (docs/algorithms/dpo.md#reference-model)
    and the peft config TRL should apply. Every model is loaded before anything is written."""
    from alignkit import models

    load = dict(dtype=cfg.model.dtype, device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                load_in_4bit=cfg.model.load_in_4bit, placement=models.launch_placement(),
                attn_implementation=cfg.model.attn_implementation)
    model, tokenizer = models.load_causal_lm(cfg.model.name, **load)
    lora = cfg.model.lora.enabled
    if lora and cfg.model.load_in_4bit:  # QLoRA as in sft/rm; TRL adds the adapter (peft_config)
        model = models.prepare_4bit(model)
    peft_config = models.LoraSpec(**cfg.model.lora.model_dump(exclude={"enabled"})).to_peft() if lora else None
    if section.ref_model is not None:
        ref, mode = models.load_causal_lm(section.ref_model, **load)[0], f"frozen model {section.ref_model}"
    elif section.precompute_ref_log_probs:
        ref, mode = None, "precomputed from the starting policy"
    elif lora:
        ref, mode = None, "the base with the LoRA adapter disabled (no copy)"
    else:
        ref, mode = models.load_causal_lm(cfg.model.name, **load)[0], "frozen copy of the starting policy"
    if ref is not None:
        ref.eval().requires_grad_(False)
    return {"model": model, "tokenizer": tokenizer, "ref_model": ref, "peft_config": peft_config, "reference": mode}


def _fit_and_finish(cfg, trainer, setup, run_dir, title: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Shared by dpo and kto: train, save, and write the summary."""
    from alignkit import models
    from alignkit.trainers import _hf

    models.adapters_in_compute_dtype(trainer.model)  # QLoRA: TRL made the adapter bf16
    trainable, total = models.trainable_parameters(trainer.model)
    result, parallel = _hf.fit(trainer, run_dir)
    metrics = _hf.save_final(trainer, setup["tokenizer"], run_dir, title=title)
    last = [m for m in metrics if "rewards/margins" in m or "rewards/chosen" in m]
    summary = {
        "command": cfg.command,
        **extra,
        "model": cfg.model.name,
        "train_rows": len(trainer.train_dataset),
        **_hf.training_summary(trainer, result, metrics, trainable, total),
        "rewards_accuracy_last": last[-1].get("rewards/accuracies") if last else None,
        "rewards_margin_last": last[-1].get("rewards/margins") if last else None,
        "lora": cfg.model.lora.enabled,
        "reference": setup["reference"],
    }
    if cfg.command == "kto":
        kl = [m["kl"] for m in metrics if "kl" in m]
        summary["kl_last"] = kl[-1] if kl else None
    if parallel:
        summary["data_parallel"] = parallel
    final = run_dir.finish(summary, readme=_readme(cfg, summary))
    summary["output_dir"] = str(final)
    return summary


def _trl_common(cfg, run_dir, setup, eval_split) -> dict[str, Any]:
    import torch

    from alignkit import models
    from alignkit.trainers import _hf

    bf16 = models.training_dtype(setup["model"]) == torch.bfloat16
    return dict(
        **_hf.training_args(cfg, run_dir, bf16=bf16),
        max_length=_hf.cap_max_length(cfg.train.max_length, setup["model"]),
        eval_strategy=_hf.eval_strategy(cfg, eval_split),
    )


def run(cfg: DPOConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """`alignkit dpo`. Returns the summary (also written to summary.json). `callbacks`: extra TrainerCallbacks."""
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from alignkit import data
    from alignkit.config import to_yaml
    from alignkit.errors import UserError
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup: data and models are loaded (and validated) before anything is written -------------
    dropped: dict[str, int] = {}
    splits = _pairs(cfg, dropped)
    set_seed(cfg.train.seed)  # LoRA A matrices are initialised from the global RNG
    setup = _policy_and_reference(cfg, cfg.pref)
    tokenizer = setup["tokenizer"]
    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    args = TRLDPOConfig(
        **_trl_common(cfg, run_dir, setup, splits["eval"]),
        beta=cfg.pref.beta,
        loss_type=[TRL_LOSS[cfg.pref.loss]],
        precompute_ref_log_probs=cfg.pref.precompute_ref_log_probs,
    )
    soft = cfg.pref.loss == "sppo"
    collator = None
    if soft:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = _ProbCollator(DataCollatorForPreference(
            pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
        ))
    trainer = (_soft_sppo_trainer() if soft else DPOTrainer)(
        model=setup["model"], ref_model=setup["ref_model"], peft_config=setup["peft_config"], args=args,
        train_dataset=splits["train"], eval_dataset=splits["eval"], processing_class=tokenizer,
        data_collator=collator, callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])],
    )
    # TRL drops the pairs whose prompt alone fills max_length: count them too
    rows_in = len(splits["train"])
    try:
        dropped |= data.note_dropped(cfg.data.source, rows_in, {"too_long": rows_in - len(trainer.train_dataset)})
    except UserError:  # nothing left to train on: leave no DIR.partial behind
        run_dir.discard()
        raise
    # -- train and save ----------------------------------------------------------------------------
    return _fit_and_finish(cfg, trainer, setup, run_dir, f"{cfg.pref.loss} {cfg.model.name}",
                           {"loss": cfg.pref.loss, "beta": cfg.pref.beta, "dropped_rows": dropped})


def run_kto(cfg: KTOConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """`alignkit kto` on TRL's KTOTrainer. Returns the summary (also written to summary.json)."""
    from transformers import set_seed
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup ---------------------------------------------------------------------------------------
    dropped: dict[str, int] = {}
    splits = _unpaired(cfg, dropped)
    set_seed(cfg.train.seed)
    setup = _policy_and_reference(cfg, cfg.kto)
    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    k = cfg.kto
    args = TRLKTOConfig(
        **_trl_common(cfg, run_dir, setup, splits["eval"]),
        beta=k.beta,
        loss_type=k.loss.replace("-", "_"),
        desirable_weight=k.desirable_weight,
        undesirable_weight=k.undesirable_weight,
        precompute_ref_log_probs=k.precompute_ref_log_probs,
    )
    trainer = KTOTrainer(
        model=setup["model"], ref_model=setup["ref_model"], peft_config=setup["peft_config"], args=args,
        train_dataset=splits["train"], eval_dataset=splits["eval"], processing_class=setup["tokenizer"],
        callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])],
    )
    # -- train and save ----------------------------------------------------------------------------
    return _fit_and_finish(cfg, trainer, setup, run_dir, f"{k.loss} {cfg.model.name}",
                           {"loss": k.loss, "beta": k.beta, "desirable_weight": k.desirable_weight,
                            "undesirable_weight": k.undesirable_weight, "dropped_rows": dropped})


def _readme(cfg: DPOConfig | KTOConfig, summary: dict[str, Any]) -> str:
    from alignkit.runs import run_readme

    acc = summary["rewards_accuracy_last"]
    return run_readme(
        f"{cfg.command.upper()} run (loss {summary['loss']}, β={summary['beta']})",
        f"Start policy `{cfg.model.name}`; data `{cfg.data.source}`; "
        f"{'LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled else 'full fine-tuning'}; "
        f"reference: {summary['reference']}.",
        f"Steps: {summary['steps']}, mean training loss {summary['train_loss']:.4f}"
        + (f", last logged reward accuracy {acc:.3f}" if acc is not None else "") + ".",
        "Load the policy with `alignkit generate --model <this dir>/model` or `alignkit eval <this dir>` "
        "(LoRA runs save a peft adapter, which alignkit merges into its base on load).",
    )
