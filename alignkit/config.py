"""Typed configuration shared by every trainer: model, data, LoRA, training, output and launch blocks.

A job config is a pydantic model; a recipe is the same model written as YAML. Values come from (in
increasing priority) the defaults below, a recipe file, `key=value` overrides, and command-line flags.
Unknown keys are rejected with the closest valid name; cross-field checks live in one validator per
config and raise a clear error (never an `assert`, never a silent change).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from alignkit.errors import UserError, closest

Kind = Literal["sft", "pairwise", "unpaired", "prompts", "scored"]


def _yaml_on_off(value: Any) -> Any:
    """YAML reads an unquoted `chat: on` / `chat: off` as true / false: they mean on / off."""
    return ("on" if value else "off") if isinstance(value, bool) else value


# `chat:` of every config that samples (docs/models.md#chat-templates)
ChatMode = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]
CHAT_HELP = ("chat template for plain prompts: auto (when the tokenizer has one; not for builtin: prompts), on, off; "
             "message prompts always use it (docs/models.md#chat-templates)")


def _plain_types(annotation: Any) -> set[Any]:
    """{int, NoneType} for `int | None`, {bool} for `bool`: the plain types a field annotation allows."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _plain_types(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return set().union(*(_plain_types(a) for a in get_args(annotation)))
    return {annotation}


class Block(BaseModel):
    """Base of every config block: unknown keys are errors, assignments are validated, numbers are
    finite, and true/false is never read as a number (nor a number as true/false)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixup(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as 1 and `1` as true; a typo here would train on a wrong value."""
        allowed = _plain_types(cls.model_fields[info.field_name].annotation)
        numeric = allowed & {int, float}
        if isinstance(value, bool) and numeric and bool not in allowed:
            raise PydanticCustomError("bool_for_number", "expected a number, not true/false")
        if isinstance(value, int | float) and not isinstance(value, bool) and bool in allowed and not numeric:
            raise PydanticCustomError("number_for_bool", "expected true or false, not a number")
        return value


class LoraSection(Block):
    """LoRA adapter options (peft). `enabled: false` means full fine-tuning."""

    enabled: bool = Field(False, description="train a LoRA adapter instead of all weights")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description='modules to adapt: "all-linear" or a list of module names'
    )


class ModelSection(Block):
    name: str = Field("tiny", description="alias (see `alignkit models`), hub id, local directory, or tiny")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on a capable GPU, fp32 on CPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model (off by default)")
    load_in_4bit: bool = Field(
        False, description="QLoRA: 4-bit NF4 base weights under the LoRA adapter (a CUDA GPU, or a CPU with "
        "bitsandbytes>=0.46.1; pip install 'alignkit[qlora]')")
    attn_implementation: str | None = Field(
        None, description="attention kernel passed to from_pretrained: eager, sdpa, flash_attention_2, ... "
        "(default: transformers' choice)")
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _4bit_needs_lora(self) -> ModelSection:
        if self.load_in_4bit and not self.lora.enabled:
            raise ValueError("model.load_in_4bit: 4-bit weights cannot be trained in full; add --lora "
                             "(model.lora.enabled=true) to train a LoRA adapter on them (QLoRA)")
        return self


class DataSection(Block):
    source: str = Field(
        "builtin:sft",
        description="a .jsonl/.json/.csv/.parquet file, a saved HF dataset dir, a hub id, or builtin:<kind>",
    )
    kind: Kind | None = Field(None, description="dataset kind; detected from the columns when omitted")
    columns: dict[str, str] = Field(default_factory=dict, description="canonical=source column mapping")
    split: str = Field("train", description="split to read from a dataset dict or hub dataset")
    max_samples: int | None = Field(None, ge=1, description="use only the first N rows")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out fraction for evaluation")
    seed: int = Field(0, ge=0, description="seed of the built-in data and of the train/eval split")
    skip_invalid: bool = Field(False, description="drop the rows the validator refuses (an empty reply, a null "
                               "field), counted per reason in summary.json's dropped_rows; false: the first stops "
                               "the run with its row number")


