"""Reward models: `alignkit rm` (one Bradley–Terry reward model on TRL's RewardTrainer, loss
−log σ(r_w − r_l)) and `alignkit rm-ensemble` (UP-RLHF's diverse reward-LoRA ensemble: N LoRA members
on one frozen base, trained jointly with eq. 12; only `compute_loss` is ours). Both finish with the
evaluation of UP-RLHF eqs. 13 and 17–19 (`evaluate_reward_model`). The algorithm, the defaults (rank 32,
λ = 0.1) and the deviations from the paper: docs/algorithms/rm-ensemble.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignkit.config import Block, DataSection, JobConfig, LoraSection, ModelSection, TrainSection
from alignkit.errors import UserError

# ----------------------------------------------------------------------------------- configs


class RMDataSection(DataSection):
    source: str = "builtin:pairwise"
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held-out pairs for accuracy/ECE")


class RMTrainSection(TrainSection):
    learning_rate: float = Field(1e-4, gt=0.0, description="TRL RewardConfig default")
    max_length: int = Field(512, ge=8, description="pairs longer than this are dropped (as TRL)")


class RMEvalSection(Block):
    ood_source: str | None = Field(
        "builtin:ood", description="completions unlike the training data (prompt, completion) for OOD uncertainty"
    )
    ood_max_samples: int | None = Field(400, ge=1)
    n_bins: int = Field(15, ge=2, description="ECE bins (UP-RLHF: 15)")
    batch_size: int = Field(64, ge=1)


class RMConfig(JobConfig):
    command: str = "rm"
    data: RMDataSection = Field(default_factory=RMDataSection)
    train: RMTrainSection = Field(default_factory=RMTrainSection)
    eval: RMEvalSection = Field(default_factory=RMEvalSection)


class EnsembleLora(LoraSection):
    enabled: bool = Field(True, description="always true: the members are LoRA adapters")
    r: int = Field(32, ge=1, description="UP-RLHF's parameter shares imply rank 32")
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] | None = Field(
        None, description="None: peft's default for the architecture (query/value projections)"
    )
    layers_to_transform: int | list[int] | None = Field(
        None, description="adapt only these transformer blocks (negative = from the top, e.g. [-2, -1]); the "
        "blocks below the lowest are shared by all members and run once when scoring",
    )


class EnsembleModel(ModelSection):
    lora: EnsembleLora = Field(default_factory=EnsembleLora)


class EnsembleSection(Block):
    n_members: int = Field(5, description="N, the ensemble size (UP-RLHF: 5)")
    lam: float = Field(0.1, description="λ, the weight of the nuclear-norm diversity term (eq. 12)")
    member_loss: Literal["mean", "each"] = Field(
        "mean", description="mean: BT on the members' mean reward (the paper); each: independent BT per member"
    )
    seeds: list[int] | None = Field(None, description="one seed per member (default: train.seed + n)")
    forward: Literal["auto", "mixed", "loop", "shared", "shared-loop"] = Field(
        "auto",
        description="mixed: all members in one peft mixed-adapter batch; loop: one pass per member; "
        "shared / shared-loop: mixed / loop, with the blocks below lora.layers_to_transform run once; "
        "auto: shared-loop in one process (faster on CPU), shared under DDP (= loop / mixed without a trunk)",
    )

    @model_validator(mode="after")
    def _check(self) -> EnsembleSection:
        if self.n_members < 2:
            raise ValueError(f"ensemble.n_members must be at least 2 for an ensemble (got {self.n_members})")
        if self.lam < 0:
            raise ValueError(f"ensemble.lam (λ) must be >= 0 (got {self.lam}); it weights a term that is maximised")
        if self.seeds is not None and len(self.seeds) != self.n_members:
            raise ValueError(f"ensemble.seeds has {len(self.seeds)} seeds for {self.n_members} members")
        return self


class EnsembleTrain(RMTrainSection):
    learning_rate: float = Field(
        1e-3, gt=0.0, description="LoRA members need a higher rate than full FT (Table-1 bench: 1e-2 tiny, 3e-3 minilm)"
    )


class RMEnsembleConfig(RMConfig):
    command: str = "rm-ensemble"
    train: EnsembleTrain = Field(default_factory=EnsembleTrain)

    @model_validator(mode="after")
    def _check_ensemble(self) -> RMEnsembleConfig:
        if self.launch.num_processes > 1 and self.ensemble.forward in ("loop", "shared-loop"):
            raise ValueError(f"ensemble.forward={self.ensemble.forward} cannot run under DDP (one forward per "
                             "step must go through the DDP wrapper): use mixed, shared or auto with "
                             "launch.num_processes > 1")
        if self.launch.accelerate_config in ("zero3", "fsdp"):
            raise ValueError(f"rm-ensemble with --accelerate-config {self.launch.accelerate_config}: the NNM term "
                             "reads whole LoRA-A matrices, which ZeRO-3/FSDP shard; use ddp or zero2")
        if not self.model.lora.enabled:
            raise ValueError("model.lora.enabled=false: ensemble members are LoRA adapters (use `alignkit rm`)")
        if self.model.lora.dropout > 0:
            raise ValueError("model.lora.dropout > 0 has no effect: ensemble forwards run without dropout")
        return self
    model: EnsembleModel = Field(default_factory=EnsembleModel)
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)


# ------------------------------------------------------------------------------------ setup


def _pairs(cfg: RMConfig, dropped: dict[str, int] | None = None):
    from alignkit import data

    ds, _ = data.load_source(cfg.data, expected=("pairwise",), dropped=dropped)
    parts = data.train_eval_split(ds, cfg.data)
    return parts["train"], parts["eval"]


def _count_too_long(cfg: RMConfig, dropped: dict[str, int], rows_in: int, trainer, run_dir) -> None:
    """TRL's RewardTrainer drops the pairs with a side longer than max_length: count them too (and
    leave no DIR.partial behind when none is left)."""
    from alignkit import data

    try:
        dropped |= data.note_dropped(cfg.data.source, rows_in,
                                     {"pair_too_long": rows_in - len(trainer.train_dataset)})
    except UserError:
        run_dir.discard()
        raise


def _ood(cfg: RMConfig):
    from alignkit import data

    if not cfg.eval.ood_source:
        return None
    ds, _ = data.load(cfg.eval.ood_source, kind="sft", max_samples=cfg.eval.ood_max_samples, seed=cfg.data.seed + 1)
    if "prompt" not in ds.column_names or "completion" not in ds.column_names:
        from alignkit.errors import UserError

        raise UserError(f"{cfg.eval.ood_source}: OOD data needs prompt and completion columns (--columns maps them)")
    return ds


def _token_ids(tokenizer, prompts: list, completions: list) -> list[list[int]]:
    """Token ids of each (prompt, completion) exactly as the scorers encode them at inference
    (`rewards.reward_texts` + `rewards.encode`), so a reward model is trained on what it will score."""
    from alignkit import rewards

    texts = rewards.reward_texts(tokenizer, prompts, completions)
    out: list[list[int]] = []
    for i in range(0, len(texts), 1024):  # batched tokenizer calls; no padding kept
        enc = rewards.encode(tokenizer, texts[i : i + 1024], max_length=1_000_000, device="cpu")
        lengths = enc["attention_mask"].sum(1).tolist()
        out += [row[:n] for row, n in zip(enc["input_ids"].tolist(), lengths)]
    return out


def _tokenized(ds, tokenizer, max_length: int):
    """The pre-tokenised pairs TRL's RewardTrainer takes (chosen_ids, rejected_ids); pairs longer
    than max_length are dropped, as TRL does."""
    import datasets

    prompts = list(ds["prompt"])
    chosen = _token_ids(tokenizer, prompts, list(ds["chosen"]))
    rejected = _token_ids(tokenizer, prompts, list(ds["rejected"]))
    keep = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if len(c) <= max_length and len(r) <= max_length]
    if not keep:
        from alignkit.errors import UserError

        raise UserError(f"every pair is longer than train.max_length={max_length} tokens: raise --max-length")
    return datasets.Dataset.from_dict(
        {"chosen_ids": [chosen[i] for i in keep], "rejected_ids": [rejected[i] for i in keep]}
    )


def _reward_args(cfg: RMConfig, run, bf16: bool, max_length: int):
    from trl import RewardConfig

    from alignkit.trainers import _hf

    return RewardConfig(
        **_hf.training_args(cfg, run, bf16=bf16),
        max_length=max_length,
        disable_dropout=True,
        eval_strategy="no",
        remove_unused_columns=False,
    )


# ------------------------------------------------------------------------------------- run


def run(cfg: RMConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """`alignkit rm`: one Bradley–Terry reward model through TRL's RewardTrainer."""
    import torch
    from transformers import set_seed
    from trl import RewardTrainer

    from alignkit import models, rewards
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup ---------------------------------------------------------------------------------------
    dropped: dict[str, int] = {}
    train_ds, eval_ds = _pairs(cfg, dropped)
    ood_ds = _ood(cfg)
    set_seed(cfg.train.seed)  # the new scalar head is initialised from the global RNG
    lora = models.LoraSpec(**cfg.model.lora.model_dump(exclude={"enabled"})) if cfg.model.lora.enabled else None
    model, tokenizer = models.load_sequence_classifier(
        cfg.model.name, num_labels=1, dtype=cfg.model.dtype, device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code, lora=lora,
        load_in_4bit=cfg.model.load_in_4bit, placement=models.launch_placement(),
        attn_implementation=cfg.model.attn_implementation,
    )
    trainable, total = models.trainable_parameters(model)
    bf16 = models.training_dtype(model) == torch.bfloat16
    max_length = _hf.cap_max_length(cfg.train.max_length, model)
    train_tokens = _tokenized(train_ds, tokenizer, max_length)
    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    args = _reward_args(cfg, run_dir, bf16, max_length)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_tokens,
        processing_class=tokenizer, callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])],
    )
    models.adapters_in_compute_dtype(trainer.model)  # QLoRA: TRL made the adapter and head bf16
    _count_too_long(cfg, dropped, len(train_ds), trainer, run_dir)

    # -- train ---------------------------------------------------------------------------------------
    result, parallel = _hf.fit(trainer, run_dir)

    # -- save + evaluate ---------------------------------------------------------------------------------
    metrics = _hf.save_final(trainer, tokenizer, run_dir, title=f"reward model {cfg.model.name}")
    if is_main:  # scorers read it back: a model is scored on inputs of the length it was trained on
        (run_dir.path("model") / rewards.REWARD_CONFIG).write_text(json.dumps({"max_length": max_length}))
    summary: dict[str, Any] = {
        "command": cfg.command, "model": cfg.model.name, "train_pairs": len(trainer.train_dataset),
        "dropped_rows": dropped,
        **_hf.training_summary(trainer, result, metrics, trainable, total),
        "lora": cfg.model.lora.enabled,
    }
    if parallel:
        summary["data_parallel"] = parallel
    if is_main:
        scorer = rewards.RewardModelScorer(
            trainer.model, tokenizer, batch_size=cfg.eval.batch_size, max_length=max_length
        )
        summary["eval"] = (evaluate_reward_model(scorer, eval_ds, ood_ds, run_dir.path("plots"), cfg.eval.n_bins)
                           if eval_ds else {})
    trainer.accelerator.wait_for_everyone()
    final = run_dir.finish(summary, readme=_readme(cfg, summary))
    summary["output_dir"] = str(final)
    return summary


