"""Rollout: K completions per prompt from the current policy, laid out for teacher-forced forwards.

Layout of a `Batch` of B = prompts × K sequences (prompt-major, as `generation.generate` returns them):

    input_ids  (B, P + C)   the prompt left-padded to P tokens, then the completion right-padded to C
    mask       (B, C)       1 on completion tokens, the EOS included when the sample finished
    logprobs / ref_logprobs / values   (B, C)   aligned with `mask`: entry t belongs to completion token t

Token t of the completion sits at column P + t; the model's distribution for it is the output at
column P + t − 1, which is also where the critic's value V(s_t) is read (the state before the action),
as in OpenRLHF and TRL's former PPOTrainer. Position ids count real tokens only, so left padding
does not shift them (what `generate` does too).

The per-token log-probs of the policy are NOT taken from `generate`'s logits: they come from a
teacher-forced forward over this very layout — the same computation the update repeats with
gradients — so that the PPO ratio π_θ/π_old is exactly 1 on the first minibatch. The policy's and the
reference's logits are divided by the sampling temperature (the distribution the tokens were drawn
from), as TRL's trainers do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit import generation


@dataclass
class Batch:
    """One rollout batch (see the module docstring for the layout)."""

    prompts: list[str]  # (B,) the prompt text, repeated K times
    completions: list[str]  # (B,) decoded, EOS excluded
    finished: torch.Tensor  # (B,) bool: EOS emitted within max_new_tokens
    lengths: torch.Tensor  # (B,) completion tokens, EOS excluded
    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    mask: torch.Tensor  # (B, C) float
    prompt_len: int  # P
    logprobs: torch.Tensor | None = None  # (B, C) π_old, filled by `score_tokens`
    ref_logprobs: torch.Tensor | None = None  # (B, C) π_ref
    values: torch.Tensor | None = None  # (B, C) V(s_t), PPO only

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_policy(model: Any, device: str, seed: int) -> tuple[Any, Any, dict[str, Any], Any]:
    """(policy, tokenizer, load kwargs, LoRA spec or None) of an online loop from its `model:` block: the
    global RNG seeded first (LoRA's A matrices are drawn from it); `load` reloads the same model (a
    reference or critic copy, π_0)."""
    from alignkit import models

    torch.manual_seed(seed)
    load = dict(dtype=model.dtype, device=device, trust_remote_code=model.trust_remote_code,
                load_in_4bit=model.load_in_4bit, attn_implementation=model.attn_implementation)
    lora = models.LoraSpec(**model.lora.model_dump(exclude={"enabled"})) if model.lora.enabled else None
    policy, tokenizer = models.load_causal_lm(model.name, lora=lora, **load)
    return policy, tokenizer, load, lora


def prompt_indices(pool_size: int, iteration: int, n: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The pool indices of this rank's prompts in `iteration`: the iteration takes the next `n` entries of
    one seeded permutation of the pool per pass over it, and rank r keeps entries r, r + world_size, ...
    (disjoint shards). A pure function of its arguments, so a resumed run draws the same prompts."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for j in range(iteration * n, (iteration + 1) * n):
        epoch, i = divmod(j, pool_size)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(pool_size)
        out.append(int(perms[epoch][i]))
    return out[rank::world_size]


def sample(policy: Any, tokenizer: Any, prompts: list[Any], *, k: int, max_new_tokens: int, temperature: float,
           seed: int, batch_size: int = 64, engine: Any | None = None, top_p: float = 1.0,
           chat: str = "off") -> Batch:
    """K completions per prompt from `policy` (`generation.generate`, seeded by `seed`), padded into a `Batch`.

    With `engine` (a colocated `vllm_backend.VLLMEngine`, docs/vllm.md) the policy's current weights are
    pushed into it first (`sync_weights`: one push per rollout, so after every update and after a resume)
    and vLLM samples; the layout, and the teacher-forced log-probs computed from it, are the same.
    `chat` (`generation.chat_mode`) renders the prompts as `generate` does: the batch holds the very ids it fed."""
    if engine is not None:
        engine.sync_weights(policy)
    samples = generation.generate(engine if engine is not None else policy, tokenizer, prompts, k=k,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  batch_size=batch_size, seed=seed, progress=False, chat=chat)
    prompt_ids = [ids for ids in generation.prompt_ids(tokenizer, prompts, chat=chat) for _ in range(k)]
    completion_ids = [s.token_ids + ([s.eos_token_id] if s.finished else []) for s in samples]
    batch = pack(prompt_ids, completion_ids, tokenizer.pad_token_id)
    batch.prompts, batch.completions = [s.prompt for s in samples], [s.completion for s in samples]
    batch.finished = torch.tensor([s.finished for s in samples])
    batch.lengths = torch.tensor([s.n_tokens for s in samples])
    return batch


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int) -> Batch:
    """Token ids of (prompt, completion) pairs padded into a `Batch` (prompts left-padded to P, completions
    right-padded to C; `completion_ids` include the EOS when one was emitted). Text fields are left empty,
    `finished` is read as "ends in a token" unknown (False), `lengths` counts the completion ids."""
    P, C = max(map(len, prompt_ids)), max(1, max(map(len, completion_ids)))
    B = len(prompt_ids)
    input_ids = torch.full((B, P + C), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, P + C), dtype=torch.long)
    mask = torch.zeros((B, C))
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        input_ids[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[row, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[row, P - len(p) : P + len(c)] = 1
        mask[row, : len(c)] = 1.0
    return Batch(prompts=[""] * B, completions=[""] * B, finished=torch.zeros(B, dtype=torch.bool),
                 lengths=torch.tensor([len(c) for c in completion_ids]), input_ids=input_ids,
                 attention_mask=attention, mask=mask, prompt_len=P)


def completion_logits(model: Any, batch: Batch, rows: torch.Tensor | slice = slice(None),
                      temperature: float = 1.0) -> torch.Tensor:
    """(b, C, V) logits / temperature of the completion tokens of `rows`, one forward (with gradients
    when enabled: the update calls it too)."""
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids[rows].to(device), attention_mask=batch.attention_mask[rows].to(device),
                position_ids=batch.position_ids[rows].to(device))
    P = batch.prompt_len
    return out.logits[:, P - 1 : -1].float() / temperature


def token_logprobs(logits: torch.Tensor, batch: Batch, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """(b, C) log π(token t) from completion logits, gathered at the sampled tokens (0 where masked)."""
    targets = batch.input_ids[rows][:, batch.prompt_len :].to(logits.device)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return lp * batch.mask[rows].to(lp.device)


class Critic(torch.nn.Module):
    """The value model: a transformer body and a linear head on its last hidden state (zero-initialised:
    V ≡ 0 at the start, so the first advantages are the returns). Two layouts:

    - `Critic(lm, lora)`: the body of its own copy `lm` of the policy; with `lora` the body is frozen and
      trains its own LoRA adapter (peft FEATURE_EXTRACTION), else it trains whole.
    - `Critic.on_policy_base(policy)`: `policy` is a peft LoRA model; the critic adds a second adapter,
      "critic", to it and reads the same frozen base (one copy of the weights for policy, reference and
      critic). Its forward switches the active adapter to "critic" and back to the policy's.

    `trainable` names the parameters its optimiser steps and its checkpoint holds (adapter or body, and
    the head; never a frozen base)."""

    ADAPTER = "critic"

    def __init__(self, lm: Any, lora: Any | None = None) -> None:
        super().__init__()
        self.body = lm.base_model  # the decoder without its LM head
        if lora is not None:
            from alignkit.models import apply_lora

            self.body = apply_lora(self.body, lora, "FEATURE_EXTRACTION")
        self._host: Any = None  # the policy's peft model when the base is shared
        self._add_head(lm.config.hidden_size, next(self.body.parameters()).device)
        self._names = [name for name, q in self.named_parameters() if q.requires_grad]

    @classmethod
    def on_policy_base(cls, policy: Any) -> Critic:
        """A critic on `policy`'s own frozen base: its adapter is a second one on the peft model `policy`
        (same LoRA settings as the policy's, initialised from the global RNG)."""
        import copy

        critic = cls.__new__(cls)
        torch.nn.Module.__init__(critic)
        critic._host = policy  # not a submodule: the critic's state is its adapter and head, not the base
        critic._policy_adapter = policy.active_adapter
        policy.add_adapter(cls.ADAPTER, copy.deepcopy(policy.peft_config[critic._policy_adapter]))
        critic._add_head(policy.config.hidden_size, next(policy.parameters()).device)
        critic._use(critic._policy_adapter)
        return critic

    @property
    def _adapter(self) -> list[torch.nn.Parameter]:
        return [q for name, q in self._host.named_parameters() if f".{self.ADAPTER}." in name]

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """{name: parameter} of what trains, looked up now (sharding replaces a module's parameters)."""
        if self._host is None:
            params = dict(self.named_parameters())
            return {name: params[name] for name in self._names}
        adapter = {name: q for name, q in self._host.named_parameters() if f".{self.ADAPTER}." in name}
        return adapter | {f"head.{name}": q for name, q in self.head.named_parameters()}

    def _add_head(self, hidden_size: int, device: torch.device) -> None:
        self.head = torch.nn.Linear(hidden_size, 1, device=device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def _use(self, adapter: str) -> None:
        """Make `adapter` the host's active one. peft's set_adapter also freezes every other adapter; the
        policy's and the critic's stay trainable (each forward uses only its own, so the other gets no
        gradient)."""
        self._host.set_adapter(adapter)
        for q in self._adapter:
            q.requires_grad_(True)

    def forward(self, batch: Batch, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(b, C) V(s_t) for the completion tokens of `rows` (0 where masked), one forward."""
        device = self.head.weight.device
        inputs = dict(input_ids=batch.input_ids[rows].to(device), attention_mask=batch.attention_mask[rows].to(device),
                      position_ids=batch.position_ids[rows].to(device))
        if self._host is None:
            hidden = self.body(**inputs).last_hidden_state
        else:
            self._use(self.ADAPTER)
            try:
                hidden = self._host.get_base_model().base_model(**inputs).last_hidden_state
            finally:
                self._use(self._policy_adapter)
        v = self.head(hidden[:, batch.prompt_len - 1 : -1].float()).squeeze(-1)
        return v * batch.mask[rows].to(v.device)


@torch.no_grad()
def score_tokens(batch: Batch, policy: Any, reference: Any | None, critic: Critic | None, temperature: float,
                 minibatch: int, old: bool = True) -> None:
    """Fill `batch.logprobs` (π_old), `batch.ref_logprobs` and, with a critic, `batch.values`: one
    teacher-forced forward of each model over the batch (in chunks of `minibatch` rows), on CPU after.
    `reference` None: the policy is a peft LoRA model and the reference is its base, adapters disabled.
    `old=False` skips π_old (`batch.logprobs` stays None): the caller takes it from its single update's forward."""
    lp, ref, val = [], [], []
    for lo in range(0, len(batch), minibatch):
        rows = slice(lo, lo + minibatch)
        if old:
            lp.append(token_logprobs(completion_logits(policy, batch, rows, temperature), batch, rows).cpu())
        with policy.disable_adapter() if reference is None else contextlib.nullcontext():
            ref_logits = completion_logits(reference or policy, batch, rows, temperature)
        ref.append(token_logprobs(ref_logits, batch, rows).cpu())
        if critic is not None:
            val.append(critic(batch, rows).cpu())
    batch.logprobs, batch.ref_logprobs = (torch.cat(lp) if old else None), torch.cat(ref)
    batch.values = torch.cat(val) if critic is not None else None


__all__ = ["Batch", "Critic", "completion_logits", "load_policy", "pack", "prompt_indices", "sample", "score_tokens",
           "token_logprobs"]
