"""The one model loader: names and aliases, local directories, the built-in `tiny`, dtype/device,
placement in a launched rank (its own GPU, ZeRO-3, FSDP), 4-bit QLoRA, LoRA.

Every command loads its models here, so the safety policy lives in one place: safetensors only, no
remote code unless asked, nothing downloaded while offline, and a directory that cannot be loaded
(corrupt weights, unknown architecture, weights that do not fit config.json, no tokenizer) is one
`UserError` naming it. Name resolution, the tiny model's recipe, the policy, placement and QLoRA:
docs/models.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from alignkit.errors import UserError, closest
from alignkit.model_names import (  # noqa: F401  (re-exported: the loader's public names)
    ALIASES,
    FETCH_HINT,
    Alias,
    Kind,
    describe_source,
    is_available_locally,
    list_models,
    minilm_dir,
    resolve,
)
from alignkit.tiny_model import build_tiny  # noqa: F401  (re-exported)


def _fetch_error(name: str) -> UserError:
    hint = "" if "/" in name else closest(name, ALIASES)
    return UserError(
        f"model '{name}' is not a local directory or built-in and could not be fetched from the "
        f"Hugging Face hub (offline?): {FETCH_HINT}{hint}"
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _check_config(path: Path) -> None:
    """config.json must be a JSON object whose `model_type` this transformers knows (unless the
    directory ships its own code, `auto_map`)."""
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"model directory '{path}' has no config.json: is it a Hugging Face model directory?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"model directory '{path}': config.json is not valid JSON ({_first_line(err)})") from err
    if not isinstance(config, dict):
        raise UserError(f"model directory '{path}': config.json holds no JSON object")
    model_type = config.get("model_type")
    if model_type is None or "auto_map" in config:
        return  # transformers decides (or the directory's own code does, with --trust-remote-code)
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import transformers

        raise UserError(
            f"model directory '{path}': config.json has model_type '{model_type}', which transformers "
            f"{transformers.__version__} does not know: fix config.json "
            "or upgrade transformers"
        )


def _check_safetensors(path: Path) -> None:
    """Every *.safetensors file must have a readable header that covers the whole file (a truncated or
    garbage file fails here, before any model is built). Reads only the headers."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # SafetensorError (no public class to catch), OSError
            raise UserError(
                f"model directory '{path}': {file.name} is not a complete safetensors file ({_first_line(err)}): "
                "it is truncated or corrupt; save or copy it again"
            ) from err


def _check_local_weights(path: Path) -> None:
    """Refuse a local model directory that cannot load, before any model is built: no or broken
    config.json, an unknown architecture, no safetensors weights (pickles are refused), corrupt weights."""
    _check_config(path)
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        _check_safetensors(path)
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise UserError(
            f"model directory '{path}' has only pickled .bin weights, which alignkit refuses to load: "
            "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise UserError(f"model directory '{path}' has no *.safetensors weights")


# files one of which a saved tokenizer has (tokenizer.json for fast tokenizers, the others for slow ones)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise UserError(
            f"model directory '{path}' has no tokenizer (no tokenizer.json or tokenizer_config.json): save the "
            "tokenizer beside the weights (tokenizer.save_pretrained(dir))"
        )


