"""Sampling: K completions per prompt, batched and seeded, with optional log-probs and hidden-state capture.

`generate` is what every command samples with (generate, pairs, eval, qprobe collect). Conventions
(prompt formats, prompt-major order, seeding, greedy decoding, `capture_layer`, `return_logprobs`,
the cap on `max_new_tokens`): docs/models.md#generation. `load_sampler` picks the backend: an HF model
(`hf`, `model.generate`) or a `vllm_backend.VLLMEngine` (`vllm`), which `generate` hands the work to.
`chat` (`--chat auto|on|off`) says when a prompt goes through the tokenizer's chat template
(docs/models.md#chat-templates); `render_prompts` gives every sampler the same text and ids.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import UserError

# The model input of a plain prompt is `prompt + join`: nothing in between by default, as TRL's trainers
# concatenate prompt and completion (the built-in task's `arena.JOIN` is the same, tested).
DEFAULT_JOIN = ""

Prompt = str | list[dict[str, str]]


@dataclass
class Sample:
    prompt: str
    completion: str
    finished: bool  # EOS was emitted within max_new_tokens
    n_tokens: int  # completion tokens, EOS excluded
    index: int  # which of the k samples of this prompt
    token_ids: list[int] = field(default_factory=list, repr=False)  # the completion's ids, EOS excluded
    embedding: torch.Tensor | None = field(default=None, repr=False)  # see capture_layer
    logprob: float | None = None  # see return_logprobs: log π(completion, + EOS if finished | prompt)
    eos_token_id: int | None = field(default=None, repr=False)  # the EOS id emitted when finished

    def to_json(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k not in ("token_ids", "embedding", "eos_token_id")}
        if row["logprob"] is None:  # only requested with return_logprobs
            del row["logprob"]
        return row


def check_settings(k: int = 1, max_new_tokens: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                   batch_size: int = 1) -> None:
    """Sampling settings as the CLI names them; each bad value is one UserError line."""
    if k < 1:
        raise UserError(f"--k must be at least 1 (got {k})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1] (got {top_p})")


# --chat: how a plain-text prompt meets the tokenizer's chat template (docs/models.md#chat-templates)
CHAT_MODES = ("auto", "on", "off")


def chat_mode(chat: str | bool, source: str | None = None) -> str:
    """The `--chat` setting as one of CHAT_MODES (True / False, the old flag: on / off). `auto` for a prompt
    set of the built-in task (`builtin:` sources, `source`) is `off`: its prompts are the opening words of a
    text to continue, not requests to answer (docs/models.md#chat-templates)."""
    mode = ("on" if chat else "off") if isinstance(chat, bool) else chat
    if mode not in CHAT_MODES:
        raise UserError(f"--chat must be auto, on or off (got {chat!r})")
    if mode == "auto" and source is not None and str(source).startswith("builtin:"):
        return "off"
    return mode


def check_chat(tokenizer: Any, chat: str | bool) -> None:
    """`--chat on` needs a chat template: one line before any sampling when the tokenizer has none."""
    if chat_mode(chat) == "on" and not has_chat_template(tokenizer):
        raise UserError("--chat on needs a tokenizer with a chat template and this model's tokenizer has none: "
                        "use --chat auto or off, or give the model a tokenizer with a chat_template")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_template(tokenizer: Any, prompt: Prompt, chat: str | bool = "off") -> bool:
    """Whether `prompt` goes through the chat template: a message list always (it has no plain-text form; TRL
    renders it too); a plain prompt under `on`, and under `auto` when the tokenizer has a template."""
    mode = chat_mode(chat)
    if not isinstance(prompt, str):
        return True
    return mode == "on" or (mode == "auto" and has_chat_template(tokenizer))


def format_prompt(tokenizer: Any, prompt: Prompt, chat: str | bool = "off", join: str = DEFAULT_JOIN) -> str:
    """The text the model sees: the chat template with the generation prompt when `uses_template` (a plain
    prompt is one user turn), else `prompt + join`."""
    if not uses_template(tokenizer, prompt, chat):
        return prompt + join  # type: ignore[operator]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not has_chat_template(tokenizer):
        raise UserError("chat prompts need a tokenizer with a chat template; this model's tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the model's generation_config EOS id(s), then the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    k: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    join: str = DEFAULT_JOIN,
    chat: str | bool = "off",
    capture_layer: int | None = None,
    stats: dict[str, float] | None = None,
    return_logprobs: bool = False,
) -> list[Sample]:
    """K samples for each prompt (prompt-major order); conventions in docs/models.md#generation.

    `max_new_tokens` is capped, with one warning line on stderr, so that the longest prompt plus its
    completion fits the model's positions; `stats["max_new_tokens"]` holds the value used.
    `model` is an HF causal LM, or a `vllm_backend.VLLMEngine` (from `load_sampler`), which samples with
    its own tokenizer under the same contract (docs/vllm.md)."""
    from alignkit.vllm_backend import VLLMEngine

    if isinstance(model, VLLMEngine):
        return model.generate(
            prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            do_sample=do_sample, batch_size=batch_size, seed=seed, progress=progress, join=join, chat=chat,
            capture_layer=capture_layer, stats=stats, return_logprobs=return_logprobs,
        )
    check_settings(k, max_new_tokens, temperature, top_p, batch_size)
    shown, encoded = render_prompts(tokenizer, prompts, chat, join)
    extra = 1 if capture_layer is not None else 0
    max_new_tokens = fit_new_tokens(model, encoded, max_new_tokens, extra)
    greedy = temperature == 0 or not do_sample
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens + extra,
        "do_sample": not greedy,
        "pad_token_id": pad_id,
        "eos_token_id": eos,
    }
    if greedy:  # neutralise sampling knobs a checkpoint's generation_config may carry
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    hook = _LastPosition.attach(model, capture_layer) if capture_layer is not None else None
    if capture_layer is not None and hook is None:  # an architecture we cannot hook: ask for every layer
        gen_kwargs.update(output_hidden_states=True, return_dict_in_generate=True)
    if return_logprobs:
        gen_kwargs.update(output_logits=True, return_dict_in_generate=True)
    as_dict = (capture_layer is not None and hook is None) or return_logprobs

    device = next(model.parameters()).device
    per_batch = max(1, batch_size // k)
    samples: list[Sample] = []
    n_tokens_total = 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(progress, len(prompts) * k) as advance, torch.no_grad():
            for b, lo in enumerate(range(0, len(prompts), per_batch)):
                ids = [ids for ids in encoded[lo : lo + per_batch] for _ in range(k)]
                batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(device)
                if hook is not None:
                    hook.steps.clear()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed + b)
                    out = model.generate(**batch, **gen_kwargs)
                seqs = out.sequences if as_dict else out
                gen = seqs[:, batch["input_ids"].shape[1] :]
                new = _split_completions(gen, eos, pad_id, max_new_tokens, tokenizer)
                if capture_layer is None:
                    emb = None
                elif hook is not None:
                    emb = _at_last_token(torch.stack(hook.steps, dim=1), new["n_tokens"])
                else:
                    emb = _captured(out.hidden_states, capture_layer, new["n_tokens"])
                lps = _logprobs(out.logits, gen, new["n_tokens"], new["finished"]) if return_logprobs else None
                at_end = new["n_tokens"].clamp(max=gen.shape[1] - 1).to(gen.device)
                ended = gen.gather(1, at_end[:, None]).squeeze(1).tolist()  # the EOS id, where finished
                for row in range(gen.shape[0]):
                    i, j = lo + row // k, row % k
                    samples.append(
                        Sample(
                            prompt=shown[i],
                            completion=new["text"][row],
                            finished=bool(new["finished"][row]),
                            n_tokens=int(new["n_tokens"][row]),
                            index=j,
                            token_ids=new["ids"][row],
                            embedding=None if emb is None else emb[row],
                            logprob=None if lps is None else float(lps[row]),
                            eos_token_id=ended[row] if new["finished"][row] else None,
                        )
                    )
                n_tokens_total += int(new["n_tokens"].sum())
                advance(gen.shape[0])
    finally:
        if hook is not None:
            hook.remove()
    model.train(was_training)
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.update(
            n_samples=len(samples),
            seconds=seconds,
            samples_per_s=len(samples) / max(seconds, 1e-9),
            tokens_per_s=n_tokens_total / max(seconds, 1e-9),
            max_new_tokens=max_new_tokens,
        )
    return samples


