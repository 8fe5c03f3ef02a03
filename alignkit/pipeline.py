"""Pipeline recipes: a recipe whose `steps:` run existing commands in order into one directory.

`load` reads a pipeline (each step's config built, every `${step.output}` reference resolved to a path in
the pipeline's directory, overrides `step.key=value` routed to their step) and `plan` decides per step
run / resume / restart / skip: both check everything before anything runs and import no torch. `run`
executes the plan with a caller's step runner. Format, outputs and resume rules: docs/recipes.md#pipelines.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from alignkit.config import (
    CHAT_HELP,
    Block,
    ChatMode,
    DataSection,
    LaunchSection,
    ModelSection,
    OutputSection,
    build_config,
    parse_override,
)
from alignkit.errors import UserError, closest

PIPELINE = "pipeline"  # the `command:` of a pipeline recipe (optional in the file)
TOP_KEYS = ("command", "output", "steps")
OUTPUT_KEYS = ("dir", "overwrite", "resume")
STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
REFERENCE = re.compile(r"\$\{([^}]*)\}")
PLAN_FILE = "pipeline.yaml"  # the resolved pipeline, written into its directory when it starts

# What each command's run directory holds besides `dir` (the run directory itself), relative to it.
# A command not listed here (a trainer added later) has `model` = DIR/model, unless its config class
# declares its own `OUTPUTS`: a ClassVar dict of the same form, or a function of the step's config that
# returns one (e.g. sppo: {"model": f"iter-{cfg.sppo.iterations}/model"}).
OUTPUTS: dict[str, dict[str, str]] = {
    "sft": {"model": "model"},
    "rm": {"model": "model"},
    "rm-ensemble": {},  # the run directory is what a reward spec names (ppo.reward: ${rm-ensemble.dir})
    "dpo": {"model": "model"},
    "kto": {"model": "model"},
    "ppo": {"model": "model"},
    "quickstart": {"sft_model": "sft/model", "dpo_model": "dpo/model", "pairs": "pairs.jsonl"},
}
# commands whose run cannot continue from DIR.partial: an interrupted one is restarted on --resume
NOT_RESUMABLE = frozenset({"quickstart", "pairs"})


def is_pipeline(tree: dict[str, Any]) -> bool:
    """A recipe tree is a pipeline when it lists `steps:` (or says `command: pipeline`)."""
    return "steps" in tree or tree.get("command") == PIPELINE


def step_commands() -> list[str]:
    """The commands a step can run: every row of the trainer table (read on each call, so a new trainer
    such as sppo is a step command as soon as it is in the table) and the steps of `EXTRA_STEPS`."""
    from alignkit.trainers import TRAINERS

    return [*TRAINERS, *EXTRA_STEPS]


def step_config_class(command: str) -> Any:
    """The config class of a step command (a trainer's, or one of `EXTRA_STEPS`)."""
    from alignkit.trainers import config_class

    return EXTRA_STEPS[command][0] if command in EXTRA_STEPS else config_class(command)


def step_outputs(command: str, cfg: Any) -> dict[str, str]:
    """{output name: path relative to the step's run directory} of a step's config ('' is the directory)."""
    declared = getattr(type(cfg), "OUTPUTS", None)
    if callable(declared):
        declared = declared(cfg)
    extra = declared if isinstance(declared, dict) else OUTPUTS.get(command, {"model": "model"})
    return {"dir": "", **extra}


@dataclass
class Step:
    name: str
    command: str
    cfg: Any  # the step's validated config; output.dir is DIR/<name>
    outputs: dict[str, str]  # output name -> its path (DIR/<name>/...)
    inputs: dict[str, str] = field(default_factory=dict)  # "dotted.key" -> the "${step.output}" it came from

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output.dir)

    @property
    def partial(self) -> Path:
        from alignkit.runs import PARTIAL_SUFFIX

        return self.dir.with_name(self.dir.name + PARTIAL_SUFFIX)

    def finished(self) -> bool:
        return (self.dir / "summary.json").is_file()


