"""A small causal transformer over bytes (embedding, attention, feed-forward, norms, head)."""

from __future__ import annotations

import torch
from torch import nn


class ByteTransformer(nn.Module):
    """Logits of the next byte at every position: byte and position embeddings, ``layers`` pre-norm
    blocks (causal self-attention, a ``ff``-wide feed-forward, two LayerNorms each), a final norm and
    a linear head over the 256 byte values.  Inputs of up to ``context`` bytes."""

    def __init__(self, d: int = 128, heads: int = 4, layers: int = 2, ff: int = 512, context: int = 128) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.pos(torch.arange(n, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))
