"""Block-causal attention over a scale pyramid, and the KV cache used while sampling."""

from __future__ import annotations

import torch
import torch.nn as nn

from heads.layers import GatedMLP, RMSNorm, Rope2D, apply_rope, attention, gated_mlp_hidden
from vae.pyramid import token_count


def scale_segments(scales) -> list[tuple[int, int]]:
    """(start, end) token offsets of each scale (a side, or a (height, width) grid) in the flattened pyramid
    sequence."""
    segments, start = [], 0
    for size in scales:
        count = token_count(size)
        segments.append((start, start + count))
        start += count
    return segments


def block_causal_mask(scales, device=None) -> torch.Tensor:
    """Boolean (L, L) mask, True where attention is allowed: scale i sees every token of scales <= i."""
    segments = scale_segments(scales)
    length = segments[-1][1]
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    for start, end in segments:
        mask[start:end, :end] = True
    return mask


def block_causal_attention(q, k, v, segments, *, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of (B, H, L, d) q/k/v under the block-causal mask, without materialising the mask.

    Each scale's queries attend to the key prefix that ends with that scale. Every call is then an
    unmasked ``scaled_dot_product_attention``, which may take the flash or memory-efficient kernels
    (a dense float mask forces the slower ones on GPU), and skips the masked-out upper blocks
    entirely instead of computing and discarding them.
    """
    outputs = [
        attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], dropout_p=dropout_p)
        for start, end in segments
    ]
    return torch.cat(outputs, dim=2)


class KVCache:
    """Preallocated per-layer keys and values, filled one scale at a time while sampling."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, length: int, head_dim: int, *, device, dtype):
        shape = (batch, num_heads, length, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # tokens already stored (the same for every layer)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H, n, d) keys/values after the cached ones; return the whole prefix."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rows(self, count: int) -> "KVCache":
        """The first ``count`` rows, sharing this cache's storage and length, for a pass that stores nothing (its
        own length is not this cache's): the conditional rows alone where the null rows are not needed."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[:count] for k in self.keys]
        view.values = [v[:count] for v in self.values]
        view.length = self.length
        return view


class ScaleAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE per scale; block-causal in training, cached in sampling."""

    def __init__(self, dim: int, num_heads: int, *, rope_grid: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = Rope2D(self.head_dim, grid=rope_grid)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope_cos, rope_sin, *, segments=None, cache: KVCache | None = None, layer: int = 0):
        """x (B, n, D); rope tables (n, head_dim) for these tokens.

        Without a cache, ``segments`` lays out the full pyramid and the block-causal mask applies. With a
        cache, ``x`` holds one scale's tokens; they see everything cached plus themselves.
        """
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(q, rope_cos, rope_sin).type_as(v)
        k = apply_rope(k, rope_cos, rope_sin).type_as(v)
        if cache is not None:
            k, v = cache.append(layer, k, v)
            out = attention(q, k, v)
        else:
            out = block_causal_attention(q, k, v, segments, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out))


class ScaleBlock(nn.Module):
    """Transformer block with adaLN from the class embedding: gates, scales and shifts per image."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, rope_grid: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = ScaleAttention(dim, num_heads, rope_grid=rope_grid, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = GatedMLP(dim, gated_mlp_hidden(dim, mlp_ratio), drop=proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, class_embedding, rope_cos, rope_sin, *, segments=None, cache=None, layer=0):
        """x (B, n, D), class_embedding (B, D)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(class_embedding).view(-1, 1, 6, self.dim).unbind(2)
        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)
        x = torch.addcmul(x, self.attn(h, rope_cos, rope_sin, segments=segments, cache=cache, layer=layer), gamma1)
        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        return torch.addcmul(x, self.mlp(h), gamma2)
