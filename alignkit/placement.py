"""Where and how a model is placed: the device (in a launched rank its own GPU, cuda:LOCAL_RANK), the
dtype, the placement a launch asks for (whole on the device, ZeRO-3 partitioned as it loads, FSDP left to
the trainer) and QLoRA's 4-bit weights. `plan_loading` turns a model block's settings into a `LoadPlan`,
every check done before anything is read; the loaders in models.py follow it. Details: docs/models.md
("Device and dtype", "Placement in a multi-GPU launch", "QLoRA") and docs/scale-out.md.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from alignkit.errors import UserError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def choose_device(requested: str = "auto") -> torch.device:
    """`auto` picks a CUDA GPU if there is one, else CPU. In a launched rank (accelerate launch,
    torchrun: `launch.inside_launch`) `auto` and `cuda` mean the rank's own GPU, cuda:LOCAL_RANK, so that
    N ranks do not all load onto GPU 0; `cuda:N` and `cpu` are checked, not rewritten."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return _rank_gpu()
    if requested == "auto":
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise UserError(f"model.device '{requested}' is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"model.device '{requested}' was asked for but no CUDA GPU is visible: use cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"model.device '{requested}': only {torch.cuda.device_count()} GPU(s) visible")
    return device


def _rank_gpu() -> torch.device:
    """cuda:LOCAL_RANK in a launched rank (read from the launcher's environment: no torch.distributed
    state is created here), plain `cuda` (the current GPU) in a single process."""
    from alignkit.launch import inside_launch, rank_info

    if not inside_launch():
        return torch.device("cuda")
    local_rank, visible = rank_info()["local_rank"], torch.cuda.device_count()
    if local_rank >= visible:
        raise UserError(
            f"this rank has LOCAL_RANK={local_rank} but only {visible} GPU(s) are visible "
            "(CUDA_VISIBLE_DEVICES): give every rank of the node all the node's GPUs"
        )
    return torch.device("cuda", local_rank)


def choose_dtype(requested: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """`auto` gives bf16 on a CUDA GPU that supports it, fp32 everywhere else (never fp16 by itself)."""
    if requested == "auto":
        device = choose_device("auto") if device is None else torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise UserError(f"model.dtype '{requested}' is unknown: use auto, float32, bfloat16 or float16")
    return _DTYPES[requested]


# --------------------------------------------------------------------------- placement and 4-bit

Placement = Literal["device", "zero3", "fsdp"]
QLORA_HINT = "pip install 'alignkit[qlora]'"
_MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_zero3_configs: list[Any] = []  # transformers holds the DeepSpeed config by a weak reference only


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "y", "on")


def _zero_stage(env: Mapping[str, str]) -> int | None:
    """The DeepSpeed ZeRO stage of the launch: accelerate's env, else the launch's DeepSpeed JSON file."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if stage:
        return int(stage) if stage.isdigit() else None
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and Path(file).is_file():
        try:
            stage = json.loads(Path(file).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return stage if isinstance(stage, int) else None
    return None


def launch_placement(env: Mapping[str, str] | None = None) -> Placement:
    """How a model that a transformers/TRL `Trainer` will train is placed in this process, from what
    `accelerate launch` tells each rank (`env`, default os.environ; also a user's own accelerate config):

    - `zero3`: DeepSpeed ZeRO stage 3 with zero3_init (accelerate's default): the weights are partitioned
      over the ranks as `from_pretrained` reads them, never whole on one GPU;
    - `fsdp`: loaded on CPU (with accelerate's cpu_ram_efficient_loading, on rank 0 only, the others on
      the meta device) and left there: FSDP shards and places it when the trainer prepares it;
    - `device`: moved whole to this rank's device (one process, DDP, ZeRO-1/2).

    The explicit loops (ppo, sppo) shard with FSDP2 themselves and load with the default `device`."""
    env = os.environ if env is None else env
    if _env_true(env.get("ACCELERATE_USE_FSDP")):
        return "fsdp"
    if _env_true(env.get("ACCELERATE_USE_DEEPSPEED")) and _zero_stage(env) == 3 \
            and env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true").strip().lower() != "false":
        return "zero3"
    return "device"


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


BITSANDBYTES_CPU_FLOOR = "0.46.1"  # transformers' own floor; its pure-torch kernels run 4-bit on CPU


@functools.cache
def _bitsandbytes_cpu_problem() -> str | None:
    """None when the installed bitsandbytes runs QLoRA's 4-bit NF4 on CPU, else why not (one phrase).
    Reads the version first (no import); then, once per process, quantises a 64×64 matrix and multiplies
    by it (imports bitsandbytes: ~1-3 s; only a 4-bit load on CPU gets here, never --help or --dry-run)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        found = version("bitsandbytes")
        if Version(found) < Version(BITSANDBYTES_CPU_FLOOR):
            return f"bitsandbytes {found} has no CPU backend"
    except (PackageNotFoundError, InvalidVersion):
        found = "(version unknown)"
    try:
        import bitsandbytes
        from bitsandbytes.functional import quantize_4bit

        weight, x = torch.linspace(-1, 1, 64 * 64).view(64, 64), torch.linspace(-1, 1, 2 * 64).view(2, 64)
        packed, state = quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        product = bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)
        exact = x @ weight.t()
        if not bool(torch.isfinite(product).all()) or (product - exact).abs().max() > 0.25 * exact.abs().max():
            return f"bitsandbytes {found} gives wrong 4-bit products on CPU"
    except Exception as err:  # an import or kernel failure of any kind means: not usable here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        return f"bitsandbytes {found} cannot run 4-bit on CPU ({type(err).__name__}: {first})"
    return None


def check_load_in_4bit(device: str | torch.device = "auto") -> None:
    """`model.load_in_4bit` needs bitsandbytes and a device it runs 4-bit on: a CUDA GPU, or the CPU
    when the installed bitsandbytes has a working CPU backend (`_bitsandbytes_cpu_problem`). One line
    each, saying the ways out. Cheap on CUDA; the loaders call it before anything loads, and a trainer
    calls it before its data loads."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    cuda = torch.cuda.is_available()
    where = f"model.device is {dev}" if cuda else "no CUDA GPU is visible"
    to_cuda = "use model.device auto or cuda" if cuda else "run on a CUDA machine"
    drop = "drop --load-in-4bit (train LoRA on the full-precision model)"
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"model.load_in_4bit (QLoRA) runs on a CUDA GPU or the CPU, and {where}: "
                        f"use model.device auto, cuda or cpu, or {drop}")
    if not _has_bitsandbytes():
        if dev.type == "cuda":
            raise UserError(f"model.load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: {QLORA_HINT}")
        raise UserError(f"model.load_in_4bit (QLoRA) needs bitsandbytes, which is not installed, and {where}: "
                        f"{QLORA_HINT} (bitsandbytes >= {BITSANDBYTES_CPU_FLOOR} runs 4-bit on CPU too, slowly), "
                        f"{to_cuda}, or {drop}")
    if dev.type == "cpu":
        problem = _bitsandbytes_cpu_problem()
        if problem:
            raise UserError(f"model.load_in_4bit (QLoRA) on CPU: {problem}, and {where}: "
                            f"pip install -U 'bitsandbytes>={BITSANDBYTES_CPU_FLOOR}', {to_cuda}, or {drop}")


def quantization_config(compute_dtype: torch.dtype, sharded: bool = False) -> Any:
    """QLoRA's 4-bit weights (Dettmers et al. 2023, sec. 3): NF4 with double quantisation, matmuls in
    `compute_dtype` (bf16 on a capable GPU), as TRL's `get_quantization_config`. Under ZeRO-3 / FSDP the
    packed weights are stored as `compute_dtype` so that they can be sharded with the other tensors."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
    )


