"""The training commands' flags, declared once and generated from the config classes.

`SHARED` maps each shared flag to its dotted config key; each command adds its own (`extra`).
`training_command` builds a typer command from them: one option per flag whose key the command's
config class has, its help the config field's description (the shared `config.JobConfig` blocks
for shared flags, the command's class for its own), with the command's default and choices.
The command receives `{dotted key: value}` for the flags that were given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from rich.markup import escape

from alignkit.cli.common import DryOpt, RecipeOpt, SetOpt
from alignkit.config import JobConfig


def _columns(text: str) -> dict[str, str]:
    from alignkit.data import parse_columns

    return parse_columns(text)


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its parameter name, config key, option names and type."""

    name: str
    key: str
    decls: tuple[str, ...]
    type: type
    help: str | None = None  # None: the config field's description
    convert: Callable[[Any], Any] | None = None  # command-line text -> config value


SHARED: tuple[Flag, ...] = (
    Flag("model", "model.name", ("--model", "-m"), str),
    Flag("data", "data.source", ("--data", "-d"), str, "file, saved dataset dir, hub id or builtin:KIND"),
    Flag("kind", "data.kind", ("--kind",), str),
    Flag("columns", "data.columns", ("--columns",), str, "column mapping: prompt=question,chosen=resp_j", _columns),
    Flag("max_samples", "data.max_samples", ("--max-samples",), int),
    Flag("skip_invalid", "data.skip_invalid", ("--skip-invalid",), bool),
    Flag("output_dir", "output.dir", ("--output-dir", "-o"), str),
    Flag("overwrite", "output.overwrite", ("--overwrite",), bool),
    Flag("resume", "output.resume", ("--resume",), bool),
    Flag("lr", "train.learning_rate", ("--lr",), float),
    Flag("epochs", "train.epochs", ("--epochs",), float),
    Flag("max_steps", "train.max_steps", ("--max-steps",), int),
    Flag("batch_size", "train.batch_size", ("--batch-size",), int),
    Flag("grad_accum", "train.grad_accum", ("--grad-accum",), int),
    Flag("max_length", "train.max_length", ("--max-length",), int),
    Flag("seed", "train.seed", ("--seed",), int),
    Flag("lora", "model.lora.enabled", ("--lora/--no-lora",), bool),
    Flag("lora_r", "model.lora.r", ("--lora-r",), int),
    Flag("dtype", "model.dtype", ("--dtype",), str),
    Flag("device", "model.device", ("--device",), str),
    Flag("trust_remote_code", "model.trust_remote_code", ("--trust-remote-code",), bool),
    Flag("load_in_4bit", "model.load_in_4bit", ("--load-in-4bit",), bool),
    Flag("num_processes", "launch.num_processes", ("--num-processes",), int),
    Flag("accelerate_config", "launch.accelerate_config", ("--accelerate-config",), str),
    Flag("report_to", "output.report_to", ("--report-to",), str),
    Flag("push_to_hub", "output.push_to_hub", ("--push-to-hub",), str),
)


def _field(cls: Any, key: str) -> tuple[Any, Any] | None:
    """(FieldInfo, default value) of dotted `key` in config class `cls`, or None when it has no such key."""
    *sections, last = key.split(".")
    default: Any = None
    for part in sections:
        field = cls.model_fields.get(part)
        if field is None:
            return None
        default = field.get_default(call_default_factory=True)
        cls = type(default)
    field = cls.model_fields.get(last)
    if field is None:
        return None
    return field, field.get_default(call_default_factory=True)


def _choices(annotation: Any) -> list[Any]:
    """The values of a Literal annotation (also inside `Literal[...] | None`)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [c for a in get_args(annotation) for c in _choices(a)]


def _help(flag: Flag, cfg_cls: Any) -> str:
    """The flag's help: its description, the choices of a Literal field, the command's default."""
    field, default = _field(cfg_cls, flag.key)  # type: ignore[misc]
    shared = _field(JobConfig, flag.key)
    text = flag.help or (shared[0] if shared else field).description or flag.key
    choices = _choices(field.annotation)
    if choices and not all(str(c) in text for c in choices):
        text += f"; one of {', '.join(map(str, choices))}"
    if default is not None and not isinstance(default, bool | dict) and flag.convert is None:
        text += f" (default {default})"
    return escape(text)


def training_command(
    command: str,
    doc: str,
    handler: Callable[[str, Any, list[str] | None, dict[str, Any], bool], None],
    extra: tuple[Flag, ...] = (),
    without: tuple[str, ...] = (),
    subcommands: bool = False,
) -> Callable[..., None]:
    """A typer command for `command`: --recipe, --set, the flags its config class has, --dry-run.

    It calls `handler(command, recipe, sets, {key: value of each flag given}, dry_run)`. With
    `subcommands` it is a group's callback that does nothing when a subcommand (`rm eval`) runs."""
    from alignkit.trainers import config_class

    cfg_cls = config_class(command)
    flags = [f for f in (*SHARED, *extra) if f.name not in without and _field(cfg_cls, f.key) is not None]
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)] if subcommands else []
    params += [
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RecipeOpt),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
    ]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[f.type | None, typer.Option(*f.decls, help=_help(f, cfg_cls))])
        for f in flags
    ]
    params.append(inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DryOpt))

    def run_command(**kw: Any) -> None:
        ctx = kw.get("ctx")
        if ctx is not None and ctx.invoked_subcommand:
            return
        given = {f.key: (f.convert(kw[f.name]) if f.convert else kw[f.name]) for f in flags if kw[f.name] is not None}
        handler(command, kw["recipe"], kw["set_"], given, kw["dry_run"])

    run_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run_command.__name__ = command.replace("-", "_")
    run_command.__doc__ = doc
    return run_command