class TrainSection(Block):
    learning_rate: float = Field(2e-5, gt=0.0, description="learning rate")
    epochs: float = Field(1.0, gt=0.0, description="training epochs")
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: run all epochs)")
    batch_size: int = Field(8, ge=1, description="per-device batch size")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: str = Field("linear", description="transformers scheduler name")
    max_length: int = Field(512, ge=8, description="truncate tokenised sequences to this length")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip the gradient norm to this (0: no clipping)")
    optim: str | None = Field(None, description="transformers optimizer name, e.g. adamw_torch, adamw_8bit "
                              "(default: transformers' own)")
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: once per epoch); "
                                   "needs data.eval_fraction > 0")
    save_steps: int = Field(
        500, ge=0, description="checkpoint every N steps for --resume (0: none; a resumed run restarts)"
    )
    save_total_limit: int | None = Field(None, ge=1, description="keep only the newest N checkpoints while training")
    seed: int = Field(42, ge=0, description="training seed")


class OutputSection(Block):
    dir: str | None = Field(None, description="run directory (default runs/<command>-<timestamp>)")
    overwrite: bool = Field(False, description="replace an existing run directory")
    resume: bool = Field(False, description="continue an interrupted run from its last checkpoint")
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = Field(
        "none", description="also log metrics to this tracker (metrics.jsonl is always written)"
    )
    push_to_hub: str | None = Field(
        None, description="hub repo (user/name) to upload the finished run to, with a model card"
    )


class LaunchSection(Block):
    num_processes: int = Field(1, ge=1, description="data-parallel processes (re-launch via accelerate)")
    accelerate_config: Literal["ddp", "zero2", "zero3", "fsdp"] | None = Field(
        None, description="accelerate config shipped with TRL"
    )


class JobConfig(Block):
    """Fields every training job has. Each trainer subclasses it with its own `command` and options."""

    command: str
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="keys passed as they are to the command's TRL config (SFTConfig, DPOConfig, ...); docs/recipes.md",
    )

    @model_validator(mode="after")
    def _check_output(self) -> JobConfig:
        if self.output.overwrite and self.output.resume:
            raise ValueError("output.overwrite and output.resume exclude each other: pick one")
        return self

    @model_validator(mode="after")
    def _check_eval_steps(self) -> JobConfig:
        steps = getattr(self.train, "eval_steps", None)
        if steps and self.command in COMMAND_FIXES:
            raise ValueError(f"train.eval_steps: `alignkit {self.command}` evaluates once, at the end (its eval: "
                             "block): remove train.eval_steps")
        if steps and not self.data.eval_fraction:
            raise ValueError(f"train.eval_steps={steps}: there is no held-out split to evaluate: set "
                             "data.eval_fraction (e.g. 0.05)")
        return self

    @model_validator(mode="after")
    def _check_trainer(self) -> JobConfig:
        """The `trainer:` block: only for the commands built on a TRL config, and never a key alignkit
        sets from its own blocks (one place per setting). Its keys' names are checked against the TRL
        dataclass by `check_trainer_block` (that needs trl imported)."""
        if not self.trainer:
            return self
        if self.command not in TRL_CONFIGS:
            raise ValueError(f"trainer.{next(iter(self.trainer))}: `alignkit {self.command}` builds no TRL config "
                             f"to pass it to (only {', '.join(TRL_CONFIGS)} do): set its own keys instead "
                             f"(`alignkit {self.command} --help`, docs/recipes.md)")
        for key in self.trainer:
            why = ALIGNKIT_FIXES.get(key) or COMMAND_FIXES.get(self.command, {}).get(key)
            if why:
                raise ValueError(f"trainer.{key}: alignkit fixes it ({why}): remove it from trainer:")
            owner = ALIGNKIT_SETS.get(key) or COMMAND_SETS.get(self.command, {}).get(key)
            if owner:
                raise ValueError(f"trainer.{key}: alignkit sets it from {owner}: set that instead (docs/recipes.md)")
        return self


# ---------------------------------------------------------------- the trainer: passthrough block
# command -> its TRL config class (trl.<name>); the other commands are explicit loops
TRL_CONFIGS = {"sft": "SFTConfig", "rm": "RewardConfig", "rm-ensemble": "RewardConfig", "dpo": "DPOConfig",
               "kto": "KTOConfig"}
