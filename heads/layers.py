"""Building blocks shared by the flow head and the scale-wise transformer.

Module and parameter names follow the released FlowAR checkpoints (``fc1_g``, ``fc1_x``, ``fc2``,
``rope.freqs``, ...), so their state dicts load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **options)``: the attention of every transformer and head here.

    Training in bf16 on a CPU (bf16 inputs, or CPU autocast to bf16), it runs in float32 and returns bf16:
    torch's CPU flash-attention backward is several times slower in bf16 than in float32, and it held a third of
    the demo's bf16 training step (docs/benchmarks.md#cpu-bf16-attention). The forward alone is as fast in
    either, so without grad (sampling) nothing changes; on a GPU the bf16 kernels are the fast ones."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if autocast_bf16 or q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
            return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, **options)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32, with an optional learned gain."""

    def __init__(self, dim: int, *, weight: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        out = (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


class GatedMLP(nn.Module):
    """``fc2(GELU(fc1_g x) * fc1_x x)``: the gated MLP of FlowAR (timm's SwiGLU with GELU)."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(F.gelu(self.fc1_g(x)) * self.fc1_x(x))
        return self.drop(self.fc2(hidden))


def xavier_init_linears(root: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear under ``root`` (the JAX ViT init FlowAR uses)."""
    def init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    root.apply(init)  # children first, the order nn.Module.apply visits them in the released code


def gated_mlp_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width that keeps a gated MLP's parameters equal to a plain ``mlp_ratio`` MLP."""
    return int(dim * mlp_ratio * 2 / 3.0)


class Rope2D(nn.Module):
    """EVA-style 2D rotary embedding for token grids.

    The first half of each head's channels rotates with the row, the second half with the column;
    channels are rotated in adjacent pairs. A grid of side ``s`` has its positions stretched onto a
    fixed ``grid``-sized canvas (``arange(s) / s * grid``), so every scale of a pyramid covers the same
    extent; an h x w grid stretches its rows and its columns each onto the canvas, so an image of another
    aspect ratio covers that extent too. The 1x1 grid sits at position 0 and is therefore left unrotated.
    """

    def __init__(self, head_dim: int, *, grid: int = 16, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2D RoPE, got {head_dim}")
        axis_dim = head_dim // 2
        self.grid = grid
        # Persistent, because the released checkpoints store it under ``rope.freqs``.
        self.register_buffer(
            "freqs", 1.0 / (theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))
        )
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, sides: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables, each ``(sum(h*w), head_dim)`` float32, for grids given as sides (square) or as
        (height, width)."""
        key = (tuple(sides), str(device))
        if key not in self._tables:
            cos, sin = [], []
            freqs = self.freqs.to(device=device, dtype=torch.float32)

            def angles(length):  # (length, head_dim/2)
                pos = torch.arange(length, device=device, dtype=torch.float32) / length * self.grid
                return torch.repeat_interleave(torch.outer(pos, freqs), 2, dim=-1)

            for size in sides:
                height, width = (size, size) if isinstance(size, int) else size
                rows = angles(height)[:, None, :].expand(height, width, -1)
                cols = angles(width)[None, :, :].expand(height, width, -1)
                full = torch.cat([rows, cols], dim=-1).reshape(height * width, -1)  # (h*w, head_dim)
                cos.append(full.cos())
                sin.append(full.sin())
            self._tables[key] = (torch.cat(cos), torch.cat(sin))
        return self._tables[key]


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Map each adjacent channel pair (a, b) to (-b, a)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_real_form(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in real arithmetic, x cos + rotated x sin: what :func:`apply_rope` computes under torch.compile."""
    return x * cos + rotate_pairs(x) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., L, head_dim) by tables (L, head_dim): each adjacent channel pair (a, b) turns by its
    angle to (a cos - b sin, a sin + b cos), in float32, returned in x's dtype.

    Eager, this is one complex product over the pairs: on a CPU the real form (x cos + rotated x sin) makes five
    passes over the strided query and key views of the qkv output, 4-6x the time of one product, which makes a
    head evaluation 5-14% slower (docs/benchmarks.md#rope-as-a-complex-product). Compiled, it is the real form,
    which inductor fuses into one kernel and can generate code for (it has none for complex operators)."""
    x_float = x.float()
    if torch.compiler.is_compiling():
        return rope_real_form(x_float, cos.float(), sin.float()).type_as(x)
    rotation = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())  # (L, head_dim / 2)
    pairs = torch.view_as_complex(x_float.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos first, then sin) of a 1-D tensor of (possibly fractional) times."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
