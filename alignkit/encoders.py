"""Sentence encoders: a model's mean-pooled, L2-normalised embeddings of texts (sentence-transformers
pooling), e.g. the built-in `minilm`. Q-probe's `--embed` features use them. Loading goes through the
one model loader (models.py: safetensors only, one-line errors); docs/models.md ("`minilm`").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignkit.placement import choose_device, choose_dtype


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

    from alignkit import models  # imported on use: models.py re-exports this module's names

    dev = choose_device(device)
    path = models._resolve_for_weights(name)
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = models._load_weights(
        AutoModel,
        name,
        path,
        dtype=choose_dtype(dtype, dev),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.to(dev).eval()
    max_len = min(models.max_positions(model) or 512, 512)
    return Encoder(model, tokenizer, max_length=max_len)
