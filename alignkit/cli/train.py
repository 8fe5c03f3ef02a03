"""The training commands: sft, rm, rm-ensemble, dpo, kto, ppo, quickstart and `run RECIPE`, plus `rm eval`.

Each one builds its config (defaults < recipe < `--set` < flags, cli/flags.py), re-launches
through accelerate when asked (launch.py), runs the trainer from the `TRAINERS` table and prints
its summary. `--dry-run` stops after the config: nothing is loaded, downloaded or written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from alignkit.cli.common import (
    DryOpt,
    MaxSamplesOpt,
    OutOpt,
    OverwriteOpt,
    RecipeOpt,
    SeedOpt,
    SetOpt,
    app,
    check_seed,
    console,
    print_summary,
)
from alignkit.cli.flags import Flag, training_command
from alignkit.cli.recipes import recipe_command, recipe_path
from alignkit.errors import UserError


def train(command: str, recipe: Path | str | None, sets: list[str] | None, flags: dict[str, Any],
          dry_run: bool = False) -> None:
    """Build and validate the config, re-launch through accelerate if asked, run, print the summary."""
    from alignkit import hub, launch, tracking
    from alignkit.config import build_config, check_trainer_block, read_recipe, to_yaml
    from alignkit.trainers import config_class, load

    cfg_cls = config_class(command)
    tree = read_recipe(recipe_path(str(recipe))) if recipe else {}
    if tree.get("command", command) != command:
        raise UserError(f"{recipe}: this recipe is for `alignkit {tree['command']}`, not `alignkit {command}`")
    tree["command"] = command
    cfg = build_config(cfg_cls, tree, sets, flags, origin=str(recipe or command))
    check_trainer_block(cfg)  # the `trainer:` keys against the TRL config (imports trl only when there are some)
    if dry_run:
        _print_plan(cfg, to_yaml(cfg))
        return
    out = cfg.output  # cheap checks before any process is started or anything loaded
    tracking.require(out.report_to)
    if out.push_to_hub:
        hub.check_can_push(out.push_to_hub)
    code = launch.maybe_relaunch(sys.argv[1:], cfg.launch.num_processes, launch_config(cfg))
    if code is not None:
        raise typer.Exit(code)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    run_fn = load(command)[1]
    show = launch.rank_info()["is_main"]
    tracking.use(out.report_to, config=cfg.model_dump(mode="json"))  # the explicit loops' rows (Loop.log)
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not show, transient=False,
        ) as progress:
            summary = run_fn(cfg, progress=progress)
    finally:
        tracking.close()
    if show and not getattr(cfg_cls, "REPORTS_ITSELF", False):
        print_summary(f"alignkit {command}", summary)
    if show and out.push_to_hub:  # the run is finished: a failed push leaves it as it is (one line)
        url = hub.push(summary.get("output_dir") or out.dir, out.push_to_hub)
        console.print(f"pushed to {url}", highlight=False)


def launch_config(cfg: Any) -> str | None:
    """The accelerate config to start the ranks with: the explicit loops (ppo, sppo) shard their models
    themselves (FSDP2, `online.ranks.shard`), so accelerate only starts the processes for them."""
    return "ddp" if getattr(type(cfg), "SHARDS_ITSELF", False) else cfg.launch.accelerate_config


def _print_plan(cfg: Any, config_yaml: str) -> None:
    from alignkit import model_names

    console.print(f"[bold]plan[/bold]: alignkit {cfg.command} (nothing is downloaded or written)")
    try:
        where = model_names.describe_source(cfg.model.name)
    except UserError as exc:
        where = f"unresolved: {exc}"
    console.print(f"  model  : {cfg.model.name} -> {where}")
    console.print(f"  data   : {cfg.data.source} (kind {cfg.data.kind or 'auto'})")
    console.print(f"  output : {cfg.output.dir or 'runs/' + cfg.command + '-<timestamp>'}")
    n = cfg.launch.num_processes
    console.print(f"  launch : {n} process{'es' if n > 1 else ''}, accelerate config {cfg.launch.accelerate_config}")
    for label, text in (cfg.plan() if hasattr(cfg, "plan") else []):
        console.print(f"  {label:<7}: {text}", markup=False, highlight=False)
    console.print("[bold]resolved config[/bold]:")
    console.print(config_yaml, markup=False, highlight=False)


# ------------------------------------------------------------------------------- the trainers
OOD = Flag("ood", "eval.ood_source", ("--ood",), str)
PRECOMPUTE_REF = "--precompute-ref"

app.command("sft")(training_command(
    "sft", "Supervised fine-tuning on demonstrations (TRL SFTTrainer), full or LoRA.", train,
))

rm_app = typer.Typer(
    help="Bradley–Terry reward model (TRL RewardTrainer), full or LoRA; `alignkit rm eval RUN` evaluates one.",
    invoke_without_command=True,
)
ens_app = typer.Typer(
    help="UP-RLHF diverse reward-LoRA ensemble (eq. 12, nuclear-norm diversity); `... eval RUN` evaluates one.",
    invoke_without_command=True,
)
app.add_typer(rm_app, name="rm")
app.add_typer(ens_app, name="rm-ensemble")
rm_app.callback()(training_command(
    "rm", "Train a Bradley–Terry reward model on pairwise data, then evaluate it (accuracy, ECE, OOD).", train,
    extra=(OOD,), without=("kind",), subcommands=True,
))
ens_app.callback()(training_command(
    "rm-ensemble", "Train N LoRA reward members on one frozen base with eq. 12, then evaluate accuracy, ECE, OOD.",
    train,
    extra=(Flag("n_members", "ensemble.n_members", ("--n-members",), int),
           Flag("lam", "ensemble.lam", ("--lam",), float),
           Flag("member_loss", "ensemble.member_loss", ("--member-loss",), str), OOD),
    without=("kind", "lora"), subcommands=True,
))
app.command("dpo")(training_command(
    "dpo", "Direct preference optimisation on pairwise data (TRL DPOTrainer): DPO, IPO, SPPO (hard or soft).", train,
    extra=(Flag("loss", "pref.loss", ("--loss",), str), Flag("beta", "pref.beta", ("--beta",), float),
           Flag("precompute_ref", "pref.precompute_ref_log_probs", (PRECOMPUTE_REF,), bool),
           Flag("ref_model", "pref.ref_model", ("--ref-model",), str),
           Flag("preference", "pref.preference", ("--preference",), str)),
))
app.command("kto")(training_command(
    "kto", "KTO on unpaired data (TRL KTOTrainer); pairwise data is unpaired (chosen → desirable).", train,
    extra=(Flag("loss", "kto.loss", ("--loss",), str), Flag("beta", "kto.beta", ("--beta",), float),
           Flag("desirable_weight", "kto.desirable_weight", ("--desirable-weight",), float),
           Flag("undesirable_weight", "kto.undesirable_weight", ("--undesirable-weight",), float),
           Flag("precompute_ref", "kto.precompute_ref_log_probs", (PRECOMPUTE_REF,), bool),
           Flag("ref_model", "kto.ref_model", ("--ref-model",), str)),
))

app.command("ppo")(training_command(
    "ppo", "PPO / UP-RLHF on a reward (gold, RM, ensemble, function): explicit rollout → score → update loop.", train,
    extra=tuple(Flag(n, f"ppo.{n}", (f"--{n.replace('_', '-')}",), t) for n, t in (
        ("reward", str), ("iterations", int), ("prompts_per_iteration", int), ("k", int), ("advantage", str),
        ("kl_mode", str), ("kl_coef", float), ("kl_target", float), ("beta1", float), ("beta2", float),
        ("ppo_epochs", int), ("minibatch_size", int), ("max_new_tokens", int), ("temperature", float),
        ("backend", str), ("chat", str))),
    without=("accelerate_config",),
))

app.command("sppo")(training_command(
    "sppo", "Iterative SPPO (self-play: sample K, judge K×K, regress log-ratios on win rates); --loss dpo|ipo for "
    "the iterative baselines.", train,
    extra=(Flag("base", "model.name", ("--base",), str, "base policy: alias (mistral-7b), hub id or dir; as --model"),
           *(Flag(n, f"sppo.{n}", (f"--{n.replace('_', '-')}",), t) for n, t in (
               ("preference", str), ("iterations", int), ("k", int), ("eta", float), ("loss", str), ("beta", float),
               ("select", str), ("max_new_tokens", int), ("temperature", float), ("eval_prompts", int),
               ("chat", str))),
           Flag("split_prompts", "sppo.split_prompts", ("--split-prompts/--all-prompts",), bool)),
    without=("accelerate_config", "epochs", "max_steps", "grad_accum", "max_length"),
))


@app.command()
def quickstart(
    output_dir: Annotated[
        str | None, typer.Option("--output-dir", "-o", help="run directory (default runs/quickstart)")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Tiny model → SFT → on-policy pairs → DPO → Q-probe on the built-in task, then one table of every policy.

    About a minute on a 2-core CPU, offline; writes runs/quickstart (docs/quickstart.md)."""
    train("quickstart", recipe, set_, {"output.dir": output_dir, "output.overwrite": overwrite or None})


