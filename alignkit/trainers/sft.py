"""Supervised fine-tuning (step 1 of the RLHF pipeline): cross-entropy on
demonstrations, through TRL's `SFTTrainer`, full fine-tuning or LoRA.

Setup → train → save, top to bottom. Prompt/completion data is trained on the completion tokens only
(TRL's `completion_only_loss`), with EOS appended by TRL so the policy learns to stop. Rows whose
prompt alone fills `max_length` are dropped, counted and reported (summary.json `dropped_rows`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from alignkit.config import DataSection, JobConfig, TrainSection


class SFTDataSection(DataSection):
    source: str = "builtin:sft"


class SFTTrainSection(TrainSection):
    learning_rate: float = Field(2e-5, gt=0.0, description="TRL SFTConfig default")
    completion_only_loss: bool = Field(True, description="prompt/completion data: loss on completion tokens only")
    packing: bool = Field(False, description="pack short sequences into max_length blocks")


class SFTConfig(JobConfig):
    command: str = "sft"
    data: SFTDataSection = Field(default_factory=SFTDataSection)
    train: SFTTrainSection = Field(default_factory=SFTTrainSection)


def run(cfg: SFTConfig, callbacks: list | None = None, progress: Any | None = None) -> dict[str, Any]:
    """Train; returns the summary (also written to summary.json). `callbacks` are extra TrainerCallbacks."""
    import torch
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from alignkit import data, models
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir
    from alignkit.trainers import _hf

    out, is_main = _hf.begin(cfg)

    # -- setup: data and model are loaded (and validated) before anything is written -------------
    dropped: dict[str, int] = {}
    ds, _ = data.load_source(cfg.data, expected=("sft",), dropped=dropped)
    set_seed(cfg.train.seed)  # LoRA A matrices are initialised from the global RNG
    model, tokenizer = models.load_causal_lm(
        cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code,
        lora=models.LoraSpec(**cfg.model.lora.model_dump(exclude={"enabled"})) if cfg.model.lora.enabled else None,
        load_in_4bit=cfg.model.load_in_4bit, placement=models.launch_placement(),
        attn_implementation=cfg.model.attn_implementation,
    )
    trainable, total = models.trainable_parameters(model)
    max_length = _hf.cap_max_length(cfg.train.max_length, model)
    completion_only = "prompt" in ds.column_names and cfg.train.completion_only_loss
    if completion_only and not cfg.train.packing:  # else TRL drops them without a word
        rows_in = len(ds)
        ds, too_long = data.drop_too_long(ds, tokenizer, max_length)
        dropped |= data.note_dropped(cfg.data.source, rows_in, {"too_long": too_long})
    splits = data.train_eval_split(ds, cfg.data)
    bf16 = models.training_dtype(model) == torch.bfloat16  # as TRL: bf16 weights train under bf16 autocast

    run_dir = RunDir.open(out, cfg.output.overwrite, cfg.output.resume, to_yaml(cfg), is_main=is_main)
    args = TRLSFTConfig(
        **_hf.training_args(cfg, run_dir, bf16=bf16),
        max_length=max_length,
        completion_only_loss=cfg.train.completion_only_loss if "prompt" in ds.column_names else None,
        packing=cfg.train.packing,
        eval_strategy=_hf.eval_strategy(cfg, splits["eval"]),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["eval"],
        processing_class=tokenizer,
        callbacks=[_hf.RunDirMetrics(run_dir, progress), *(callbacks or [])],
    )
    models.adapters_in_compute_dtype(trainer.model)  # QLoRA: TRL made the adapter bf16

    # -- train ---------------------------------------------------------------------------------------
    result, parallel = _hf.fit(trainer, run_dir)

    # -- save ------------------------------------------------------------------------------------
    metrics = _hf.save_final(trainer, tokenizer, run_dir, title=f"SFT {cfg.model.name}")
    summary = {
        "command": "sft",
        "model": cfg.model.name,
        "train_rows": len(splits["train"]),
        "dropped_rows": dropped,
        **_hf.training_summary(trainer, result, metrics, trainable, total),
        "lora": cfg.model.lora.enabled,
    }
    if parallel:
        summary["data_parallel"] = parallel
    final = run_dir.finish(summary, readme=_readme(cfg, summary))
    summary["output_dir"] = str(final)
    return summary


def _readme(cfg: SFTConfig, summary: dict[str, Any]) -> str:
    from alignkit.runs import run_readme

    return run_readme(
        "SFT run",
        f"Base model: `{cfg.model.name}`; data: `{cfg.data.source}`; "
        f"{'LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled else 'full fine-tuning'}.",
        f"Steps: {summary['steps']}, mean training loss {summary['train_loss']:.4f}.",
        "Load the policy with `alignkit generate --model <this dir>/model` or "
        "`AutoModelForCausalLM.from_pretrained('<this dir>/model')` "
        "(LoRA runs save a peft adapter: `PeftModel.from_pretrained`).",
    )