# TRL keys alignkit sets on every TRL config (trainers/_hf.py `training_args`) -> where a user sets them
ALIGNKIT_SETS = {
    "output_dir": "output.dir (--output-dir)",
    "learning_rate": "train.learning_rate (--lr)",
    "num_train_epochs": "train.epochs (--epochs)",
    "max_steps": "train.max_steps (--max-steps)",
    "per_device_train_batch_size": "train.batch_size (--batch-size)",
    "gradient_accumulation_steps": "train.grad_accum (--grad-accum)",
    "warmup_steps": "train.warmup_ratio",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.lr_scheduler",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optim",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "eval_strategy": "data.eval_fraction and train.eval_steps",
    "save_strategy": "train.save_steps (0: no checkpoints)",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "seed": "train.seed (--seed)",
    "max_length": "train.max_length (--max-length)",
    "bf16": "model.dtype (--dtype)",
    "fp16": "model.dtype (--dtype)",
    "use_cpu": "model.device (--device)",
    "report_to": "output.report_to (--report-to)",
    "push_to_hub": "output.push_to_hub (--push-to-hub, at the end of the run)",
    "hub_model_id": "output.push_to_hub (--push-to-hub, at the end of the run)",
    "resume_from_checkpoint": "output.resume (--resume)",
    "model_init_kwargs": "the model: block (alignkit loads the model itself)",
    "trust_remote_code": "model.trust_remote_code (--trust-remote-code)",
}
# TRL keys alignkit fixes because its contracts rely on them -> why
ALIGNKIT_FIXES = {
    "save_only_model": "--resume needs the optimiser state in every checkpoint",
    "logging_nan_inf_filter": "a NaN loss must reach the log, where the divergence guard stops the run",
    "disable_tqdm": "alignkit shows its own progress bar",
}
# the keys one command's trainer sets on top of ALIGNKIT_SETS (trainers/sft.py, preference.py, reward.py)
COMMAND_SETS = {
    "sft": {"packing": "train.packing", "completion_only_loss": "train.completion_only_loss"},
    "dpo": {"beta": "pref.beta (--beta)", "loss_type": "pref.loss (--loss)",
            "precompute_ref_log_probs": "pref.precompute_ref_log_probs (--precompute-ref)"},
    "kto": {"beta": "kto.beta (--beta)", "loss_type": "kto.loss (--loss)",
            "desirable_weight": "kto.desirable_weight", "undesirable_weight": "kto.undesirable_weight",
            "precompute_ref_log_probs": "kto.precompute_ref_log_probs (--precompute-ref)"},
}
# the keys one command's trainer fixes (trainers/reward.py) -> why
COMMAND_FIXES = {
    "rm": {"disable_dropout": "the Bradley-Terry loss compares two passes of the same weights",
           "remove_unused_columns": "the reward collator reads alignkit's own columns",
           "eval_strategy": "`alignkit rm` evaluates the model itself at the end (eval:)"},
}
COMMAND_FIXES["rm-ensemble"] = COMMAND_FIXES["rm"]
# TRL keys alignkit only gives a default: a `trainer:` value replaces it, with a printed note
ALIGNKIT_DEFAULTS = ("per_device_eval_batch_size", "dataloader_num_workers", "dataloader_pin_memory",
                     "ddp_find_unused_parameters", "logging_first_step", "data_seed", "run_name", "project")


def check_trainer_block(cfg: JobConfig) -> dict[str, Any]:
    """The `trainer:` keys, each checked against the fields of the command's TRL config dataclass
    (unknown key: one line with the closest field). Imports trl only when the block has keys."""
    if not cfg.trainer:
        return {}
    import dataclasses

    import trl

    cls = getattr(trl, TRL_CONFIGS[cfg.command])
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in cfg.trainer:
        if key not in names:
            hint = closest(key, names)
            match = hint.split('"')[1] if hint else ""
            owner = ALIGNKIT_SETS.get(match) or COMMAND_SETS.get(cfg.command, {}).get(match)
            hint += f": alignkit sets it from {owner}" if owner else ""
            raise UserError(f"trainer.{key}: not a field of trl.{cls.__name__} (`alignkit {cfg.command}`){hint}")
    return dict(cfg.trainer)