@dataclass(frozen=True)
class LoadPlan:
    """Where and how one model loads (`plan_loading`): this rank's device, the weights' dtype, the
    placement and whether the weights are 4-bit."""

    device: torch.device
    dtype: torch.dtype
    placement: Placement = "device"
    load_in_4bit: bool = False

    @property
    def move(self) -> bool:
        """Whether the loaded model is moved whole to `device` (4-bit weights are put on their device while
        loading; ZeRO-3 and FSDP place them themselves)."""
        return self.placement == "device" and not self.load_in_4bit

    def _device_map_target(self) -> int | str:
        if self.device.type == "cpu":
            return "cpu"
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.load_in_4bit:
            kwargs["quantization_config"] = quantization_config(self.dtype, sharded=self.placement != "device")
            if self.placement == "device":  # bitsandbytes quantises as the weights reach this device
                kwargs["device_map"] = {"": self._device_map_target()}
        return kwargs


def plan_loading(device: str = "auto", dtype: str = "auto", placement: Placement = "device",
                 load_in_4bit: bool = False) -> LoadPlan:
    """The `LoadPlan` for the loaders' arguments, every check done (a bad device or dtype, 4-bit where
    no bitsandbytes runs it: one line each) before anything is read."""
    if placement not in get_args(Placement):
        raise ValueError(f"placement {placement!r}: one of {get_args(Placement)}")
    dev = choose_device(device)
    if load_in_4bit:
        check_load_in_4bit(dev)
    return LoadPlan(dev, choose_dtype(dtype, dev), placement, load_in_4bit)


def before_weights(plan: LoadPlan) -> None:
    """ZeRO-3: create the DeepSpeed config from accelerate's launch environment before `from_pretrained`,
    as `TrainingArguments` would, so that transformers loads under `deepspeed.zero.Init` and partitions
    the weights as they are read (transformers: "HfDeepSpeedConfig must be instantiated before loading
    the model"). The trainer's own TrainingArguments replace it later with the same settings."""
    if plan.placement != "zero3":
        return
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(_MIXED_PRECISION.get(plan.dtype, "no"))
    plugin.set_deepspeed_weakref()
    _zero3_configs[:] = [plugin]  # keeps plugin.dschf (the HfDeepSpeedConfig) alive


def training_dtype(model: Any) -> torch.dtype:
    """The dtype a trainer's autocast should use for `model`: the compute dtype of 4-bit weights (their
    norms and embeddings are fp32 after `prepare_model_for_kbit_training`), else its parameters' dtype."""
    compute = getattr(getattr(model.config, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else next(model.parameters()).dtype


def adapters_in_compute_dtype(model: Any) -> None:
    """After a TRL trainer is built on a 4-bit model: TRL casts its trainable parameters (LoRA, a reward
    head) to bf16 whatever the compute dtype (QLoRA's bf16 adapters). With an fp32 compute dtype (the
    CPU default, a GPU without bf16) that makes peft run every LoRA matmul in bf16 (several times slower
    on a CPU without bf16 units) and lets AdamW's small updates vanish in bf16 rounding; cast them to fp32,
    as QLoRA's reference code does (bf16 adapters only under bf16; fp32 under fp16 too, which trains without
    loss scaling here). A bf16 compute dtype: left as TRL has it."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    if training_dtype(model) == torch.bfloat16:
        return
    for param in model.parameters():  # fp32, also under fp16 compute: no loss scaling here, fp16 updates underflow
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def prepare_4bit(model: Any) -> Any:
    """QLoRA: peft's `prepare_model_for_kbit_training` (base frozen, norms and embeddings in fp32). Gradient
    checkpointing stays what train.gradient_checkpointing says (the trainer turns it on); the inputs
    require grad so that it works on a frozen base."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    return model