def load_sampler(spec: str, backend: str = "hf", dtype: str = "auto", device: str = "auto",
                 seed: int = 0) -> tuple[Any, Any]:
    """(sampler, tokenizer) for a policy spec: the HF model (`hf`) or a vLLM engine (`vllm`), what `generate`
    samples from. The backend is checked (`vllm_backend.check_backend`) before anything is loaded;
    close a vLLM engine (`close()`) before loading the next model."""
    from alignkit import models, vllm_backend

    vllm_backend.check_backend(backend, device)
    if backend == "vllm":
        return vllm_backend.VLLMEngine.from_spec(spec, dtype=dtype, seed=seed)
    return models.load_causal_lm(spec, dtype=dtype, device=device)


def fit_new_tokens(model: Any, prompt_ids: list[list[int]], max_new_tokens: int, extra: int = 0) -> int:
    """`max_new_tokens` capped so that the longest prompt + completion (+ `extra` steps) fits the model's
    positions (`models.max_positions`). Capping, rather than refusing, is what transformers users know
    from truncation to `model_max_length`; past its positions a model with learned position embeddings
    (OPT, GPT-2) fails with an index error and a rotary one samples junk. One warning line when it caps;
    a prompt that leaves no room at all is a UserError."""
    from alignkit.models import max_positions

    limit = max_positions(model)
    if limit is None or not prompt_ids:
        return max_new_tokens
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    room = limit - len(prompt_ids[longest]) - extra
    if room < 1:
        raise UserError(
            f"prompt {longest} is {len(prompt_ids[longest])} tokens long: the model attends to {limit} positions, "
            "which leaves no room for a completion; shorten the prompts"
        )
    if max_new_tokens > room:
        print(f"warning: max_new_tokens={max_new_tokens} is beyond the model's {limit} positions (the longest "
              f"prompt has {len(prompt_ids[longest])} tokens): using {room}", file=sys.stderr)
        return room
    return max_new_tokens


