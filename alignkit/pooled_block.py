"""The reward ensemble's last transformer block, computed at the pooled position only.

A sequence reward reads ONE position of the last block's output per row (BERT: [CLS] through the
pooler; Llama / Mistral / Qwen2 sequence classifiers: the last non-pad token), so that block needs
keys and values at every position but its query, attention output and MLP only there (about 1/6 of
its work). `for_model` decides once, from the module classes, whether a model qualifies (None: the
full forward); `PooledLastBlock.active` swaps the block's forward in for one model call. How, and
the limits: docs/algorithms/rm-ensemble.md, "Pooled last block".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


def _bert_classes() -> dict[str, type]:
    from transformers.models.bert import modeling_bert as bert

    return {"model": bert.BertForSequenceClassification, "layer": bert.BertLayer,
            "attention": bert.BertSelfAttention, "pooler": bert.BertPooler}


def _decoder_families() -> list[dict[str, type]]:
    """Sequence classifiers whose last block is Llama's (pre-norm, RoPE, causal attention, gated MLP)
    and whose head is transformers' generic one (score every position, read the last non-pad token)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return [
        {"model": m.__dict__[f"{p}ForSequenceClassification"], "layer": m.__dict__[f"{p}DecoderLayer"],
         "attention": m.__dict__[f"{p}Attention"], "mlp": m.__dict__[f"{p}MLP"], "norm": m.__dict__[f"{p}RMSNorm"]}
        for m, p in ((llama, "Llama"), (mistral, "Mistral"), (qwen2, "Qwen2"))
    ]


def _bert_block(base: Any) -> torch.nn.Module | None:
    c = _bert_classes()
    cfg = base.config
    if type(base) is not c["model"] or type(getattr(base.bert, "pooler", None)) is not c["pooler"]:
        return None  # another head, or no pooler: the [CLS] row is not what is read
    if cfg.is_decoder or cfg.add_cross_attention:
        return None
    block = base.bert.encoder.layer[-1]
    if type(block) is not c["layer"] or type(block.attention.self) is not c["attention"]:
        return None
    return None if block.attention.is_cross_attention else block


def _decoder_block(base: Any) -> torch.nn.Module | None:
    from transformers.modeling_layers import GenericForSequenceClassification

    for c in _decoder_families():
        if type(base) is not c["model"]:
            continue
        if type(base).forward is not GenericForSequenceClassification.forward:
            return None
        block, norm = base.model.layers[-1], base.model.norm
        if type(block) is not c["layer"] or type(norm) is not c["norm"]:
            return None
        attn = block.self_attn
        if type(attn) is not c["attention"] or type(block.mlp) is not c["mlp"]:
            return None
        if any(type(n) is not c["norm"] for n in (block.input_layernorm, block.post_attention_layernorm)):
            return None
        # a sliding window changes which keys the last token sees: not modelled here (Qwen2 sets it
        # per layer on the attention module, Mistral in the config, Llama has none)
        window = getattr(attn if hasattr(attn, "sliding_window") else base.config, "sliding_window", None)
        if window is not None:
            return None
        return block
    return None