# --------------------------------------------------------------------------- building a config


def _section_class(model_cls: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The config block class at `path` (e.g. ('model', 'lora')), or None when that key is a plain value."""
    cls: Any = model_cls
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        ann = None if field is None else field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return None
    return cls


def _field_names(model_cls: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Valid keys at `path` inside `model_cls` (for 'did you mean' suggestions)."""
    section = _section_class(model_cls, tuple(str(p) for p in path))
    return list(section.model_fields) if section is not None else []


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], origin: str) -> str:
    """One line for the first problem of a pydantic error, with the closest valid key for typos."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = closest(str(loc[-1]), _field_names(model_cls, loc[:-1]))
        return f"{origin}: unknown key '{dotted}'{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # our validators name their fields themselves
        return f"{origin}: {msg}"
    got = first.get("input")
    return f"{origin}: {dotted}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})")


def parse_override(item: str) -> tuple[str, Any]:
    """'train.learning_rate=1e-4' -> ('train.learning_rate', 1e-4). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value (e.g. train.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def _as_section(model_cls: type[BaseModel], path: tuple[str, ...], value: Any, origin: str) -> Any:
    """A value given for a section: `model: NAME` is `model: {name: NAME}`; any other non-mapping is an error
    (it would otherwise be dropped without a word when a flag sets one of the section's keys)."""
    section = _section_class(model_cls, path)
    if section is None or isinstance(value, dict | BaseModel):
        return value
    dotted = ".".join(path)
    if issubclass(section, ModelSection) and isinstance(value, str):
        return {"name": value}
    example = next(iter(section.model_fields), "key")
    raise UserError(f"{origin}: '{dotted}' is a section of keys (e.g. {dotted}.{example}), not a value (got {value!r})")


def _check_sections(model_cls: type[BaseModel], tree: dict[str, Any], origin: str, path: tuple[str, ...] = ()) -> None:
    """Apply `_as_section` to every section of a recipe tree, nested ones included."""
    for key, value in list(tree.items()):
        if _section_class(model_cls, (*path, key)) is None:
            continue
        tree[key] = _as_section(model_cls, (*path, key), value, origin)
        if isinstance(tree[key], dict):
            tree[key] = dict(tree[key])
            _check_sections(model_cls, tree[key], origin, (*path, key))


def set_dotted(tree: dict[str, Any], key: str, value: Any, model_cls: type[BaseModel], origin: str = "config") -> None:
    """Set tree['a']['b'] = value for key 'a.b', checking each part against the config class."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts):
        valid = _field_names(model_cls, tuple(parts[:depth]))
        if valid and part not in valid:
            where = ".".join(parts[:depth]) or "the top level"
            raise UserError(f"unknown key '{key}': no '{part}' in {where}{closest(part, valid)}")
        path = tuple(parts[: depth + 1])
        if depth == len(parts) - 1:
            node[part] = _as_section(model_cls, path, value, origin)
        else:
            child = node.get(part)
            if child is None:
                child = {}
            elif isinstance(child, BaseModel):
                child = child.model_dump()
            else:
                child = _as_section(model_cls, path, child, origin)
            if not isinstance(child, dict):  # a plain value cannot hold keys (no section here)
                raise UserError(f"{origin}: '{'.'.join(path)}' holds a value ({child!r}), not keys: cannot set '{key}'")
            node[part] = child
            node = child


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML into a dict. The recipe must name its `command`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe '{path}' not found (see `alignkit recipes ls`)")
    try:
        tree = yaml.safe_load(read_text(p)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections (model:, data:, train: ...)")
    return tree


def read_text(path: Path) -> str:
    """A recipe's text; one clear error for a file that is not UTF-8 or cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}): save the recipe as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from None


def build_config(
    model_cls: type[JobConfig],
    recipe: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    origin: str = "config",
) -> JobConfig:
    """defaults < recipe < key=value overrides < flags (dotted keys whose value is not None)."""
    tree: dict[str, Any] = dict(recipe or {})
    _check_sections(model_cls, tree, origin)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value, model_cls, origin=f"--set {item}")
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value, model_cls, origin=origin)
    try:
        return model_cls.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_validation_error(err, model_cls, origin)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
