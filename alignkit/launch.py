"""The one multi-process / multi-GPU launcher: re-run the same command through `accelerate launch`.

A training command with `--num-processes N` calls `maybe_relaunch(argv, ...)` first. Outside a launch it
runs `accelerate launch --config_file <TRL's config> --num_processes N --mixed_precision no -m
alignkit.cli <argv>` (printed as one `launching:` line; on CPU with ACCELERATE_USE_CPU=true for N gloo
ranks) in this process, streams the ranks' output and returns the exit code of the first rank that
failed, so a rank's UserError still exits 2. Inside a launched child it returns None. Why each flag is
passed: docs/launch.md.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path

from alignkit.errors import UserError, closest

ACCELERATE_CONFIGS = {
    "ddp": "multi_gpu.yaml",
    "zero2": "zero2.yaml",
    "zero3": "zero3.yaml",
    "fsdp": "fsdp2.yaml",
}
DEFAULT_TARGET = ("-m", "alignkit.cli")  # what each rank runs; a script path works too: ["train.py"]
LAUNCHED_ENV = "ALIGNKIT_LAUNCHED"  # set by the parent in every rank's environment


def config_path(name: str) -> Path:
    """The accelerate config file TRL ships for `name` (ddp, zero2, zero3, fsdp)."""
    if name not in ACCELERATE_CONFIGS:
        raise UserError(
            f'unknown --accelerate-config "{name}"{closest(name, ACCELERATE_CONFIGS)}; '
            f"choose one of: {', '.join(ACCELERATE_CONFIGS)}"
        )
    spec = importlib.util.find_spec("trl")  # locate without importing trl (slow import)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--accelerate-config needs the trl package: pip install 'trl>=1.0'")
    path = Path(list(spec.submodule_search_locations)[0]) / "accelerate_configs" / ACCELERATE_CONFIGS[name]
    if not path.is_file():
        raise UserError(f"--accelerate-config {name}: {path} is missing; upgrade trl (pip install -U trl)")
    return path


def inside_launch() -> bool:
    """True in a rank started by us, by `accelerate launch` or by torchrun (which set LOCAL_RANK)."""
    env = os.environ
    return env.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in env or int(env.get("WORLD_SIZE", "1")) > 1


def _on_cpu(cpu: bool | None) -> bool:
    if cpu is not None:
        return cpu
    import torch

    return not torch.cuda.is_available()


def build_command(
    argv: list[str],
    num_processes: int,
    accelerate_config: str | None,
    cpu: bool | None = None,
    *,
    target: list[str] | tuple[str, ...] = DEFAULT_TARGET,
    mixed_precision: str = "no",
) -> list[str]:
    """`accelerate launch ...` argv that runs `target + argv` on `num_processes` ranks.

    Checks that the config can run here (DeepSpeed installed, CUDA for ZeRO/FSDP) and raises UserError
    otherwise. `cpu=None` means: CPU when torch sees no CUDA device.
    """
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    name = accelerate_config or "ddp"
    path = config_path(name)
    if name in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--accelerate-config {name} needs DeepSpeed: pip install 'alignkit[deepspeed]'")
    cpu = _on_cpu(cpu)
    if cpu and name != "ddp":
        what = "FSDP" if name == "fsdp" else "DeepSpeed ZeRO"
        raise UserError(
            f"--accelerate-config {name}: {what} needs CUDA GPUs and none is visible; "
            "on CPU use --accelerate-config ddp (the default)"
        )
    if not cpu:
        import torch

        if torch.cuda.device_count() < num_processes:
            raise UserError(
                f"--num-processes {num_processes} needs {num_processes} CUDA GPUs, "
                f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES)"
            )
    return [
        "accelerate", "launch",
        "--config_file", str(path),
        "--num_processes", str(num_processes),
        "--mixed_precision", mixed_precision,
        *target,
        *argv,
    ]  # fmt: skip


def _child_env(cpu: bool) -> dict[str, str]:
    env = {LAUNCHED_ENV: "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # -> PartialState(cpu=True) -> MULTI_CPU over gloo
    return env


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run `accelerate launch` (command[2:]) in this process; the exit code of the first failed rank."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(command[2:])
    saved = {key: os.environ.get(key) for key in env}
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    os.environ.update(env)  # torchrun copies os.environ into every rank
    elastic_log.setLevel(logging.CRITICAL)  # the rank already said what went wrong; no torchrun report
    try:
        launch_command(args)
        return 0
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # killed by signal
        if code != UserError.exit_code:  # a UserError already printed its one line
            print(
                f"alignkit: rank {rank} failed with exit code {code} (its output is above)", file=sys.stderr
            )
        return code
    except SignalException as err:
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 130
    finally:
        elastic_log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _destroy_process_group() -> None:
    # A rank that exits with its gloo process group alive can die in teardown with "terminate called
    # without an active exception" (SIGABRT, exit 134): ~1 run in 10 on this machine, never seen
    # in 60 runs once the group is destroyed. transformers' Trainer does not destroy it.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def maybe_relaunch(
    argv: list[str],
    num_processes: int,
    accelerate_config: str | None,
    *,
    target: list[str] | tuple[str, ...] = DEFAULT_TARGET,
    cpu: bool | None = None,
    mixed_precision: str = "no",
) -> int | None:
    """None: run in this process. Otherwise launch `num_processes` ranks and return their exit code.

    In a launched rank it also registers `_destroy_process_group` to run at exit.
    """
    if inside_launch():
        world_size = rank_info()["world_size"]
        if num_processes > 1 and world_size != num_processes:
            raise UserError(
                f"--num-processes {num_processes} but this launch has {world_size} processes; "
                "pass the same number to both (or leave --num-processes out under accelerate launch)"
            )
        atexit.register(_destroy_process_group)
        return None
    if num_processes == 1 and accelerate_config in (None, "ddp"):
        return None  # DDP with one process is a plain run
    cpu = _on_cpu(cpu)
    command = build_command(argv, num_processes, accelerate_config, cpu, target=target,
                            mixed_precision=mixed_precision)  # fmt: skip
    env = _child_env(cpu)
    prefix = " ".join(f"{key}={value}" for key, value in env.items())
    print(f"launching: {prefix} {shlex.join(command)}", file=sys.stderr, flush=True)
    return _run(command, env)


def rank_info() -> dict:
    """{"rank", "local_rank", "world_size", "is_main"} from torch.distributed if started, else env."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to learn we are rank 0
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return {"rank": rank, "local_rank": local_rank, "world_size": world_size, "is_main": rank == 0}