def _readme(cfg: RMConfig, summary: dict[str, Any]) -> str:
    from alignkit.runs import run_readme

    ev = summary.get("eval") or {}
    return run_readme(
        f"{cfg.command} run",
        f"Backbone `{cfg.model.name}`, data `{cfg.data.source}`.",
        ev and f"Held-out accuracy {ev['accuracy']:.3f}, ECE (UP-RLHF eq. 18) {ev['ece']:.3f}.",
        "Score with it: `alignkit.rewards.load_scorer('<this dir>')`.",
    )


# ------------------------------------------------------------------------------------ evaluation


def evaluate_reward_model(scorer, pairs, ood, plots_dir: Path | None = None, n_bins: int = 15) -> dict[str, Any]:
    """UP-RLHF's reward-model evaluation of any Scorer on held-out pairs (+ an OOD set of completions).

    accuracy and ECE from d = r̄(y_w) − r̄(y_l) (eqs. 17–19); for comparison the standard ECE
    (Guo et al. 2017) of the same rescaled probability p = σ(s·d), so that the two differ only in
    how the bins are scored, not in the probabilities; mean uncertainty (eq. 13) on the in-distribution completions
    (chosen and rejected) vs the OOD completions, and the AUROC of uncertainty at telling OOD
    (positive) from in-distribution (negative).
    """
    import torch

    from alignkit import losses

    prompts = list(pairs["prompt"])
    sw = scorer.score(prompts, list(pairs["chosen"]))
    sl = scorer.score(prompts, list(pairs["rejected"]))
    d = sw.mean - sl.mean
    cal = losses.calibration(d, n_bins=n_bins)
    result: dict[str, Any] = {
        "pairs": len(prompts),
        "accuracy": float(cal["accuracy"]),
        "ece": float(cal["ece"]),
        "ece_standard": float(losses.ece_standard(torch.sigmoid(cal["scale"] * d), n_bins=n_bins)["ece"]),
        "reward_margin_mean": float(d.mean()),
    }
    u_in = torch.cat([sw.uncertainty, sl.uncertainty])
    result["uncertainty_in_dist"] = float(u_in.mean())
    if ood is not None and len(ood):
        so = scorer.score(list(ood["prompt"]), list(ood["completion"]))
        result["uncertainty_ood"] = float(so.uncertainty.mean())
        result["ood_uncertainty_ratio"] = result["uncertainty_ood"] / max(result["uncertainty_in_dist"], 1e-12)
        single = bool(u_in.abs().max() == 0 and so.uncertainty.abs().max() == 0)
        result["ood_auroc"] = None if single else float(losses.auroc(u_in, so.uncertainty))
        result["ood_reward_mean"] = float(so.mean.mean())
        result["in_dist_reward_mean"] = float(torch.cat([sw.mean, sl.mean]).mean())
    if plots_dir is not None:
        reliability_diagram(cal["bins"], Path(plots_dir) / "reliability.png", result)
    return result