def _from_pretrained(cls: Any, name: str, path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with the offline / safetensors / remote-code failures turned into UserErrors."""
    local = Path(path).is_dir()
    try:
        return cls.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(
                f"model '{name}' ships its own code: pass --trust-remote-code (model.trust_remote_code=true) "
                "only if you trust its authors"
            ) from err
        if local:
            raise UserError(f"could not load model directory '{path}': {_first_line(err)}") from err
        raise _fetch_error(name) from err  # huggingface_hub's HFValidationError is a ValueError
    except OSError as err:
        if local:
            raise UserError(f"could not load model directory '{path}': {_first_line(err)}") from err
        if "safetensors" in str(err).lower() and "does not appear to have" in str(err):
            raise UserError(
                f"model '{name}' has no safetensors weights on the hub; alignkit refuses pickled .bin weights"
            ) from err
        raise _fetch_error(name) from err
    except Exception as err:
        if type(err).__name__ == "SafetensorError":  # a corrupt file that slipped past _check_safetensors
            raise UserError(f"model '{name}': its weights are not a complete safetensors file ({_first_line(err)})") \
                from err
        raise


def _load_weights(cls: Any, name: str, path: str, new_head: bool = False, **kwargs: Any) -> Any:
    """`_from_pretrained` for a model class, refusing weights that do not fit the config: a tensor whose
    shape differs from the one config.json implies, or a backbone tensor missing from the checkpoint
    (transformers would initialise either at random and carry on). `new_head`: the task head (whatever
    lies outside the backbone, e.g. a reward model's `score`) may be missing and is newly initialised."""
    model, info = _from_pretrained(
        cls, name, path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    what = f"model directory '{path}'" if Path(path).is_dir() else f"model '{name}'"
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, expected = sorted(mismatched)[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UserError(
            f"{what}: weights do not match its config.json: {key} is {list(found)} in the checkpoint but "
            f"{list(expected)} by the config{more}; fix config.json or use the weights it was saved with"
        )
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(k for k in info.get("missing_keys") or [] if not new_head or k.startswith(prefix))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"{what}: weights do not match its config.json: {missing[0]}{more} {'are' if more else 'is'} missing "
            "from the checkpoint; fix config.json or use the weights it was saved with"
        )
    return model


def _resolve_for_weights(name: str) -> str:
    path = resolve(name)
    p = Path(path)
    if p.is_dir() and (p / "summary.json").is_file() and (p / "model").is_dir():
        path, p = str(p / "model"), p / "model"  # an alignkit run directory: its trained model
    if p.is_dir() and not (p / "adapter_config.json").is_file():
        _check_local_weights(p)
    return path


def _adapter_base(path: str) -> str | None:
    """The base model of a peft adapter directory (None when `path` is a full model)."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise UserError(f"adapter directory '{path}' has no adapter_model.safetensors")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter directory '{path}': adapter_config.json names no base_model_name_or_path")
    return base


# --------------------------------------------------------------------------- device and dtype

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


def check_load_in_4bit(device: str | torch.device = "auto") -> None:
    """`model.load_in_4bit` needs a CUDA GPU and bitsandbytes: one line each. Cheap; the loaders call it
    before anything loads, and a trainer may call it before its data loads."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    if dev.type != "cuda":
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"model.device is {dev}"
        raise UserError(f"model.load_in_4bit (QLoRA) needs a CUDA GPU and {why}: drop --load-in-4bit "
                        "(train LoRA on the full-precision model) or run on a CUDA machine")
    if not _has_bitsandbytes():
        raise UserError(f"model.load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: {QLORA_HINT}")


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
        """Whether the loaded model is moved whole to `device` (4-bit weights are put on their GPU while
        loading; ZeRO-3 and FSDP place them themselves)."""
        return self.placement == "device" and not self.load_in_4bit

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.load_in_4bit:
            kwargs["quantization_config"] = quantization_config(self.dtype, sharded=self.placement != "device")
            if self.placement == "device":  # bitsandbytes quantises as the weights reach this GPU
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                kwargs["device_map"] = {"": index}
        return kwargs


def plan_loading(device: str = "auto", dtype: str = "auto", placement: Placement = "device",
                 load_in_4bit: bool = False) -> LoadPlan:
    """The `LoadPlan` for the loaders' arguments, every check done (a bad device or dtype, 4-bit without
    CUDA or bitsandbytes: one line each) before anything is read."""
    if placement not in get_args(Placement):
        raise ValueError(f"placement {placement!r}: one of {get_args(Placement)}")
    dev = choose_device(device)
    if load_in_4bit:
        check_load_in_4bit(dev)
    return LoadPlan(dev, choose_dtype(dtype, dev), placement, load_in_4bit)


def _before_weights(plan: LoadPlan) -> None:
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


# --------------------------------------------------------------------------- loaders


def load_tokenizer(name: str, padding_side: str = "right", trust_remote_code: bool = False) -> Any:
    """Tokenizer for `name`. When it has no pad token, the EOS token is used as pad (the usual choice
    for decoder-only models; attention masks keep pads out of the loss)."""
    from transformers import AutoTokenizer

    path = resolve(name)
    if Path(path).is_dir():
        _check_tokenizer_files(Path(path))
    tokenizer = _from_pretrained(AutoTokenizer, name, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of '{name}' has neither a pad nor an eos token: add one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _finish(model: Any, tokenizer: Any, plan: LoadPlan, lora: LoraSpec | None, task_type: str) -> Any:
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if plan.move:
        model.to(plan.device)
    if lora is not None:
        if plan.load_in_4bit:
            model = _prepare_4bit(model)
        # ZeRO-3 wants one dtype for base and adapter (fp32 adapters on a bf16 base fail at the first step,
        # DeepSpeed issue 8072): the adapter keeps the base's dtype there, as TRL does
        same_dtype = plan.placement == "zero3" and not plan.load_in_4bit
        model = apply_lora(model, lora, task_type, autocast_adapter_dtype=not same_dtype)
    return model


def _prepare_4bit(model: Any) -> Any:
    """QLoRA: peft's `prepare_model_for_kbit_training` (base frozen, norms and embeddings in fp32). Gradient
    checkpointing stays what train.gradient_checkpointing says (the trainer turns it on); the inputs
    require grad so that it works on a frozen base."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    return model


def load_causal_lm(
    name: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    lora: LoraSpec | None = None,
    load_in_4bit: bool = False,
    placement: Placement = "device",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a decoder-only LM, safetensors only, on `device` (in a launched rank:
    its own GPU), optionally with LoRA. `load_in_4bit`: QLoRA's NF4 weights (CUDA + bitsandbytes),
    prepared for k-bit training when `lora` is given. `placement`: `launch_placement()` for a model a
    transformers/TRL Trainer trains (ZeRO-3 partitions it while loading, FSDP places it itself)."""
    from transformers import AutoModelForCausalLM

    plan = plan_loading(device, dtype, placement, load_in_4bit)
    path = _resolve_for_weights(name)
    base = _adapter_base(path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    _before_weights(plan)
    model = _load_weights(
        AutoModelForCausalLM,
        name,
        _resolve_for_weights(base) if base else path,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        **plan.from_pretrained_kwargs(),
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    if base:  # a LoRA run's adapter: merged into its base, so the result is a plain model to use or tune
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return _finish(model, tokenizer, plan, lora, "CAUSAL_LM"), tokenizer


def load_sequence_classifier(
    name: str,
    num_labels: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    lora: LoraSpec | None = None,
    load_in_4bit: bool = False,
    placement: Placement = "device",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a reward model: `AutoModelForSequenceClassification` with `num_labels`
    outputs (1 = scalar reward) and `pad_token_id` set so the last non-pad token is scored. The head
    is freshly initialised when the checkpoint has none (e.g. MiniLM, a causal LM). `load_in_4bit` and
    `placement` as for `load_causal_lm` (the head stays in full precision and trains with LoRA)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    plan = plan_loading(device, dtype, placement, load_in_4bit)
    path = _resolve_for_weights(name)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    _before_weights(plan)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is expected for a reward head
    try:
        model = _load_weights(
            AutoModelForSequenceClassification,
            name,
            path,
            new_head=True,
            num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **plan.from_pretrained_kwargs(),
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return _finish(model, tokenizer, plan, lora, "SEQ_CLS"), tokenizer


@dataclass
class Encoder:
    """A sentence encoder: `embed(texts)` -> (N, hidden) mean-pooled, L2-normalised embeddings."""

    model: Any
    tokenizer: Any
    max_length: int = 256

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
        emb = torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states over non-pad positions (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load_encoder(
    name: str = "minilm", dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> Encoder:
    """`AutoModel` + tokenizer wrapped as an `Encoder` (eval mode) for embeddings."""
    from transformers import AutoModel

    dev = choose_device(device)
    path = _resolve_for_weights(name)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = _load_weights(
        AutoModel,
        name,
        path,
        dtype=choose_dtype(dtype, dev),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.to(dev).eval()
    max_len = min(max_positions(model) or 512, 512)
    return Encoder(model, tokenizer, max_length=max_len)


# --------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraSpec:
    """LoRA options (mirrors `config.LoraSection`; build one with `LoraSpec(**section_fields)`)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] | None = "all-linear"  # None: peft's default for the architecture
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"lora.bias '{self.bias}' is unknown: use none, all or lora_only")

    def to_peft(self, task_type: str = "CAUSAL_LM") -> Any:
        from peft import LoraConfig

        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            targets = list(targets)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
            task_type=task_type,
        )


def apply_lora(model: Any, spec: LoraSpec, task_type: str = "CAUSAL_LM", autocast_adapter_dtype: bool = True) -> Any:
    """Wrap `model` in a peft LoRA adapter. For SEQ_CLS, peft also trains the (new) score head.
    `autocast_adapter_dtype=False` keeps the adapter in the base's dtype (peft's default: fp32)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, spec.to_peft(task_type), autocast_adapter_dtype=autocast_adapter_dtype)
    except ValueError as err:
        raise UserError(f"lora.target_modules {spec.target_modules!r}: {str(err).splitlines()[0]}") from err


def max_positions(model: Any) -> int | None:
    """How many positions (prompt + completion tokens) the model can attend to, from its config
    (`max_position_embeddings`, GPT-2's `n_positions`, ...); None when the config does not say."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; print `100 * t / total` as the trainable %."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