def _split_completions(
    gen: torch.Tensor, eos_ids: list[int], pad_id: int, max_new_tokens: int, tokenizer: Any
) -> dict[str, Any]:
    """Cut each generated row at its first EOS (vectorised) and decode the rows in one call."""
    gen = gen[:, :max_new_tokens]  # drop the extra capture step, if any
    is_eos = torch.isin(gen, torch.tensor(eos_ids, device=gen.device))
    finished = is_eos.any(1)
    n_tokens = torch.where(
        finished, is_eos.int().argmax(1), torch.full_like(finished, gen.shape[1], dtype=torch.long)
    )
    keep = torch.arange(gen.shape[1], device=gen.device)[None, :] < n_tokens[:, None]
    ids = [row[:n].tolist() for row, n in zip(gen.cpu(), n_tokens.tolist(), strict=True)]
    text = tokenizer.batch_decode(gen.masked_fill(~keep, pad_id), skip_special_tokens=True)
    return {"text": text, "finished": finished.cpu(), "n_tokens": n_tokens.cpu(), "ids": ids}


def render_prompts(tokenizer: Any, prompts: list[Prompt], chat: str | bool = "off",
                   join: str = DEFAULT_JOIN) -> tuple[list[str], list[list[int]]]:
    """(shown, ids) of each prompt, as every sampler feeds them: `shown` is `Sample.prompt` (the prompt as
    given, or the rendered text when it went through the chat template), `ids` what the model reads."""
    check_chat(tokenizer, chat)
    texts = [format_prompt(tokenizer, p, chat=chat, join=join) for p in prompts]
    shown = [t if uses_template(tokenizer, p, chat) else p for p, t in zip(prompts, texts, strict=True)]
    return shown, prompt_ids(tokenizer, prompts, chat=chat, join=join, texts=texts)


