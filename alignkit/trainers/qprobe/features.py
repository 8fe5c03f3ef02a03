"""Q-probe features: `alignkit qprobe collect` and the features directory it writes.

Features φ(x, a) of prompt + completion are the hidden state of one layer at the last token, captured
during sampling (or one teacher-forced forward: for pairs, and for samples of the vLLM backend), or in
API mode a sentence encoder's embedding. Prompts are fed as the sampler feeds them (`--chat`,
`generation.prompt_ids`). `load_features` reads a directory back and refuses a damaged one with one
line. Layout and choices: docs/algorithms/qprobe.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import UserError
from alignkit.runs import run_readme, strict_json
from alignkit.trainers.qprobe.config import (
    FEATURES_FILE,
    FORMAT,
    INDEX_FILE,
    META_FILE,
    NO_REWARD,
    CollectConfig,
    console_or_stderr,
    say,
)

LAYER_FRACTION = 0.8  # default layer: round(0.8 · num_layers), like the paper's 26 of 32


def default_layer(num_layers: int) -> int:
    """The paper's choice scaled to any depth: round(0.8 · num_layers) (26 of 32 for CodeLlama-7B)."""
    return max(1, round(LAYER_FRACTION * num_layers))


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """A hidden-state index in [0, num_layers] (negative counts from the end, -1 = last)."""
    if layer is None:
        return default_layer(num_layers)
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UserError(
            f"--layer {layer} is out of range: this model has {num_layers} layers (hidden states 0..{num_layers}, "
            "0 = embeddings, or negative from the end)"
        )
    return layer % (num_layers + 1)