def for_model(model: Any) -> PooledLastBlock | None:
    """The pooled last block of `model` (a peft model or a plain sequence classifier), or None when the
    model is not one this module reproduces exactly: a BERT sequence classifier (exact classes, encoder
    with its pooler) or a Llama / Mistral / Qwen2 sequence classifier without a sliding window."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for family, find in (("bert", _bert_block), ("decoder", _decoder_block)):
        block = find(base)
        # a block whose forward something else already replaced (accelerate's device-map hook) is left alone
        if block is not None and "forward" not in block.__dict__ and not hasattr(block, "_hf_hook"):
            return PooledLastBlock(block, family, base.config)
    return None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one query per row: q (R, heads, 1, d), k / v (R, kv_heads, T, d), visible (R, T)
    bool -> (R, 1, heads·d). Softmax in float32, masked keys at the dtype's minimum (transformers'
    eager attention); grouped key/value heads repeated as `repeat_kv` does."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~visible[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2).reshape(q.shape[0], 1, -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama applies it: x (R, heads, L, d), cos / sin (R, L, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class PooledLastBlock:
    """The last block of a supported sequence classifier, computed at the position its head reads.

    Inside `active(input_ids, attention_mask)` the block's forward takes the usual arguments and
    returns the usual (R, T, H) output, but only the pooled position of each row is computed (the
    other positions repeat it: nothing reads them). Every projection, norm and MLP is called as the
    module it is, so LoRA layers and peft's mixed-batch `adapter_names` hooks apply (rows keep their
    order). The block's own forward runs instead when something unexpected is passed (a cache, cross
    attention inputs, training mode, rows that do not match the ids)."""

    def __init__(self, block: torch.nn.Module, family: str, config: Any) -> None:
        self.block, self.family, self.config = block, family, config

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(R,) the position the head reads in each row: 0 ([CLS]) for BERT; for a decoder the
        rightmost token that is not the pad token, as transformers' sequence classifier finds it."""
        rows, length = input_ids.shape
        if self.family == "bert":
            return torch.zeros(rows, dtype=torch.long, device=input_ids.device)
        pad = self.config.get_text_config().pad_token_id
        if pad is None:
            return torch.full((rows,), length - 1, dtype=torch.long, device=input_ids.device)
        index = torch.arange(length, device=input_ids.device, dtype=torch.int32)
        return (index * (input_ids != pad).to(torch.int32)).argmax(-1).long()

    @contextlib.contextmanager
    def active(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Around one model call on these ids (the call's own rows: N·B for a mixed batch)."""
        if "forward" in self.block.__dict__:  # replaced since (a hook): leave it to run the full block
            yield
            return
        visible = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.block.forward = functools.partial(self._forward, self.positions(input_ids), visible)
        try:
            yield
        finally:
            self.block.__dict__.pop("forward", None)

    def _forward(self, pos: torch.Tensor, visible: torch.Tensor, hidden_states: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        full = type(self.block).forward
        rows, length = visible.shape
        unexpected = (self.block.training or hidden_states.shape[:2] != (rows, length)
                      or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None)
        if self.family == "bert":
            cross = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            if unexpected or cross is not None:
                return full(self.block, hidden_states, *args, **kwargs)
            out = self._bert(hidden_states, pos, visible)
        else:
            rope = kwargs.get("position_embeddings")
            if unexpected or rope is None or args:
                return full(self.block, hidden_states, *args, **kwargs)
            out = self._decoder(hidden_states, pos, visible, rope)
        return out.expand(rows, length, out.shape[-1])

    def _bert(self, h: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """BertLayer at [CLS]: self-attention (keys of the unmasked positions, no causal mask), then
        BertSelfOutput and the feed-forward chunk, both position-wise."""
        attn, (rows, length) = self.block.attention.self, visible.shape
        d = attn.attention_head_size
        h_pool = h[torch.arange(rows, device=h.device), pos].unsqueeze(1)
        q = attn.query(h_pool).view(rows, 1, -1, d).transpose(1, 2)
        k = attn.key(h).view(rows, length, -1, d).transpose(1, 2)
        v = attn.value(h).view(rows, length, -1, d).transpose(1, 2)
        context = _attend(q, k, v, visible, attn.scaling)
        attended = self.block.attention.output(context, h_pool)
        return self.block.feed_forward_chunk(attended)

    def _decoder(self, h: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A Llama decoder layer at the pooled token: pre-norm (all positions, for keys and values),
        RoPE at each token's position, causal attention over the unmasked keys up to the pooled token,
        o_proj, residual, post-attention norm, MLP, residual."""
        block, (rows, length) = self.block, visible.shape
        attn, d = block.self_attn, block.self_attn.head_dim
        at = torch.arange(rows, device=h.device)
        x = block.input_layernorm(h)
        q = attn.q_proj(x[at, pos].unsqueeze(1)).view(rows, 1, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(rows, length, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(rows, length, -1, d).transpose(1, 2)
        cos, sin = (t.expand(rows, -1, -1) for t in rope)  # (1 or R, T, d): the model's own RoPE
        q = _rotate(q, cos[at, pos].unsqueeze(1), sin[at, pos].unsqueeze(1))
        k = _rotate(k, cos, sin)
        causal = torch.arange(length, device=h.device)[None, :] <= pos[:, None]
        context = _attend(q, k, v, visible & causal, attn.scaling)
        hidden = h[at, pos].unsqueeze(1) + attn.o_proj(context)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))