@app.command("run")
def run_recipe(
    recipe: Annotated[str, typer.Argument(help="recipe name (see `alignkit recipes ls`) or YAML path")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=2; in a "
                                                         "pipeline STEP.key=value, e.g. sft.train.epochs=2")] = None,
    dry_run: DryOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run; a pipeline skips its "
                                         "finished steps")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run (pipeline) "
                                            "directory")] = False,
    step: Annotated[str | None, typer.Option("--step", help="pipeline: run this step only (its inputs must "
                                             "exist)")] = None,
) -> None:
    """Run a recipe: `alignkit run sft-tiny train.epochs=2`; a pipeline recipe runs its steps in order."""
    from alignkit import pipeline
    from alignkit.config import read_recipe

    path = recipe_path(recipe)
    tree = read_recipe(path)
    flags = {"output.resume": resume or None, "output.overwrite": overwrite or None}
    if not pipeline.is_pipeline(tree):
        if step:
            raise UserError(f"--step {step}: {path} is not a pipeline (it has no steps:)")
        train(recipe_command(path, tree), path, overrides, flags, dry_run)
        return
    pipe = pipeline.load(tree, str(path), overrides, flags)
    if dry_run:  # with --resume or --step also what each step would do (which checks the directories)
        import yaml

        planned = pipeline.plan(pipe, only=step) if resume or step else None
        for line in pipeline.describe(pipe, planned, recipe):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        console.print("[bold]resolved pipeline[/bold]:")
        console.print(yaml.safe_dump(pipe.to_tree(), sort_keys=False), markup=False, highlight=False)
        return
    from alignkit import launch

    if launch.inside_launch() and not step:
        raise UserError("a pipeline starts the processes of each step itself: run `alignkit run` without "
                        "accelerate launch (set launch.num_processes in the steps that need several)")
    actions = pipeline.plan(pipe, only=step)

    def run_step(s: pipeline.Step, action: str) -> None:
        launch_cfg = s.cfg.launch
        several = launch_cfg.num_processes > 1 or launch_cfg.accelerate_config not in (None, "ddp")
        if several and not launch.inside_launch():  # each rank runs `alignkit run RECIPE --step NAME`
            argv = ["run", str(path), *(overrides or []), "--step", s.name,
                    *(["--resume"] if action == pipeline.RESUME else []),
                    *(["--overwrite"] if action == pipeline.RESTART else [])]
            code = launch.maybe_relaunch(argv, launch_cfg.num_processes, launch_config(s.cfg))
            if code:
                raise typer.Exit(code)
            return
        if s.command in pipeline.EXTRA_STEPS:  # not a trainer: its run function, in this process
            summary = pipeline.EXTRA_STEPS[s.command][1](s.cfg)
            print_summary(f"alignkit {s.command}", summary)
            return
        train(s.command, None, None, s.cfg.model_dump(exclude_unset=True, exclude={"command"}))

    if step:  # one step (also what each rank of a multi-process step runs)
        only, action = actions[0]
        if action != pipeline.SKIP:
            run_step(only, action)
        return
    summary = pipeline.run(pipe, actions, run_step, say=lambda m: console.print(f"[bold]{m}[/bold]", highlight=False))
    console.print(f"pipeline finished: {len(summary['steps'])} steps in {pipe.dir}/")


