"""Where a model loads in a launched rank (its own GPU, ZeRO-3, FSDP) and 4-bit QLoRA (placement.py,
followed by the loaders of models.py).

CUDA is faked (torch.cuda.is_available / device_count) where a test only checks a decision; the
one test that needs a real GPU and bitsandbytes skips without them. QLoRA's real path on CPU: test_qlora.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, run_cli

from alignkit import models, placement
from alignkit.errors import UserError
from alignkit.models import LoraSpec
from alignkit.placement import choose_device, launch_placement, plan_loading

LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ALIGNKIT_LAUNCHED")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible CUDA GPUs as far as device choice is concerned (nothing is put on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def rank1(monkeypatch):
    """The environment accelerate launch / torchrun gives the second rank of a 2-process launch."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.fixture
def single_process(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------------------------------ devices


def test_a_launched_rank_loads_on_its_own_gpu(fake_cuda, rank1):
    import sys

    assert choose_device("auto") == torch.device("cuda", 1)
    assert choose_device("cuda") == torch.device("cuda", 1)  # `cuda` in a rank: its GPU, not GPU 0
    assert choose_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert choose_device("cpu").type == "cpu"
    plan = plan_loading("auto", "float32")
    assert plan.device == torch.device("cuda", 1) and plan.move
    dist = sys.modules.get("torch.distributed")
    assert dist is None or not dist.is_initialized()  # read from the environment, no process group


def test_one_process_keeps_the_current_gpu(fake_cuda, single_process):
    assert choose_device("auto") == torch.device("cuda")
    assert choose_device("cuda:1") == torch.device("cuda", 1)


def test_a_rank_beyond_the_visible_gpus_is_one_line(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="LOCAL_RANK=2 but only 2 GPU"):
        choose_device("auto")


def test_explicit_loops_still_get_their_rank_device(fake_cuda, rank1, monkeypatch):
    """ppo/sppo's start_ranks picks cuda:LOCAL_RANK itself and passes it on: unchanged."""
    import torch.distributed as dist

    from alignkit.online import ranks

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert ranks.start_ranks("auto") == (1, 2, "cuda:1")
    assert choose_device("cuda:1") == torch.device("cuda", 1)


# ------------------------------------------------------------------------------------------ placement


def _accelerate_rank_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch` gives every rank for alignkit's --accelerate-config NAME."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from alignkit.launch import config_path

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_path(name)), "--num_processes", "2", "-m", "alignkit.cli"])
    args = _validate_launch_command(args)[0]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""  # what launch_command sets before this call
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name,expected", [("ddp", "device"), ("zero2", "device"), ("zero3", "zero3"),
                                            ("fsdp", "fsdp")])
def test_placement_follows_the_launch_config(name, expected):
    assert launch_placement(_accelerate_rank_env(name)) == expected


def test_placement_decisions(tmp_path: Path):
    ds = {"ACCELERATE_USE_DEEPSPEED": "true"}
    assert launch_placement({}) == "device"
    assert launch_placement({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == "zero3"
    assert launch_placement({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}) == "device"
    # zero3_init_flag: false asks DeepSpeed to partition only when the trainer prepares the model
    assert launch_placement({**ds, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                             "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}) == "device"
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))  # a user's own DeepSpeed file
    assert launch_placement({**ds, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)}) == "zero3"
    assert launch_placement({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"


def test_fsdp_leaves_the_model_on_cpu_for_the_trainer(fake_cuda, rank1, tiny_model_dir):
    plan = plan_loading("auto", "float32", "fsdp")
    assert plan.device == torch.device("cuda", 1) and not plan.move
    model, _ = models.load_causal_lm("tiny", dtype="float32", placement="fsdp")  # .to(cuda:1) would fail here
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_zero3_config_exists_before_the_weights_load(fake_cuda, rank1, tiny_model_dir, monkeypatch):
    """transformers partitions at load time only when the DeepSpeed config exists before from_pretrained."""
    import accelerate.utils

    events: list[str] = []

    class FakePlugin:
        def set_mixed_precision(self, mixed):
            events.append(f"mixed_precision {mixed}")

        def set_deepspeed_weakref(self):
            events.append("deepspeed config")

    real = models._load_weights
    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", FakePlugin)
    monkeypatch.setattr(models, "_load_weights", lambda *a, **k: (events.append("weights"), real(*a, **k))[1])
    monkeypatch.setattr(placement, "_zero3_configs", [])
    model, _ = models.load_causal_lm("tiny", dtype="bfloat16", placement="zero3", lora=LoraSpec(r=4))
    assert events == ["mixed_precision bf16", "deepspeed config", "weights"]
    assert isinstance(placement._zero3_configs[0], FakePlugin)  # kept alive (transformers holds a weak reference)
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # not moved: DeepSpeed places it
    # one dtype for base and adapter under ZeRO-3 (peft would make the adapter fp32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_placement_is_checked():
    with pytest.raises(ValueError, match="placement"):
        plan_loading("cpu", "float32", "zero-3")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ QLoRA


def test_4bit_plan_is_qlora_nf4(fake_cuda, rank1, monkeypatch):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: True)
    plan = plan_loading("auto", "bfloat16", load_in_4bit=True)
    kwargs = plan.from_pretrained_kwargs()
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 1} and not plan.move  # quantised on this rank's GPU as it loads
    sharded = plan_loading("auto", "bfloat16", "zero3", load_in_4bit=True).from_pretrained_kwargs()
    assert "device_map" not in sharded and sharded["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16


def test_training_dtype_of_a_4bit_model_is_its_compute_dtype(tiny_model_dir):
    model, _ = models.load_causal_lm("tiny", dtype="float32", device="cpu")
    assert placement.training_dtype(model) == torch.float32
    from transformers import BitsAndBytesConfig

    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    assert placement.training_dtype(model) == torch.bfloat16


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the 4-bit checks")

    monkeypatch.setattr(models, "_load_weights", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


def test_4bit_without_cuda_or_a_cpu_capable_bitsandbytes_is_one_line_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: True)
    monkeypatch.setattr(placement, "_bitsandbytes_cpu_problem", lambda: "bitsandbytes 0.45.5 has no CPU backend")
    _no_loading(monkeypatch)
    with pytest.raises(UserError, match="on CPU: bitsandbytes 0.45.5 has no CPU backend, and no CUDA GPU is visible"):
        models.load_causal_lm("tiny", load_in_4bit=True, lora=LoraSpec())
    with pytest.raises(UserError, match="run on a CUDA machine"):
        models.load_sequence_classifier("tiny", load_in_4bit=True, lora=LoraSpec())


def test_4bit_without_bitsandbytes_says_how_to_install_it(fake_cuda, monkeypatch):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: False)
    _no_loading(monkeypatch)
    with pytest.raises(UserError, match=r"pip install 'alignkit\[qlora\]'"):
        models.load_causal_lm("tiny", load_in_4bit=True, lora=LoraSpec())


def test_cli_4bit_without_lora_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    for command in ("sft", "dpo", "rm"):
        code, _, err = run_cli([command, "--load-in-4bit", "--max-samples", "8", "-o", str(out)], monkeypatch, capsys)
        one_line_error(code, err, "4-bit weights cannot be trained in full", "--lora")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_cli_4bit_without_cuda_or_bitsandbytes_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: False)
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--lora", "--load-in-4bit", "--max-samples", "8", "-o", str(out)],
                           monkeypatch, capsys)
    one_line_error(code, err, "load_in_4bit", "pip install 'alignkit[qlora]'", "run on a CUDA machine")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_cli_4bit_without_bitsandbytes_is_one_line(tmp_path, fake_cuda, single_process, monkeypatch, capsys):
    monkeypatch.setattr(placement, "_has_bitsandbytes", lambda: False)
    out = tmp_path / "run"
    code, _, err = run_cli(["sft", "--lora", "--load-in-4bit", "--max-samples", "8", "-o", str(out)],
                           monkeypatch, capsys)
    one_line_error(code, err, "pip install 'alignkit[qlora]'")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_attn_implementation_reaches_from_pretrained(tiny_model_dir):
    """model.attn_implementation (a recipe key) is what the loaded model's config says."""
    lm, _ = models.load_causal_lm(str(tiny_model_dir), device="cpu", attn_implementation="eager")
    assert lm.config._attn_implementation == "eager"
    from alignkit.config import ModelSection

    assert ModelSection(attn_implementation="sdpa").attn_implementation == "sdpa"