@dataclass
class Pipeline:
    origin: str
    dir: Path
    steps: list[Step]
    overwrite: bool = False
    resume: bool = False
    command: str = PIPELINE

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise UserError(f"{self.origin}: no step '{name}'{closest(name, self.names)} (steps: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def to_tree(self) -> dict[str, Any]:
        """The resolved pipeline as written to DIR/pipeline.yaml and printed by --dry-run."""
        return {
            "command": PIPELINE, "output": {"dir": str(self.dir)},
            "steps": {s.name: s.cfg.model_dump(mode="json") for s in self.steps},
        }


# ------------------------------------------------------------------------------------- loading


def load(tree: dict[str, Any], origin: str, overrides: list[str] | None = None,
         flags: dict[str, Any] | None = None) -> Pipeline:
    """Build and check a pipeline from its recipe tree, `step.key=value` / `output.KEY=value` overrides and
    flags (`output.overwrite`, `output.resume` from the command line). Writes nothing, loads no model."""
    from alignkit.runs import default_dir

    for key in tree:
        if key not in TOP_KEYS:
            raise UserError(f"{origin}: unknown key '{key}' in a pipeline recipe{closest(str(key), TOP_KEYS)}: it "
                            f"holds {', '.join(TOP_KEYS)}; a step's settings go in its block under steps:")
    if tree.get("command", PIPELINE) != PIPELINE:
        raise UserError(f"{origin}: a recipe with steps: has 'command: {PIPELINE}' (got {tree['command']!r})")
    steps_tree = tree.get("steps")
    if not isinstance(steps_tree, dict) or not steps_tree:
        raise UserError(f"{origin}: 'steps' must be a mapping of named steps, e.g. steps: {{sft: {{...}}, dpo: "
                        "{model: ${sft.model}}}")
    output = tree.get("output") or {}
    if not isinstance(output, dict):
        raise UserError(f"{origin}: 'output' is a section of keys (output.dir), not a value (got {output!r})")
    output = dict(output)
    names = [str(n) for n in steps_tree]
    per_step: dict[str, list[str]] = {n: [] for n in names}
    for item in overrides or []:
        key, value = parse_override(item)  # refuses a malformed item with its own message
        head, _, rest = key.partition(".")
        if head == "output":
            output[rest] = value
        elif head in per_step and rest:
            per_step[head].append(f"{rest}={item.split('=', 1)[1]}")
        else:
            raise UserError(f"override '{item}': '{head}' is not a step of {origin}{closest(head, names)}: address a "
                            f"step's key as STEP.KEY=VALUE (steps: {', '.join(names)}) or set output.dir")
    for key, value in (flags or {}).items():
        if value:
            output[key.removeprefix("output.")] = value
    for key, value in output.items():
        if key not in OUTPUT_KEYS:
            raise UserError(f"{origin}: unknown key 'output.{key}'{closest(str(key), OUTPUT_KEYS)} (a pipeline's "
                            f"output holds {', '.join(OUTPUT_KEYS)})")
        ok = isinstance(value, str) if key == "dir" else isinstance(value, bool)
        if value is not None and not ok:
            raise UserError(f"{origin}: output.{key} must be {'a path' if key == 'dir' else 'true or false'} "
                            f"(got {value!r})")
    if output.get("overwrite") and output.get("resume"):
        raise UserError(f"{origin}: --overwrite and --resume exclude each other: pick one")
    root = Path(output.get("dir") or default_dir(PIPELINE))

    commands = step_commands()
    steps: list[Step] = []
    for i, (name, block) in enumerate(steps_tree.items()):
        name = str(name)
        where = f"{origin} step '{name}'"
        if not STEP_NAME.match(name) or name in TOP_KEYS:
            raise UserError(f"{where}: a step name is a letter then letters, digits, '-' or '_', and not "
                            f"{'/'.join(TOP_KEYS)}")
        block = {} if block is None else block
        if not isinstance(block, dict):
            raise UserError(f"{where}: a step is a mapping (command: and that command's sections), not {block!r}")
        block = dict(block)
        command = block.pop("command", name)
        if command not in commands:
            raise UserError(f"{where}: unknown command {command!r}{closest(str(command), commands)} (a step runs "
                            f"one of {', '.join(commands)}; name the step after it or give command:)")
        step_sets = per_step[name]
        if "output" in block or any(s.startswith("output") for s in step_sets):
            raise UserError(f"{where}: a step writes to DIR/{name} of the pipeline: set the pipeline's output.dir "
                            "(and --resume / --overwrite on the command line), not the step's output")
        known = {s.name: s for s in steps}
        later = names[i:]
        inputs: dict[str, str] = {}
        block = _substitute(block, (), known, later, where, inputs)
        step_sets = [_substitute(s, (s.split("=", 1)[0],), known, later, where, inputs) for s in step_sets]
        cfg_cls = step_config_class(command)
        step_tree = {**block, "command": command, "output": {"dir": str(root / name)}}
        try:
            cfg = build_config(cfg_cls, step_tree, step_sets, None, origin=where)
        except UserError as exc:
            raise UserError(str(exc) if where in str(exc) else f"{where}: {exc}") from None
        outputs = {k: str(root / name / rel) if rel else str(root / name)
                   for k, rel in step_outputs(command, cfg).items()}
        steps.append(Step(name, command, cfg, outputs, inputs))
    return Pipeline(origin, root, steps, bool(output.get("overwrite")), bool(output.get("resume")))


def resolve(ref: str, known: dict[str, Step], later: list[str], where: str) -> str:
    """The path `${step.output}` names: `known` are the steps before the one being read, `later` that step
    and the ones after it (a reference to them is refused: they have not run yet)."""
    step, _, out = ref.strip().partition(".")
    if step in later:
        raise UserError(f"{where}: ${{{ref}}} refers to step '{step}', which runs "
                        f"{'after it' if step != later[0] else 'as this step'}: a step can use the outputs of the "
                        f"steps before it only ({', '.join(known) or 'none'})")
    if step not in known:
        raise UserError(f"{where}: ${{{ref}}} names no step '{step}'{closest(step, known)} (steps before it: "
                        f"{', '.join(known) or 'none'}; a reference is ${{STEP.OUTPUT}}, e.g. ${{sft.model}})")
    outputs = known[step].outputs
    if out not in outputs:
        raise UserError(f"{where}: ${{{ref}}}: step '{step}' ({known[step].command}) has no output '{out}'"
                        f"{closest(out, outputs)} (its outputs: {', '.join(outputs)})")
    return outputs[out]


def _substitute(value: Any, path: tuple[str, ...], known: dict[str, Step], later: list[str], where: str,
                inputs: dict[str, str]) -> Any:
    """`value` with every `${step.output}` in its strings replaced by that path (recorded in `inputs`)."""
    if isinstance(value, dict):
        return {k: _substitute(v, (*path, str(k)), known, later, where, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, path, known, later, where, inputs) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    refs = REFERENCE.findall(value)
    if value.count("${") != len(refs):
        raise UserError(f"{where}: {value!r} has an unclosed '${{': a reference is ${{STEP.OUTPUT}}")
    for ref in refs:
        inputs[".".join(path)] = f"${{{ref}}}"
    return REFERENCE.sub(lambda m: resolve(m.group(1), known, later, where), value)


# ---------------------------------------------------------------------------------------- plan

RUN, RESUME, RESTART, SKIP = "run", "resume", "restart", "skip"


def plan(pipe: Pipeline, only: str | None = None) -> list[tuple[Step, str]]:
    """(step, action) for every step, or for step `only`; checks the pipeline directory and every step's run
    directory as the run-directory contract does (docs/launch.md#run-directory-safety), writing nothing.

    --resume: a finished step (DIR/<step>/summary.json) whose settings match is skipped, an interrupted one
    (DIR/<step>.partial) is resumed (restarted when its command cannot resume), the rest run; a finished
    step after one that must run again is refused (it was made from older inputs)."""
    from alignkit.config import to_yaml
    from alignkit.launch import rank_info
    from alignkit.runs import MARKER, RunDir, RunLock, check_resume, check_writable

    is_main = rank_info()["is_main"]
    steps = [pipe.step(only)] if only else pipe.steps
    if not only:
        check_writable(pipe.dir)
        RunLock.check_free(pipe.dir)  # another `alignkit run` on this pipeline
        nonempty = pipe.dir.is_dir() and any(pipe.dir.iterdir())
        if pipe.dir.exists() and not pipe.dir.is_dir():
            raise UserError(f"output.dir {pipe.dir} is a file: choose another output.dir")
        if nonempty and (pipe.overwrite or pipe.resume) and not _is_pipeline_dir(pipe.dir):
            raise UserError(f"{pipe.dir} is not an alignkit pipeline directory (no {MARKER}): choose another "
                            "output.dir (alignkit never deletes your files)")
        if pipe.resume and not pipe.dir.is_dir():
            raise UserError(f"nothing to resume: {pipe.dir} does not exist (drop --resume to start the pipeline)")
        if nonempty and not (pipe.overwrite or pipe.resume):
            raise UserError(f"{pipe.dir} already exists: pass --resume to continue it, --overwrite to replace it, "
                            "or choose another output.dir=")
    actions: list[tuple[Step, str]] = []
    rerun = None  # the first step that runs again: every finished step after it is stale
    for step in steps:
        if pipe.overwrite and not only:
            actions.append((step, RUN))  # the whole directory is replaced
            continue
        if pipe.resume and step.finished():
            if rerun is not None and not only:
                raise UserError(f"--resume: step '{step.name}' finished but step '{rerun}' before it runs again: "
                                f"its output would be stale; start again with --overwrite")
            try:
                check_resume(step.dir, to_yaml(step.cfg))
            except UserError as exc:
                raise UserError(f"step '{step.name}' finished with other settings: {exc}") from None
            actions.append((step, SKIP))
            continue
        action = RUN
        if pipe.resume and step.partial.is_dir():
            action = RESTART if step.command in NOT_RESUMABLE else RESUME
        elif only and pipe.overwrite:
            action = RESTART
        step.cfg.output.resume = action == RESUME
        step.cfg.output.overwrite = action == RESTART
        if is_main:  # the other ranks of a launched step would see the main rank's fresh DIR.partial
            RunDir.check(step.dir, step.cfg.output.overwrite, step.cfg.output.resume, to_yaml(step.cfg))
        rerun = rerun or step.name
        actions.append((step, action))
    if pipe.resume and not only and all(a == SKIP for _, a in actions):
        raise UserError(f"{pipe.dir} already finished: every step is done, nothing to resume (use a new output.dir)")
    return actions


def _is_pipeline_dir(path: Path) -> bool:
    """Does `path` hold alignkit's marker saying it is a pipeline's directory?"""
    import json

    from alignkit.runs import MARKER

    try:
        return json.loads((path / MARKER).read_text()).get("command") == PIPELINE
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------- run


def run(pipe: Pipeline, actions: list[tuple[Step, str]], run_step: Callable[[Step, str], Any],
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the planned steps in order with `run_step(step, action)`; write DIR/pipeline.yaml first and
    DIR/summary.json last (with each step's scalar results): a pipeline without it is unfinished."""
    import json

    import yaml

    from alignkit.runs import MARKER, RunLock, atomic_write_text, strict_json

    RunLock.acquire(pipe.dir)
    try:
        if pipe.overwrite and pipe.dir.exists():
            shutil.rmtree(pipe.dir)  # plan() checked that it is an alignkit pipeline directory
        pipe.dir.mkdir(parents=True, exist_ok=True)
        (pipe.dir / "summary.json").unlink(missing_ok=True)  # unfinished again until the last step is done
        atomic_write_text(pipe.dir / MARKER, strict_json({"command": PIPELINE,
                                                          "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        atomic_write_text(pipe.dir / PLAN_FILE, yaml.safe_dump(pipe.to_tree(), sort_keys=False))
        done: dict[str, Any] = {}
        for i, (step, action) in enumerate(actions, 1):
            head = f"step {i}/{len(actions)} {step.name} (alignkit {step.command})"
            t = time.perf_counter()
            if action == SKIP:
                say(f"{head}: finished in {step.dir}, skipped")
            else:
                say(f"{head}{' resumed' if action == RESUME else ''} -> {step.dir}")
                run_step(step, action)
            if not step.finished():  # e.g. a launched step whose ranks failed without an exit code
                raise UserError(f"step '{step.name}' did not finish: {step.dir}/summary.json is missing")
            result = json.loads((step.dir / "summary.json").read_text())
            done[step.name] = {"command": step.command, "dir": str(step.dir), "skipped": action == SKIP,
                               "seconds": 0.0 if action == SKIP else time.perf_counter() - t,
                               **{k: v for k, v in result.items() if isinstance(v, int | float | str | bool)
                                  and k not in ("command", "output_dir")}}
        summary = {"command": PIPELINE, "origin": pipe.origin, "steps": done,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(pipe.dir / "summary.json", strict_json(summary, indent=2))
        return summary
    finally:
        RunLock.release(pipe.dir)


def describe(pipe: Pipeline, actions: list[tuple[Step, str]] | None, recipe: str) -> list[str]:
    """The lines of `--dry-run`: every step with its command, inputs, model, data and run directory."""
    from alignkit import model_names

    lines = [f"plan: alignkit run {recipe}: a pipeline of {len(pipe.steps)} steps into {pipe.dir} "
             "(nothing is downloaded or written)"]
    todo = dict((s.name, a) for s, a in actions) if actions else {}
    for i, step in enumerate(pipe.steps, 1):
        cfg = step.cfg
        action = f" [{todo[step.name]}]" if step.name in todo else ""
        lines.append(f"  step {i}/{len(pipe.steps)} {step.name}: alignkit {step.command}{action} -> {step.dir}")
        for key, ref in step.inputs.items():
            lines.append(f"    input  : {key} = {ref}")
        if not {"model", "model.name"} & set(step.inputs):
            try:
                where = model_names.describe_source(cfg.model.name)
            except UserError as exc:
                where = f"unresolved: {exc}"
            lines.append(f"    model  : {cfg.model.name} -> {where}")
        lines.append(f"    data   : {cfg.data.source} (kind {cfg.data.kind or 'auto'})")
        n, accelerate = cfg.launch.num_processes, cfg.launch.accelerate_config
        lines.append(f"    launch : {n} process{'es' if n > 1 else ''}, accelerate config {accelerate}")
        lines.append(f"    outputs: {', '.join(f'${{{step.name}.{k}}}' for k in step.outputs)}")
    return lines


# ------------------------------------------------------------------------ the `pairs` step


class PairsSection(Block):
    """`alignkit pairs` as a step: K samples per prompt from the policy, judged, one pair per prompt."""

    preference: str = Field("oracle", description="judge: oracle[:TAU], pairrm, or a reward spec")
    k: int = Field(4, ge=2, description="samples per prompt")
    select: Literal["best-worst", "random"] = Field("best-worst", description="best-worst (SPPO/iterative DPO) "
                                                    "or random")
    label: Literal["prob", "sample"] = Field("prob", description="random pairs: the judge's choice or a sample")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling")
    max_new_tokens: int = Field(48, ge=1, description="tokens per completion")
    batch_size: int = Field(32, ge=1, description="sequences (prompts x k) per generate call")
    seed: int = Field(0, ge=0, description="sampling and selection seed")
    backend: Literal["hf", "vllm"] = Field("hf", description="sampler: hf (transformers generate) or vllm "
                                           "(pip install 'alignkit[vllm]', a CUDA GPU)")
    chat: ChatMode = Field("auto", description=CHAT_HELP)


class PairsData(DataSection):
    source: str = Field("builtin:prompts", description="prompt source (any kind with a prompt column)")


class PairsStepConfig(Block):
    """A pipeline's `pairs` step; it writes DIR/<step>/pairs.jsonl (output `data`)."""

    OUTPUTS: ClassVar[dict[str, str]] = {"data": "pairs.jsonl"}
    command: Literal["pairs"] = "pairs"
    model: ModelSection = Field(default_factory=ModelSection)
    data: PairsData = Field(default_factory=PairsData)
    pairs: PairsSection = Field(default_factory=PairsSection)
    output: OutputSection = Field(default_factory=OutputSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)

    @model_validator(mode="after")
    def _one_process(self) -> PairsStepConfig:
        if self.launch.num_processes != 1 or self.launch.accelerate_config is not None:
            raise ValueError("a pairs step runs in one process: drop launch.num_processes/accelerate_config")
        if self.model.lora.enabled:
            raise ValueError("a pairs step samples a model, it trains none: drop model.lora")
        return self


def run_pairs(cfg: PairsStepConfig, progress: bool = True) -> dict[str, Any]:
    """`alignkit pairs` as a step (`pairs.write_pairs`) into a run directory: DIR/pairs.jsonl and summary.json."""
    from alignkit import data, generation, pairs, vllm_backend
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir, run_readme
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    p = cfg.pairs
    generation.check_settings(p.k, p.max_new_tokens, p.temperature, p.top_p, p.batch_size)
    vllm_backend.check_backend(p.backend, cfg.model.device)
    out = Path(cfg.output.dir or "runs/pairs")
    RunDir.check(out, cfg.output.overwrite, False, resumable=False)
    ds, _ = data.load_source(cfg.data, expected=("prompts",))
    run_dir = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))
    try:
        stats = pairs.write_pairs(
            cfg.model.name, list(ds["prompt"]), run_dir.path("pairs.jsonl"), preference=p.preference,
            source=cfg.data.source, backend=p.backend, chat=p.chat, dtype=cfg.model.dtype, device=cfg.model.device,
            k=p.k, select=p.select, label=p.label, seed=p.seed, progress=progress, temperature=p.temperature,
            top_p=p.top_p, max_new_tokens=p.max_new_tokens, batch_size=p.batch_size)
    except UserError:  # e.g. no prompt with two different samples: nothing that looks like a result
        run_dir.discard()
        raise
    summary = {"command": "pairs", "model": cfg.model.name, **stats}
    final = run_dir.finish(summary, readme=run_readme(
        "pairs", f"{stats['pairs']} on-policy pairs of `{cfg.model.name}` judged by `{p.preference}` "
        f"(k = {p.k}, {p.select}) in pairs.jsonl; summary.json holds the counts."))
    return {**summary, "output_dir": str(final)}


# steps that are not trainers: command -> (config class, run function)
EXTRA_STEPS: dict[str, tuple[type[Block], Callable[..., dict[str, Any]]]] = {"pairs": (PairsStepConfig, run_pairs)}