@app.command("push")
def push(
    run: Annotated[str, typer.Argument(help="a finished run directory")],
    repo: Annotated[str, typer.Argument(help="hub repo id, user/name (created if needed)")],
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
) -> None:
    """Upload a finished run to the Hugging Face Hub with a model card (what --push-to-hub does at the end)."""
    from alignkit import hub

    hub.model_card(run)  # not a finished run: one line before anything is sent
    hub.check_can_push(repo, what=f"alignkit push {run} {repo}")
    console.print(f"pushed to {hub.push(run, repo, private=private)}", highlight=False)


# -------------------------------------------------------------------------------- rm eval
EvalRunArg = Annotated[str, typer.Argument(help="run directory of `alignkit rm` / `alignkit rm-ensemble`")]
EvalDataOpt = Annotated[
    str | None, typer.Option("--data", "-d", help="pairs to evaluate (default: the run's held-out split)")
]
EvalOodOpt = Annotated[str | None, typer.Option("--ood", help="OOD completions (default: the run's eval.ood_source)")]
BinsOpt = Annotated[int, typer.Option("--bins", help="ECE bins (UP-RLHF: 15)")]


def _rm_eval(run: str, output_dir, overwrite, data, ood, max_samples, bins, seed) -> None:
    from alignkit.trainers.reward import run_eval

    check_seed(seed)
    summary = run_eval(run, output_dir, bool(overwrite), data, ood, max_samples, bins, seed or 0)
    print_summary(f"alignkit {summary['command']}", summary)


@rm_app.command("eval")
def rm_eval(
    run: EvalRunArg, data: EvalDataOpt = None, ood: EvalOodOpt = None, max_samples: MaxSamplesOpt = None,
    output_dir: OutOpt = None, overwrite: OverwriteOpt = None, bins: BinsOpt = 15, seed: SeedOpt = None,
) -> None:
    """Accuracy, ECE (eqs. 17–19), reliability diagram, OOD uncertainty and AUROC of a reward model."""
    _rm_eval(run, output_dir, overwrite, data, ood, max_samples, bins, seed)


@ens_app.command("eval")
def rm_ensemble_eval(
    run: EvalRunArg, data: EvalDataOpt = None, ood: EvalOodOpt = None, max_samples: MaxSamplesOpt = None,
    output_dir: OutOpt = None, overwrite: OverwriteOpt = None, bins: BinsOpt = 15, seed: SeedOpt = None,
) -> None:
    """Accuracy, ECE, reliability diagram, OOD uncertainty and its AUROC for a reward ensemble."""
    _rm_eval(run, output_dir, overwrite, data, ood, max_samples, bins, seed)