@torch.no_grad()
def hidden_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[str] | None = None,
    layer: int = -1,
    batch_size: int = 32,
    completion_ids: Sequence[Sequence[int]] | None = None,
    chat: str | bool = "off",
) -> torch.Tensor:
    """(N, d) hidden state of `layer` at the last token of prompt + completion: ONE teacher-forced forward.

    The input is exactly what generation feeds: `generation.prompt_ids(prompt, chat=chat)` (pass the
    sampler's `chat` setting) followed by the completion's ids (`completion_ids`, e.g. `Sample.token_ids`,
    or the completion text tokenised without special tokens). Rows are right-padded, so positions are
    0..len-1 as in an unpadded forward, and the state is read at each row's last real token. Sequences
    longer than the model's context keep their end.
    """
    from alignkit import generation, models

    if completion_ids is None:
        if completions is None:
            raise ValueError("pass completions or completion_ids")
        completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    pids = generation.prompt_ids(tokenizer, list(prompts), chat=chat)
    seqs = [list(p) + list(c) for p, c in zip(pids, completion_ids, strict=True)]
    limit = models.max_positions(model)
    if limit:
        seqs = [s[-limit:] for s in seqs]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(seqs), batch_size):
        batch = seqs[lo : lo + batch_size]
        lens = torch.tensor([len(s) for s in batch])
        ids = torch.full((len(batch), int(lens.max())), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(batch):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        states = hidden.hidden_states[layer]
        out.append(states[torch.arange(len(batch), device=device), (lens - 1).to(device)].float().cpu())
    model.train(was_training)
    d = model.config.hidden_size
    return torch.cat(out) if out else torch.empty(0, d)


def api_texts(prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """What API mode embeds: prompt + "\\n" + completion (the reference code's embedding input)."""
    return [f"{p}\n{c}" for p, c in zip(prompts, completions, strict=True)]


def feature_spec(mode: str, model: str | None, layer: int | None, encoder: str | None) -> dict[str, Any]:
    """What makes two feature sets comparable: mode + resolved model + layer, or the encoder."""
    if mode == "api":
        return {"mode": "api", "encoder": encoder}
    return {"mode": "hidden", "model": resolved_spec(model), "layer": layer}


def resolved_spec(spec: str | None) -> str | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.is_dir() else str(spec)


@dataclass
class Features:
    """A collect directory in memory: `x` (N, d) for samples, or `chosen` / `rejected` (P, d) for pairs."""

    path: Path
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    x: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def spec(self) -> dict[str, Any]:
        m = self.meta
        return feature_spec(m["mode"], m.get("model"), m.get("layer"), m.get("encoder"))

    def prompt_index(self) -> torch.Tensor:
        return torch.tensor([int(r["prompt_id"]) for r in self.rows], dtype=torch.long)

    def rewards(self, binary_threshold: float | None = None) -> torch.Tensor:
        """(N,) float64 rewards (or 1[reward > T]); UserError naming the first row without one."""
        values = []
        for i, r in enumerate(self.rows):
            v = r.get("reward")
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                raise UserError(
                    f"{self.path / INDEX_FILE} row {i + 1}: no reward (collected with --reward none?): "
                    "collect again with --reward SPEC"
                )
            values.append(float(v))
        r = torch.tensor(values, dtype=torch.float64)
        return (r > binary_threshold).double() if binary_threshold is not None else r

    def per_prompt(self) -> tuple[int, int]:
        """(fewest, most) samples of any prompt."""
        counts = torch.bincount(torch.unique(self.prompt_index(), return_inverse=True)[1])
        return int(counts.min()), int(counts.max())


def load_features(path: str | os.PathLike) -> Features:
    """Read a `qprobe collect` directory; a missing, damaged or inconsistent file is one UserError naming it."""
    path = Path(path)
    missing = [f for f in (FEATURES_FILE, INDEX_FILE, META_FILE) if not (path / f).is_file()]
    if missing:
        raise UserError(
            f"'{path}' is not a Q-probe features directory (no {', '.join(missing)}): write one with "
            "`alignkit qprobe collect`"
        )
    redo = "collect again with `alignkit qprobe collect`"
    meta = _read_meta(path / META_FILE, redo)
    rows = _read_index(path / INDEX_FILE, redo)
    tensors = read_safetensors(path / FEATURES_FILE, redo)
    needed = ("features",) if meta["kind"] == "samples" else ("chosen", "rejected")
    n, d = len(rows), int(meta["d"])
    for name in needed:
        t = tensors.get(name)
        if t is None:
            raise UserError(f"{path / FEATURES_FILE}: no '{name}' tensor (a {meta['kind']} directory needs "
                            f"{' and '.join(needed)}): {redo}")
        if t.dim() != 2 or tuple(t.shape) != (n, d) or not t.is_floating_point():
            raise UserError(f"{path / FEATURES_FILE}: '{name}' is {t.dtype} {list(t.shape)} but {INDEX_FILE} has "
                            f"{n} rows and {META_FILE} d = {d} (expected float [{n}, {d}]): {redo}")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{path / FEATURES_FILE}: '{name}' holds NaN or infinite values: {redo}")
    if n == 0:
        raise UserError(f"'{path}' holds no samples")
    return Features(path, meta, rows, tensors.get("features"), tensors.get("chosen"), tensors.get("rejected"))


def _read_meta(file: Path, redo: str) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}): {redo}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{file} must hold a JSON object, not {type(meta).__name__}: {redo}")
    if meta.get("kind") not in ("samples", "pairs") or meta.get("mode") not in ("hidden", "api"):
        raise UserError(f"{file}: 'kind' must be samples or pairs and 'mode' hidden or api "
                        f"(got {meta.get('kind')!r}, {meta.get('mode')!r}): {redo}")
    d = meta.get("d")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise UserError(f"{file}: 'd' must be a positive integer (got {d!r}): {redo}")
    return meta


def _read_index(file: Path, redo: str) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = file.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text ({err}): {redo}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{file} line {i} is not valid JSON ({err}): {redo}") from None
        pid = row.get("prompt_id") if isinstance(row, dict) else None
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise UserError(f"{file} line {i}: a row must be a JSON object with an integer 'prompt_id': {redo}")
        rows.append(row)
    return rows