def prompt_ids(
    tokenizer: Any, prompts: list[Prompt], chat: str | bool = "off", join: str = DEFAULT_JOIN,
    texts: list[str] | None = None,
) -> list[list[int]]:
    """The token ids `generate` feeds for each prompt (what a teacher-forced forward must reuse: pass the same
    `chat` and `join`). Plain text gets the tokenizer's own special tokens (BOS); a rendered chat template
    already contains them, so its ids are `apply_chat_template(..., add_generation_prompt=True)`'s."""
    texts = texts or [format_prompt(tokenizer, p, chat=chat, join=join) for p in prompts]
    special = [not uses_template(tokenizer, p, chat) for p in prompts]
    if len(set(special)) == 1:  # the usual case: ONE batched tokenizer call (no padding: the same ids)
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=special[0])["input_ids"]]
    return [tokenizer(t, add_special_tokens=sp)["input_ids"] for sp, t in zip(special, texts, strict=True)]


def _logprobs(
    logits: tuple[torch.Tensor, ...], gen: torch.Tensor, n_tokens: torch.Tensor, finished: torch.Tensor
) -> torch.Tensor:
    """(B,) summed log-softmax of the raw logits at the sampled tokens, through EOS when finished.

    `logits[s]` is the (B, V) distribution step s sampled `gen[:, s]` from (before processors).
    log p(token) = logit[token] − logsumexp(logits), i.e. log_softmax gathered at the token. One step at a
    time (each vectorised over the batch), so at most one (B, V) fp32 copy exists besides the logits that
    `generate` returned — never a stacked (B, steps, V) tensor. Padding after EOS (and the extra capture
    step, which lies at or beyond n_tokens + 1) is masked out.
    """
    device = logits[0].device
    ids = gen[:, : len(logits)].to(device)
    per_token = torch.stack([
        step.float().gather(-1, ids[:, s : s + 1]).squeeze(-1) - torch.logsumexp(step.float(), dim=-1)
        for s, step in enumerate(logits)
    ], dim=1)  # (B, steps)
    keep = (n_tokens + finished.long()).to(device)  # completion tokens + EOS if finished
    mask = torch.arange(per_token.shape[1], device=device)[None, :] < keep[:, None]
    return torch.where(mask, per_token, 0.0).sum(1).double().cpu()


def _captured(hidden_states: tuple, layer: int, n_tokens: torch.Tensor) -> torch.Tensor:
    """Hidden state of `layer` at the last token of prompt + completion, per row (from generate's
    `output_hidden_states`, the fallback when the layer cannot be hooked)."""
    return _at_last_token(torch.stack([step[layer][:, -1, :] for step in hidden_states], dim=1), n_tokens)


def _at_last_token(per_step: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """per_step (B, steps, H): the state at each step's last input position. Step 0 encodes the prompt (its
    last position is the last prompt token, left padding); step s >= 1 feeds generated token s-1, so a
    completion of n tokens ends at step n."""
    idx = n_tokens.to(per_step.device).clamp(max=per_step.shape[1] - 1)
    return per_step[torch.arange(per_step.shape[0], device=per_step.device), idx].float().cpu()


class _LastPosition:
    """A forward hook that keeps ONLY the last position of one layer's output at every decoding step, in
    place of `output_hidden_states` (which returns every layer at every step). The layer numbering is
    `output_hidden_states`': 0 = the embeddings, i = decoder layer i's output, the last = after the final
    norm (decoder-only models with `.model.layers` and `.model.norm`, e.g. Llama, Mistral, Qwen, Gemma)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.steps: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.steps.append(hidden[:, -1, :].detach())

    def remove(self) -> None:
        self.handle.remove()

    @classmethod
    def attach(cls, model: Any, layer: int) -> _LastPosition | None:
        base = getattr(model, "model", None)
        layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
        if layers is None or norm is None or not isinstance(layers, torch.nn.ModuleList):
            return None
        n = len(layers)
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise UserError(f"capture_layer {layer} is out of range for a model with {n} layers (0..{n}, or -1)")
        module = model.get_input_embeddings() if index == 0 else norm if index == n else layers[index - 1]
        return cls(module)


class _progress_bar:
    """Rich progress bar on stderr with samples/s; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("generate", total=self.total, rate="")
        self.t0 = time.perf_counter()

        def advance(n: int) -> None:
            done = self.bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} samples/s")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


def write_jsonl(samples: list[Sample], path: str | Path) -> Path:
    """Write one JSON object per sample (no token ids / embeddings), atomically (tmp + os.replace)."""
    from alignkit.runs import strict_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(strict_json(s.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
