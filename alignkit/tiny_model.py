"""The built-in `tiny` model: a 2-layer Llama and a byte-level BPE tokenizer, built in-process.

Built once into the alignkit cache (`$ALIGNKIT_CACHE`, else ~/.cache/alignkit), deterministic for a
seed; its tokenizer is trained on the built-in task's corpus, imported only when building. The
recipe and the tokenizer's boundary property: docs/models.md#the-built-in-tiny-model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import UserError

TINY_VOCAB = 768
TINY_SPECIAL = ["<pad>", "<bos>", "<eos>"]
# "{role}: {content}\n" per message, then "assistant:" as the generation prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
_TINY_BUILD_VERSION = 1  # bump when the build recipe changes, so old cache entries are not reused


def _cache_root(cache_dir: Path | str | None) -> Path:
    env = os.environ.get("ALIGNKIT_CACHE")
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    else:
        root = Path(env).expanduser() if env else Path.home() / ".cache" / "alignkit"
    for part in (root, *root.parents):  # the nearest existing one must be a directory
        if part.exists():
            if not part.is_dir():
                source = " (ALIGNKIT_CACHE)" if cache_dir is None and env else ""
                raise UserError(f"the alignkit cache '{root}'{source} cannot be used: {part} is a file, not a "
                                "directory; set ALIGNKIT_CACHE to a directory")
            break
    return root


def _tiny_tokenizer(corpus: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Whitespace runs, words and punctuation runs are isolated *before* byte-level BPE, so a space is
    # never merged into the next word: splitting a text at any whitespace boundary tokenizes the same.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\w+\s*|[^\w\s]+\s*|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=TINY_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return tok


@functools.lru_cache(maxsize=8)
def _tiny_digest(seed: int) -> str:
    from alignkit.arena import tokenizer_corpus

    recipe = {"v": _TINY_BUILD_VERSION, "config": TINY_CONFIG, "vocab": TINY_VOCAB, "seed": seed}
    recipe["corpus"] = tokenizer_corpus(seed)  # a change in the arena corpus means a new model
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def tiny_dir(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Where `build_tiny` puts (or finds) the tiny model: `<cache>/tiny-<hash of recipe + corpus + seed>`."""
    return _cache_root(cache_dir) / f"tiny-{_tiny_digest(seed)}"


def build_tiny(cache_dir: Path | str | None = None, seed: int = 0) -> Path:
    """Build the tiny Llama + tokenizer once into the cache and return its directory.

    `cache_dir` is the cache *root* (default `$ALIGNKIT_CACHE`, else `~/.cache/alignkit`); the model
    goes to `<root>/tiny-<hash>`. Building happens in a temporary sibling that is renamed into place,
    so a concurrent or interrupted build never leaves a half-written model behind. Deterministic: the
    same seed gives byte-identical weights and tokenizer.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignkit.arena import tokenizer_corpus

    final = tiny_dir(cache_dir, seed)
    if (final / "model.safetensors").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    except OSError as err:
        raise UserError(f"cannot build the tiny model in the alignkit cache '{final.parent}' ({err.strerror}): "
                        "set ALIGNKIT_CACHE to a writable directory") from err
    try:
        backend = _tiny_tokenizer(tokenizer_corpus(seed))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
        )
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        config = LlamaConfig(
            vocab_size=backend.get_vocab_size(),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY_CONFIG,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not "someone else won the race"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
