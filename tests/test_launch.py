"""alignkit/launch.py: the accelerate command it builds, its refusals, and a real 2-rank gloo run."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from alignkit import launch
from alignkit.errors import UserError

ARGV = ["sft", "--num-processes", "2", "--data", "my file.jsonl", "lr=1e-5"]


@pytest.fixture(autouse=True)
def _not_launched(monkeypatch):
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK", launch.LAUNCHED_ENV, "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("name", sorted(launch.ACCELERATE_CONFIGS))
def test_config_paths_exist_in_installed_trl(name):
    path = launch.config_path(name)
    assert path.is_file() and path.parent.name == "accelerate_configs"
    assert path.name == launch.ACCELERATE_CONFIGS[name]


def test_build_command_overrides_num_processes_and_keeps_argv_verbatim():
    cmd = launch.build_command(ARGV, 2, None, cpu=True)
    assert cmd[:2] == ["accelerate", "launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(launch.config_path("ddp"))
    assert cmd[cmd.index("--num_processes") + 1] == "2"  # TRL's yaml says 8
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"  # TRL's yaml says bf16
    # accelerate's own --cpu starts ONE process and ignores --num_processes: it must never appear
    assert "--cpu" not in cmd
    tail = cmd[cmd.index("--mixed_precision") + 2 :]
    assert tail == ["-m", "alignkit.cli", *ARGV]


def test_build_command_runs_a_script_target():
    cmd = launch.build_command(["a", "b c"], 3, "ddp", cpu=True, target=["train.py"])
    assert cmd[-3:] == ["train.py", "a", "b c"]
    assert cmd[cmd.index("--num_processes") + 1] == "3"


def test_cpu_children_get_gloo_env():
    assert launch._child_env(True) == {"ALIGNKIT_LAUNCHED": "1", "ACCELERATE_USE_CPU": "true"}
    assert launch._child_env(False) == {"ALIGNKIT_LAUNCHED": "1"}


def test_unknown_config_suggests_closest():
    with pytest.raises(UserError, match=r'unknown --accelerate-config "zero-3" \(did you mean "zero3"\?\)'):
        launch.config_path("zero-3")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed")
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_without_deepspeed_is_a_user_error(name):
    with pytest.raises(UserError, match=rf"--accelerate-config {name} needs DeepSpeed: pip install"):
        launch.build_command(ARGV, 2, name, cpu=False)


def test_fsdp_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="FSDP needs CUDA GPUs"):
        launch.build_command(ARGV, 2, "fsdp", cpu=True)


def test_bad_num_processes_is_a_user_error():
    with pytest.raises(UserError, match="--num-processes must be at least 1"):
        launch.build_command(ARGV, 0, None, cpu=True)


def test_single_process_and_inside_launch_run_in_process(monkeypatch):
    assert launch.maybe_relaunch(ARGV, 1, None) is None
    assert launch.maybe_relaunch(ARGV, 1, "ddp") is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch.inside_launch()
    assert launch.maybe_relaunch(ARGV, 2, None) is None  # a child never re-launches
    assert launch.rank_info() == {"rank": 1, "local_rank": 1, "world_size": 2, "is_main": False}
    with pytest.raises(UserError, match="--num-processes 4 but this launch has 2 processes"):
        launch.maybe_relaunch(ARGV, 4, None)


def test_rank_info_outside_launch():
    assert not launch.inside_launch()
    assert launch.rank_info() == {"rank": 0, "local_rank": 0, "world_size": 1, "is_main": True}


RANK_SCRIPT = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

from alignkit.launch import inside_launch, maybe_relaunch, rank_info

# what alignkit.cli does first, with the same argv as the parent: inside the launch -> None
relaunched = maybe_relaunch(sys.argv[2:], 2, None)
acc = Accelerator()
info = rank_info()
total = torch.tensor([float(acc.process_index)])
dist.all_reduce(total)  # sum of the ranks over gloo
with acc.split_between_processes(list(range(10))) as shard:
    shard = list(shard)
out = Path(sys.argv[1])
(out / f"rank{acc.process_index}.json").write_text(json.dumps({
    "world_size": acc.num_processes, "sum": total.item(), "shard": shard, "argv": sys.argv[2:],
    "backend": dist.get_backend(), "distributed_type": str(acc.distributed_type),
    "mixed_precision": acc.mixed_precision, "inside_launch": inside_launch(), "rank_info": info,
    "relaunched": relaunched,
}))
"""


@pytest.mark.slow  # a 2-process launch, like the other launches: `make test-all`
def test_two_gloo_ranks_on_cpu(tmp_path, capsys):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    code = launch.maybe_relaunch([str(out), "--x", "a b"], 2, None, target=[str(script)], cpu=True)
    assert code == 0
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith(
        "launching: ALIGNKIT_LAUNCHED=1 ACCELERATE_USE_CPU=true accelerate launch --config_file "
    )
    assert f"--num_processes 2 --mixed_precision no {script} {out} --x 'a b'" in line

    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == ["rank0.json", "rank1.json"]
    ranks = [json.loads(f.read_text()) for f in files]
    for r, info in enumerate(ranks):
        assert info["world_size"] == 2 and info["sum"] == 1.0
        assert info["backend"] == "gloo" and info["distributed_type"] == "DistributedType.MULTI_CPU"
        assert info["mixed_precision"] == "no"
        assert info["argv"] == ["--x", "a b"]  # the child's argv is the parent's argv, verbatim
        assert info["inside_launch"] and info["relaunched"] is None  # a rank never launches again
        assert info["rank_info"]["rank"] == r
        assert info["rank_info"]["is_main"] == (r == 0)
    shards = [set(info["shard"]) for info in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(10))


def test_rank_exit_code_propagates(tmp_path, capsys):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nsys.exit(2 if os.environ['RANK'] == '1' else 0)\n")
    assert launch.maybe_relaunch([], 2, None, target=[str(script)], cpu=True) == 2
    assert "Traceback" not in capsys.readouterr().err
