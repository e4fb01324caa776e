"""The models an experiment can train, and their loss functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaling.config import DataConfig, ModelConfig


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d_model, dim=-1)
        shape = (batch, seq, self.n_heads, d_model // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d_model))
        return x + self.ff(self.norm2(x))


class DecoderLM(nn.Module):
    """A small decoder-only language model: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int,
                 d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def wide_mlp(in_features: int, hidden: int, layers: int, num_classes: int) -> nn.Module:
    widths = [in_features] + [hidden] * layers
    modules: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), nn.ReLU()]
    modules.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*modules)


def build_model(model: ModelConfig, data: DataConfig, num_classes: int) -> nn.Module:
    if model.kind == "resnet":
        import torchvision

        return getattr(torchvision.models, model.name)(weights=None, num_classes=num_classes)
    if model.kind == "transformer":
        return DecoderLM(model.vocab_size, data.seq_len, model.d_model, model.n_layers, model.n_heads, model.d_ff,
                         model.dropout)
    return wide_mlp(model.in_features, model.hidden, model.layers, num_classes)


def loss_fn_for(model: ModelConfig):
    if model.kind == "transformer":
        return lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy
