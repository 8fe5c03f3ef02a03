"""The one model loader: names and aliases, local directories, the built-in `tiny`, LoRA.

Every command loads its models here, so the safety policy lives in one place: safetensors only, no
remote code unless asked, nothing downloaded while offline, and a directory that cannot be loaded
(corrupt weights, unknown architecture, weights that do not fit config.json, no tokenizer) is one
`UserError` naming it. Where and how a model is placed (device, dtype, a launched rank's GPU, ZeRO-3,
FSDP, 4-bit QLoRA) is decided in placement.py; sentence encoders are in encoders.py. Both are
re-exported here. Name resolution, the tiny model's recipe, the policy: docs/models.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.encoders import Encoder, load_encoder, mean_pool  # noqa: F401  (re-exported)
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
from alignkit.placement import (  # noqa: F401  (re-exported: where and how a model is placed)
    QLORA_HINT,
    LoadPlan,
    Placement,
    adapters_in_compute_dtype,
    before_weights,
    check_load_in_4bit,
    choose_device,
    choose_dtype,
    launch_placement,
    plan_loading,
    prepare_4bit,
    quantization_config,
    training_dtype,
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
            model = prepare_4bit(model)
        # ZeRO-3 wants one dtype for base and adapter (fp32 adapters on a bf16 base fail at the first step,
        # DeepSpeed issue 8072): the adapter keeps the base's dtype there, as TRL does
        same_dtype = plan.placement == "zero3" and not plan.load_in_4bit
        model = apply_lora(model, lora, task_type, autocast_adapter_dtype=not same_dtype)
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
    its own GPU), optionally with LoRA. `load_in_4bit`: QLoRA's NF4 weights (bitsandbytes; a CUDA GPU, or CPU)
    prepared for k-bit training when `lora` is given. `placement`: `launch_placement()` for a model a
    transformers/TRL Trainer trains (ZeRO-3 partitions it while loading, FSDP places it itself)."""
    from transformers import AutoModelForCausalLM

    plan = plan_loading(device, dtype, placement, load_in_4bit)
    path = _resolve_for_weights(name)
    base = _adapter_base(path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    before_weights(plan)
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
    before_weights(plan)
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