def reliability_diagram(bins: list[dict[str, Any]], path: Path, result: dict[str, Any]) -> None:
    from alignkit.runs import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(4.2, 4.2))
    used = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax.bar([b["lo"] for b in used], [b["acc"] for b in used], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="ACC(B)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.scatter([b["conf"] for b in used], [b["acc"] for b in used], s=12, color="black", zorder=3, label="CONF(B)")
    ax.set_xlabel("predicted P(y_w ≻ y_l)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"acc {result['accuracy']:.3f}, ECE {result['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------- rm-ensemble


MEMBERS_CHECKPOINT = "ensemble_members.safetensors"


def _ensemble_trainer_cls():
    """RewardTrainer with eq. 12 as its loss (built lazily: importing trl is slow)."""
    import contextlib

    import torch
    from trl import RewardTrainer

    from alignkit import losses

    class EnsembleRewardTrainer(RewardTrainer):
        def __init__(self, *args, ensemble, ens: EnsembleSection, **kwargs):
            self.ensemble, self.ens = ensemble, ens
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            # all N members for chosen and rejected in one go: (N, 2B)
            r = self._members(model, inputs["input_ids"], inputs["attention_mask"])
            r_w, r_l = r.chunk(2, dim=1)
            out = losses.ensemble_reward_loss(
                r_w, r_l, self.ensemble.lora_A_by_module(), self.ens.lam, self.ens.member_loss
            )
            with torch.no_grad():
                m = self._metrics[mode]
                gather = self.accelerator.gather_for_metrics
                m["bt"].append(gather(out["bt"].detach()).mean().item())
                m["nnm"].append(gather(out["nnm"].detach()).mean().item())
                m["accuracy"].append(gather((r_w.mean(0) > r_l.mean(0)).float().mean()).mean().item())
                m["uncertainty"].append(gather(losses.uncertainty(r).mean()).mean().item())
            return (out["loss"], r) if return_outputs else out["loss"]

        # Checkpoints: peft's own save/load handles one active adapter; the ensemble's trainable
        # state is every member's LoRA weights and head, saved and restored as one safetensors file.
        def _save(self, output_dir=None, state_dict=None):
            from safetensors.torch import save_file

            target = Path(output_dir or self.args.output_dir)
            target.mkdir(parents=True, exist_ok=True)
            params = {n: p.detach().cpu().contiguous() for n, p in self.ensemble.model.named_parameters()
                      if p.requires_grad}
            save_file(params, str(target / MEMBERS_CHECKPOINT))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from safetensors.torch import load_file

            saved = load_file(str(Path(resume_from_checkpoint) / MEMBERS_CHECKPOINT))
            params = dict(self.ensemble.model.named_parameters())
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)

        def _members(self, model, input_ids, attention_mask):
            """(N, 2B) member rewards. With several processes the forward must go through the DDP
            wrapper once per step, so it is peft's mixed-adapter batch; in one process `auto` takes
            the loop over members (measured 2x faster per training step on CPU, docs/rewards.md). The
            shared variants are those two with the unadapted trunk run once (the same work without one)."""
            n, b = len(self.ensemble.names), input_ids.shape[0]
            mode = self.ens.forward
            if mode == "auto":  # loop measured 2x faster per step on CPU; one large launch suits GPUs
                cpu = input_ids.device.type == "cpu"
                mode = "shared-loop" if cpu and self.accelerator.num_processes == 1 else "shared"
            if mode in ("loop", "shared-loop") or model is self.ensemble.model:
                return self.ensemble.forward(input_ids, attention_mask, mode=mode)
            model.eval()  # peft allows adapter_names only in eval mode; dropout is off anyway
            try:
                names = [name for name in self.ensemble.names for _ in range(b)]
                ids, mask = input_ids.repeat(n, 1), attention_mask.repeat(n, 1)
                with (self.ensemble.trunk(b) if mode == "shared" else contextlib.nullcontext(),
                      self.ensemble.pooled(ids, mask)):
                    out = model(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=False)
            finally:
                model.train()
            return out.logits.view(n, b)

    return EnsembleRewardTrainer


def run_ensemble(cfg: RMEnsembleConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """`alignkit rm-ensemble`: the diverse reward-LoRA ensemble of UP-RLHF (eq. 12)."""
    import torch
    from transformers import set_seed

    from alignkit import models, rewards
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup ---------------------------------------------------------------------------------------
    dropped: dict[str, int] = {}
    train_ds, eval_ds = _pairs(cfg, dropped)
    ood_ds = _ood(cfg)
    ens = cfg.ensemble
    seeds = ens.seeds or [cfg.train.seed + n for n in range(ens.n_members)]
    lora = models.LoraSpec(**cfg.model.lora.model_dump(exclude={"enabled", "layers_to_transform"}))
    set_seed(cfg.train.seed)  # the base's new scalar head (copied into every member) uses the global RNG
    ensemble = rewards.RewardEnsemble.build(
        cfg.model.name, n_members=ens.n_members, lora=lora, seeds=seeds, dtype=cfg.model.dtype,
        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code, max_length=cfg.train.max_length,
        layers_to_transform=cfg.model.lora.layers_to_transform, load_in_4bit=cfg.model.load_in_4bit,
    )
    tokenizer = ensemble.tokenizer
    trainable, total = ensemble.trainable_parameters()
    bf16 = models.training_dtype(ensemble.model) == torch.bfloat16
    max_length = _hf.cap_max_length(cfg.train.max_length, ensemble.model)
    train_tokens = _tokenized(train_ds, tokenizer, max_length)
    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    trainer = _ensemble_trainer_cls()(
        model=ensemble.model, args=_reward_args(cfg, run_dir, bf16, max_length),
        train_dataset=train_tokens, processing_class=tokenizer,
        callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])], ensemble=ensemble, ens=ens,
    )
    models.adapters_in_compute_dtype(trainer.model)  # QLoRA: TRL made the members' adapters and heads bf16
    _count_too_long(cfg, dropped, len(train_ds), trainer, run_dir)

    # -- train ---------------------------------------------------------------------------------------
    result, parallel = _hf.fit(trainer, run_dir)

    # -- save + evaluate ---------------------------------------------------------------------------------
    summary: dict[str, Any] = {
        "command": cfg.command, "model": cfg.model.name, "train_pairs": len(trainer.train_dataset),
        "dropped_rows": dropped,
        "n_members": ens.n_members, "lam": ens.lam, "member_loss": ens.member_loss, "seeds": seeds,
        **_hf.training_summary(trainer, result, run_dir.read_metrics(), trainable, total),
    }
    if parallel:
        summary["data_parallel"] = parallel
    if is_main:
        import shutil

        # per-member offsets on (up to 512) training pairs' completions: see EnsembleScorer.offsets
        sub = train_ds.select(range(min(512, len(train_ds))))
        prompts = list(sub["prompt"]) * 2
        members = ensemble.score(prompts, list(sub["chosen"]) + list(sub["rejected"]), mode="shared-loop")
        ensemble.info["member_offsets"] = members.mean(dim=1).tolist()
        summary["member_offsets"] = ensemble.info["member_offsets"]
        ensemble.save(run_dir.work, metadata={"config": cfg.model_dump(mode="json"), "steps": summary["steps"]})
        shutil.rmtree(run_dir.path("checkpoints"), ignore_errors=True)
        scorer = rewards.EnsembleScorer(ensemble, mode="auto", batch_size=cfg.eval.batch_size)
        summary["eval"] = (evaluate_reward_model(scorer, eval_ds, ood_ds, run_dir.path("plots"), cfg.eval.n_bins)
                           if eval_ds else {})
        summary["eval"]["scoring_timings"] = getattr(scorer, "timings", {})
        _hf.loss_plot(run_dir.read_metrics(), run_dir.path("plots", "loss.png"), keys=("loss", "bt", "nnm"),
                      title=f"reward ensemble N={ens.n_members}, λ={ens.lam}")
    trainer.accelerator.wait_for_everyone()
    final = run_dir.finish(summary, readme=_readme(cfg, summary))
    summary["output_dir"] = str(final)
    return summary


def run_eval(run: str, output_dir: str | None = None, overwrite: bool = False, data_source: str | None = None,
             ood_source: str | None = None, max_samples: int | None = None, n_bins: int = 15,
             seed: int = 0) -> dict[str, Any]:
    """`alignkit rm eval` / `alignkit rm-ensemble eval`: evaluate a saved reward model or ensemble.

    Default data: the run's own held-out split (same source, seed and eval_fraction as in training)
    and its OOD set. Writes a run directory of its own (summary.json, plots/reliability.png).
    """
    import yaml

    from alignkit import data, rewards
    from alignkit.errors import UserError
    from alignkit.runs import RunDir, checked_output

    if n_bins < 2:
        raise UserError(f"--bins must be at least 2 (got {n_bins})")
    run_path = Path(run)
    cfg_file = run_path / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run}: not a finished alignkit rm / rm-ensemble run directory (no config.yaml)")
    try:
        tree = yaml.safe_load(cfg_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        tree = None
    command = tree.get("command") if isinstance(tree, dict) else None
    if command not in ("rm", "rm-ensemble"):
        what = f"an `alignkit {command}` run" if isinstance(command, str) else "not an alignkit run"
        raise UserError(f"{run} is {what}; rm eval needs a run of alignkit rm or rm-ensemble")
    try:
        cfg = (RMEnsembleConfig if command == "rm-ensemble" else RMConfig).model_validate(tree)
    except ValueError as exc:  # pydantic's ValidationError
        raise UserError(f"{cfg_file}: not a valid {command} config ({str(exc).splitlines()[0]})") from None
    out = checked_output(output_dir, overwrite, f"{cfg.command}-eval")
    scorer = rewards.load_scorer(str(run_path), trust_remote_code=cfg.model.trust_remote_code)
    if data_source:
        pairs, _ = data.load(data_source, kind="pairwise", max_samples=max_samples, seed=seed)
    else:
        _, pairs = _pairs(cfg)
        if pairs is None:
            raise UserError(f"{run}: trained without a held-out split; pass --data PAIRS to evaluate on")
    if ood_source is not None:
        cfg.eval.ood_source = ood_source or None
    ood = _ood(cfg)
    settings = {"command": f"{cfg.command} eval", "run": str(run_path), "data": data_source or "held-out split",
                "ood": cfg.eval.ood_source, "n_bins": n_bins}
    run_dir = RunDir.open(out, overwrite, False, yaml.safe_dump(settings, sort_keys=False))
    result = evaluate_reward_model(scorer, pairs, ood, run_dir.path("plots"), n_bins)
    result["scoring_timings"] = getattr(scorer, "timings", {})
    final = run_dir.finish({**settings, **result})
    return {**settings, **result, "output_dir": str(final)}