def read_safetensors(file: Path, redo: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or garbage file is one UserError saying `redo`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{file} is not a readable safetensors file (truncated or damaged: {err}): {redo}") from None


def model_facts(spec: str) -> tuple[Any, Any]:
    """(tokenizer, transformers config) of a model spec (run dir, model dir, adapter dir, alias, tiny), read
    without its weights: the checks before any model loads (chat template, layer, hidden size)."""
    from transformers import AutoConfig

    from alignkit import models

    path = models._resolve_for_weights(spec)
    base = models._adapter_base(path)
    tokenizer = models.load_tokenizer(path)
    config = AutoConfig.from_pretrained(models._resolve_for_weights(base) if base else path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return tokenizer, text


def chat_setting(tokenizer: Any, chat: str, prompts: Sequence[Any], source: str) -> tuple[str, bool]:
    """(`chat` resolved for this tokenizer, `on` or `off`; whether any prompt goes through the chat template).

    `chat` is `generation.chat_mode`'s (auto already resolved for `builtin:` sources). The resolved setting,
    recorded in meta.json, renders plain prompts from any source as `chat` rendered these (`qprobe sample`
    reuses it). Message prompts need a template: one line naming `source` and the row when there is none."""
    from alignkit import generation

    generation.check_chat(tokenizer, chat)
    if not generation.has_chat_template(tokenizer):
        at = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if at is not None:
            raise UserError(f"{source} row {at + 1}: the prompt is a list of chat messages and this model's tokenizer "
                            "has no chat template to render it: give plain-text prompts or a model whose tokenizer "
                            "has a chat_template")
    mode = "on" if generation.uses_template(tokenizer, "", chat) else "off"
    return mode, any(generation.uses_template(tokenizer, p, mode) for p in prompts)


def reply_text(value: Any, side: str, row: int, source: str) -> str:
    """A pair's chosen / rejected as completion text: a string as is, one assistant message's content."""
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0].get("role") == "assistant":
        return str(value[0]["content"])
    raise UserError(f"{source} row {row + 1}: '{side}' holds {len(value)} messages; Q-probe embeds one assistant "
                    "reply per side: give one assistant message (or plain text) as the completion")


def _prompt_key(prompt: Any) -> str:
    """A hashable key of a prompt (a message list as its JSON), for one id per distinct prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def sample_features(
    sampler: Any, tok: Any, prompts: list, k: int, *, layer: int | None, encoder: Any, progress: bool,
    max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int, chat: str = "off",
    load_model: Callable[[], Any] | None = None,
) -> tuple[list, torch.Tensor, dict[str, float]]:
    """k samples per prompt from the base model and their features, in prompt-major order.

    `sampler` is what `generation.load_sampler` gives: an HF model, whose layer-`layer` state is captured while
    it samples, or a `vllm_backend.VLLMEngine`, which cannot capture: it is closed after sampling and, in
    hidden mode, `load_model()` gives the HF model for ONE teacher-forced forward over the very ids the engine
    read (`hidden_features` with the same `chat`). API mode embeds prompt + completion with `encoder`.
    Timings: `generate_s` (sampling), `embed_s` (encoder), `forward_s` / `forward_load_s` (vLLM, hidden)."""
    from alignkit import generation
    from alignkit.vllm_backend import VLLMEngine

    engine = isinstance(sampler, VLLMEngine)
    stats: dict[str, float] = {}
    try:
        samples = generation.generate(
            sampler, tok, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            batch_size=batch_size, seed=seed, progress=progress, stats=stats, chat=chat,
            capture_layer=None if encoder is not None or engine else layer,
        )
    finally:
        if engine:
            sampler.close()  # its GPU memory, before the HF model (or a scorer) loads; also on an error
    timing = {"generate_s": stats.get("seconds", 0.0), "samples_per_s": stats.get("samples_per_s", 0.0),
              "embed_s": 0.0, "forward_s": 0.0}
    t0 = time.perf_counter()
    if encoder is not None:
        texts = api_texts([s.prompt for s in samples], [s.completion for s in samples])
        x = encoder.embed(texts, batch_size=batch_size)
        timing["embed_s"] = time.perf_counter() - t0
    elif engine:
        if load_model is None or layer is None:
            raise ValueError("hidden features of vLLM samples need load_model (the HF model) and the layer")
        model = load_model()
        timing["forward_load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        x = hidden_features(model, tok, [p for p in prompts for _ in range(k)], layer=layer, batch_size=batch_size,
                            completion_ids=[s.token_ids for s in samples], chat=chat)
        timing["forward_s"] = time.perf_counter() - t1
        del model
    else:
        x = torch.stack([s.embedding for s in samples]) if samples else torch.empty(0, sampler.config.hidden_size)
    return samples, x.float().contiguous(), timing


def collect(cfg: CollectConfig, progress: bool = True, console: Any | None = None) -> dict[str, Any]:
    """`alignkit qprobe collect`: validate, sample, score, embed, then write the directory; returns the summary."""
    from alignkit import data, generation, models, rewards, vllm_backend
    from alignkit.config import to_yaml
    from alignkit.runs import RunDir, checked_output
    from alignkit.trainers._hf import quiet_libraries

    quiet_libraries()
    console = console_or_stderr(console)
    t_start = time.perf_counter()
    out = checked_output(cfg.output.dir, cfg.output.overwrite, "qprobe-collect")
    vllm_backend.check_backend(cfg.backend, cfg.device)
    kind = "pairs" if cfg.pairs else "samples"
    source = cfg.pairs or cfg.prompts
    if kind == "pairs":
        ds, _ = data.load(cfg.pairs, kind="pairwise", max_samples=cfg.max_samples, seed=cfg.seed)
        sides = {side: [reply_text(v, side, i, cfg.pairs) for i, v in enumerate(ds[side])]
                 for side in ("chosen", "rejected")}
    else:
        ds, _ = data.load(cfg.prompts, kind="prompts", max_samples=cfg.max_samples, seed=cfg.seed)
    prompts = list(ds["prompt"])
    tok, config = model_facts(cfg.model)  # the cheap checks, before any weights load
    chat, templated = chat_setting(tok, generation.chat_mode(cfg.chat, source), prompts, source)
    n_layers = int(config.num_hidden_layers)
    layer = None if cfg.embed else resolve_layer(cfg.layer, n_layers)
    wants_reward = kind == "samples" and cfg.reward != NO_REWARD
    if wants_reward:  # checked now, loaded after sampling (a vLLM engine needs 0.9 of the GPU free to start)
        rewards.check_scorer_spec(cfg.reward)
    encoder = models.load_encoder(cfg.embed, device=cfg.device) if cfg.embed else None
    mode = "api" if encoder is not None else "hidden"

    def load_model() -> Any:
        return models.load_causal_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)[0]

    timings: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    if kind == "samples":
        say(console, f"sampling {len(prompts)} prompts x {cfg.n} from {cfg.model}"
                     + (" with vLLM" if cfg.backend == "vllm" else "")
                     + f" ({'encoder ' + cfg.embed if encoder is not None else f'layer {layer} of {n_layers}'})")
        sampler, tok = generation.load_sampler(cfg.model, cfg.backend, dtype=cfg.dtype, device=cfg.device,
                                               seed=cfg.seed)
        samples, x, timings = sample_features(
            sampler, tok, prompts, cfg.n, layer=layer, encoder=encoder, progress=progress,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            batch_size=cfg.batch_size, seed=cfg.seed, chat=chat, load_model=load_model,
        )
        del sampler
        reward = [None] * len(samples)
        scorer = None
        if wants_reward:
            scorer = rewards.load_scorer(cfg.reward, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)
            t0 = time.perf_counter()
            rep = [p for p in prompts for _ in range(cfg.n)]
            scores = scorer.score(rep, [s.completion for s in samples], [s.finished for s in samples]).mean
            reward = [float(v) for v in scores.double()]
            timings["reward_s"] = time.perf_counter() - t0
            if not all(math.isfinite(v) for v in reward):
                raise UserError(f"reward '{cfg.reward}' returned a non-finite value: check the scorer")
        ids = {p: j for j, p in enumerate(dict.fromkeys(map(_prompt_key, prompts)))}  # a repeated prompt: ONE id
        rows = [
            {"prompt_id": ids[_prompt_key(prompts[i // cfg.n])], "prompt": prompts[i // cfg.n], "sample": s.index,
             "completion": s.completion,
             "finished": s.finished, "n_tokens": s.n_tokens, "reward": reward[i]}
            for i, s in enumerate(samples)
        ]
        tensors["features"] = x
        d = x.shape[1]
    else:
        say(console, f"embedding {len(prompts)} pairs with {cfg.model if encoder is None else cfg.embed}")
        t0 = time.perf_counter()
        if encoder is not None:  # the prompt as the model reads it, as `Sample.prompt` in sampled features
            shown, _ = generation.render_prompts(tok, prompts, chat)
            for side in ("chosen", "rejected"):
                tensors[side] = encoder.embed(api_texts(shown, sides[side]), batch_size=cfg.batch_size)
        else:
            model = load_model()
            for side in ("chosen", "rejected"):
                tensors[side] = hidden_features(model, tok, prompts, sides[side], layer, cfg.batch_size, chat=chat)
            del model
        timings["embed_s"] = time.perf_counter() - t0
        extra = "prob" if "prob" in ds.column_names else None
        rows = [
            {"pair_id": i, "prompt_id": i, "prompt": prompts[i], "chosen": sides["chosen"][i],
             "rejected": sides["rejected"][i], **({"prob": ds[extra][i]} if extra else {})}
            for i in range(len(ds))
        ]
        d = tensors["chosen"].shape[1]
    timings["total_s"] = time.perf_counter() - t_start

    meta = {
        "format": FORMAT, "kind": kind, "mode": mode, "model": cfg.model, "model_resolved": resolved_spec(cfg.model),
        "layer": layer, "num_layers": n_layers, "encoder": cfg.embed, "d": int(d),
        "n_prompts": len(prompts), "n_per_prompt": cfg.n if kind == "samples" else None, "n_rows": len(rows),
        "reward": None if kind == "pairs" or cfg.reward == NO_REWARD else cfg.reward,
        "source": source, "backend": cfg.backend if kind == "samples" else None, "chat": chat,
        "templated": templated, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "top_p": cfg.top_p, "seed": cfg.seed, "timings": timings,
    }
    if kind == "samples" and scorer is not None:
        r = torch.tensor([row["reward"] for row in rows], dtype=torch.float64)
        meta["reward_mean"] = float(r.mean())
        meta["eos_rate"] = sum(row["finished"] for row in rows) / len(rows)
    run = RunDir.open(out, cfg.output.overwrite, False, to_yaml(cfg))
    _write_features(run, tensors, rows, meta)
    final = run.finish({"command": cfg.command, **meta}, readme=_COLLECT_README)
    say(console, f"{len(rows)} {'samples' if kind == 'samples' else 'pairs'}, d = {d}"
                  + (f", mean reward {meta['reward_mean']:+.3f}" if "reward_mean" in meta else "")
                  + f" -> {final}/ ({timings['total_s']:.1f} s)")
    return {"command": cfg.command, **meta, "output_dir": str(final)}


def _write_features(run: Any, tensors: dict[str, torch.Tensor], rows: list[dict], meta: dict) -> None:
    from safetensors.torch import save_file

    from alignkit.runs import atomic_write_text

    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(run.path(FEATURES_FILE)))
    atomic_write_text(run.path(INDEX_FILE), "".join(strict_json(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(run.path(META_FILE), strict_json(meta, indent=2) + "\n")


_COLLECT_README = run_readme(
    "alignkit qprobe collect",
    '`features.safetensors`: `features` float32 [N, d] (samples) or `chosen` / `rejected` [P, d] (pairs); '
    '`index.jsonl`: one row per sample (prompt_id, prompt, sample, completion, finished, n_tokens, reward) or '
    'pair; `meta.json`: model, layer or encoder, d, samples per prompt, reward spec, backend, chat setting, '
    'timings. '
    'Next: `alignkit qprobe fit THIS_DIR`. See docs/algorithms/qprobe.md.',
)
