"""Velocity networks for the flow-matching head: ``net(x_t, t, cond) -> v``.

All heads take x_t (B, N, C) noisy tokens, t (B,) times in [0, 1] (t = 1 noise, see ``heads.path``)
and cond (B, N, D) per-token conditions from the autoregressive transformer, and return v (B, N, C)
in x_t's dtype.

``FlowTransformerHead`` is FlowAR's head: a small transformer over the N = s*s tokens of one scale.
Its module and parameter names equal those under ``flownet.`` in the released FlowAR checkpoints,
so ``head.load_state_dict(sd_without_prefix, strict=True)`` works unchanged.
``MLPHead`` is MAR's per-token MLP head (no attention): cheaper, every token independent.

Built with ``flow_map=True``, either head is a flow-map head (MeanFlow, ``heads.meanflow``): it also takes r (B,),
r <= t, and predicts the average velocity u(x_t, r, t) over [r, t], so that x_r = x_t - (t - r) u jumps along
the flow in one evaluation; r = None (or r = t) is the ordinary velocity. Its one extra module,
``interval_embed``, embeds t - r into the time embedding with a zero-initialised output, so every other key is
the ordinary head's and a released head loaded with ``load_velocity_state`` predicts its velocity at every r,
bit for bit, until trained.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow import FlowHead
from .layers import GatedMLP, RMSNorm, Rope2D, apply_rope, attention, gated_mlp_hidden, timestep_embedding, \
    xavier_init_linears
from .meanflow import flow_map_loss

HEAD_KINDS = ("transformer-v1", "transformer-v2", "mlp")

# The released head uses 64 channels per attention head and a 16x16 RoPE canvas.
HEAD_DIM = 64
ROPE_GRID = 16


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1 + scale) + shift, as one fused multiply-add once 1 + scale is made."""
    return torch.addcmul(shift, x, 1 + scale)


def _square_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"x must hold a square grid of tokens (2D RoPE), got N={n}")
    return side


def _check_inputs(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, token_dim: int, cond_dim: int,
                  r: Optional[torch.Tensor] = None, flow_map: bool = False) -> None:
    if x.ndim != 3 or x.shape[-1] != token_dim:
        raise ValueError(f"x must be (B, N, {token_dim}), got {tuple(x.shape)}")
    if cond.ndim != 3 or cond.shape[:2] != x.shape[:2] or cond.shape[-1] != cond_dim:
        raise ValueError(f"cond must be ({x.shape[0]}, {x.shape[1]}, {cond_dim}) to match x, got {tuple(cond.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    if r is not None:
        if not flow_map:
            raise ValueError(NOT_A_FLOW_MAP)
        if r.shape != t.shape:
            raise ValueError(f"r must have the shape of t {tuple(t.shape)}, got {tuple(r.shape)}")


NOT_A_FLOW_MAP = ("r was given, but this head predicts the instantaneous velocity v(x_t, t); build it with "
                  "flow_map=True (and load an ordinary head's weights with load_velocity_state) to predict the "
                  "average velocity u(x_t, r, t) over [r, t]")


#################################################################################
#                               Shared pieces                                   #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds times t in [0, 1] as sinusoids of 1000 t followed by a two-layer MLP."""

    def __init__(self, width: int, *, freq_dim: int = 256, quantize: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.freq_dim = freq_dim
        # The released FlowAR head truncates 1000 t to an integer; keep that to reproduce its outputs.
        self.quantize = quantize

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) -> (B, width)."""
        steps = (t * 1000).long() if self.quantize else t * 1000
        freq = timestep_embedding(steps, self.freq_dim)  # (B, freq_dim) float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class AdaFinalLayer(nn.Module):
    """DiT's final layer: norm, adaptive shift and scale from the condition, linear projection."""

    def __init__(self, width: int, out_dim: int, norm: nn.Module):
        super().__init__()
        self.norm_final = norm
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowMapMode:
    """Mixin for head networks: the optional flow-map mode (``flow_map=True``), its extra module
    ``interval_embed`` and the loading of an ordinary head's weights into it."""

    INTERVAL_PREFIX = "interval_embed."

    def _add_interval_embed(self, flow_map: bool) -> None:
        self.flow_map = bool(flow_map)
        if self.flow_map:
            # Continuous: the MeanFlow target differentiates u in t, also through t - r.
            self.interval_embed = TimestepEmbedder(self.width, quantize=False)

    def _init_interval_embed(self) -> None:
        """The time embedder's init, but a zero last layer: the embedding of t - r adds exactly 0 to the time
        embedding, so an untrained flow map is the velocity head it starts from."""
        if not self.flow_map:
            return
        nn.init.normal_(self.interval_embed.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.interval_embed.mlp[0].bias)
        self._zero_interval_output()

    def _zero_interval_output(self) -> None:
        with torch.no_grad():
            self.interval_embed.mlp[2].weight.zero_()
            self.interval_embed.mlp[2].bias.zero_()

    def _interval(self, t: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
        """t - r, the interval the average velocity is over; r = None is r = t (the velocity)."""
        return torch.zeros_like(t) if r is None else t - r

    def _step_function(self, step):
        """``velocity(x, t, r=None)`` over one step's arithmetic ``step(x, t, interval)``, chosen once per
        condition so that the per-step call checks nothing: a flow-map head passes t - r, an ordinary one refuses
        r with one ``is not None`` (heads.flow.sample_flow checked the solve's inputs)."""
        if self.flow_map:
            return lambda x, t, r=None: step(x, t, self._interval(t, r))

        def velocity(x: torch.Tensor, t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
            if r is not None:
                raise ValueError(NOT_A_FLOW_MAP)
            return step(x, t, None)

        return velocity

    def _time_embedding(self, t: torch.Tensor, interval: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, W): the embedding of t, plus that of the interval t - r in a flow-map head (exactly + 0 until
        trained)."""
        t_emb = self.time_embed(t)
        return t_emb if interval is None else t_emb + self.interval_embed(interval)

    def load_velocity_state(self, state: Mapping[str, torch.Tensor]):
        """Load an ordinary head's state dict (a released checkpoint's, say) into this head and return the head.

        Strict: ``state`` must hold exactly this head's keys but ``interval_embed.*``. The interval embedding's
        output is then zeroed, so the flow-map head predicts the loaded head's velocity at every r, bit for bit,
        until it is trained. On an ordinary head this is ``load_state_dict(state, strict=True)``."""
        own = [k for k in state if k.startswith(self.INTERVAL_PREFIX)]
        if own:
            raise ValueError(f"state holds {own[0]!r}: it is a flow-map head's state dict, not an ordinary head's; "
                             "load it with load_state_dict")
        expected = {k for k in self.state_dict() if not k.startswith(self.INTERVAL_PREFIX)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"state must hold exactly the ordinary head's keys; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=not self.flow_map)
        if self.flow_map:
            self._zero_interval_output()
        return self

    def flow_map_loss(self, x: torch.Tensor, cond: torch.Tensor, *, r: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MeanFlow loss (B,) of clean tokens x (B, N, C) under cond (B, N, D) over [r, t] (B,) with the
        path's noise; see ``heads.meanflow.flow_map_loss``. Needs ``flow_map=True``."""
        if not self.flow_map:
            raise ValueError("flow_map_loss needs a flow-map head (flow_map=True): " + NOT_A_FLOW_MAP)
        return flow_map_loss(self.conditioned(cond), x, noise, r, t)


#################################################################################
#                          FlowAR's transformer head                            #
#################################################################################


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on queries and keys."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        # Only here so the checkpoint's ``attn.rope.freqs`` has a home; the head builds the tables once.
        self.rope = Rope2D(width // num_heads, grid=ROPE_GRID)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, N, W), cos/sin (N, head_dim) -> (B, N, W)."""
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        out = attention(q, k, v)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class CrossAttention(nn.Module):
    """Attention from the head's tokens to the AR condition tokens, RoPE on both sides."""

    def __init__(self, width: int, cond_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.rope = Rope2D(width // num_heads, grid=ROPE_GRID)

    def keys_values(self, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond (B, N, D) -> keys (with RoPE) and values, each (B, H, N, hd). They depend on the condition alone,
        so a sampler computes them once per scale instead of at every ODE step."""
        B, N, _ = cond.shape
        k, v = self.kv(cond).view(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)), v

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x (B, N, W), keys_values from :meth:`keys_values` -> (B, N, W). Queries and keys share one grid,
        so one table."""
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, hd)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        out = attention(q, *keys_values)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class BlockV1(nn.Module):
    """FlowAR-S head block: attention and MLP both modulated per token by SiLU(t + c)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, num_heads)
        self.norm2 = RMSNorm(width)
        self.mlp = GatedMLP(width, gated_mlp_hidden(width), drop=0.0)
        self.ada_lin = nn.Linear(width, 6 * width)

    def condition(self, cond, cos, sin):
        """What this block computes from the raw condition alone: nothing (v1 sees it only through c)."""
        return None

    def forward(self, x, t, c, cond_features, cos, sin):
        """x (B, N, W), t (B, 1, W), c (B, N, W) embedded condition; cond_features (None) is unused here."""
        # One (B, N, 6W) modulation per token; the gates carry no +1, as released.
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(F.silu(t + c)).chunk(6, dim=-1)
        x = torch.addcmul(x, self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin), gamma1)
        x = torch.addcmul(x, self.mlp(modulate(self.norm2(x), shift2, scale2)), gamma2)
        return x


class BlockV2(nn.Module):
    """FlowAR-L/H head block: t-modulated self-attention, cross-attention to cond, (c + t)-modulated MLP."""

    def __init__(self, width: int, cond_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, num_heads)
        self.norm2_1 = RMSNorm(width, weight=True)
        self.norm2_2 = RMSNorm(cond_dim, weight=True)
        self.crossattn = CrossAttention(width, cond_dim, num_heads)
        self.norm3 = RMSNorm(width)
        self.mlp = GatedMLP(width, gated_mlp_hidden(width), drop=0.0)
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def condition(self, cond, cos, sin):
        """The cross-attention's keys and values: they come from the raw AR features (B, N, D), not from c (the
        released design), and do not change along the ODE."""
        return self.crossattn.keys_values(self.norm2_2(cond), cos, sin)

    def forward(self, x, t, c, cond_features, cos, sin):
        """x (B, N, W), t (B, 1, W), c (B, N, W) embedded condition, cond_features from :meth:`condition`."""
        gamma1, scale1, shift1 = self.ada_lin_attn(F.silu(t)).chunk(3, dim=-1)  # each (B, 1, W)
        gamma2, scale2, shift2 = self.ada_lin_mlp(F.silu(c + t)).chunk(3, dim=-1)  # each (B, N, W)
        x = torch.addcmul(x, self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin), gamma1)
        x = x + self.crossattn(self.norm2_1(x), cond_features, cos, sin)
        x = torch.addcmul(x, self.mlp(modulate(self.norm3(x), shift2, scale2)), gamma2)
        return x


class FlowTransformerHead(FlowMapMode, FlowHead, nn.Module):
    """FlowAR's flow-matching head: a small transformer over the tokens of one scale.

    quantize_time: embed int(1000 t) as the released head does (True), or 1000 t itself; a head trained with the
    MeanFlow objective needs False, since that objective differentiates u in t and the integer has no derivative.
    flow_map: also predict average velocities (see the module docstring)."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int, *, variant: str = "v1",
                 flow_map: bool = False, quantize_time: bool = True):
        super().__init__()
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be one of ('v1', 'v2'), got {variant!r}")
        if width % HEAD_DIM:
            raise ValueError(f"width must be a multiple of {HEAD_DIM} (the head dim), got {width}")
        self.token_dim, self.width, self.cond_dim, self.depth = token_dim, width, cond_dim, depth
        self.variant = variant
        num_heads = width // HEAD_DIM

        self.time_embed = TimestepEmbedder(width, quantize=quantize_time)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        if variant == "v1":
            blocks = [BlockV1(width, num_heads) for _ in range(depth)]
        else:
            blocks = [BlockV2(width, cond_dim, num_heads) for _ in range(depth)]
        self.res_blocks = nn.ModuleList(blocks)
        self.final_layer = AdaFinalLayer(width, token_dim, RMSNorm(width))
        self._add_interval_embed(flow_map)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        xavier_init_linears(self)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Only the output is zeroed (the adaLN layers are not, unlike DiT): a fresh head predicts v = 0.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self._init_interval_embed()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, C) with N = s*s, t (B,), cond (B, N, D) -> v (B, N, C) in x's dtype; with r (B,), r <= t (a
        flow-map head only), the average velocity u over [r, t]."""
        _check_inputs(x, t, cond, self.token_dim, self.cond_dim, r, self.flow_map)
        return self._fix_condition(cond)(x, t, r)

    def conditioned(self, cond: torch.Tensor, grid: tuple[int, int] | None = None):
        """The head with its per-token conditions fixed: ``velocity(x (B, N, C), t (B,), r=None) -> v``, as
        ``self(x, t, cond, r)``. The work that depends on cond alone (its embedding c and, in v2, every block's
        cross-attention keys and values) is done here once, not at each of a scale's ODE steps: 2% of the
        S head's FLOPs per step, about 10% of the L and H heads'. ``grid`` (height, width) places the N tokens
        of a grid that is not square (default: the square of side sqrt(N))."""
        return self._fix_condition(cond, grid)

    def _fix_condition(self, cond: torch.Tensor, grid: tuple[int, int] | None = None):
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must be (B, N, {self.cond_dim}), got {tuple(cond.shape)}")
        if grid is None:
            grid = _square_side(cond.shape[1])
        elif len(grid) != 2 or grid[0] * grid[1] != cond.shape[1]:
            raise ValueError(f"grid must be (height, width) with height * width = N = {cond.shape[1]}, got {grid}")
        else:
            grid = (grid[0], grid[1])
        # Every block's RoPE holds the same frequencies; its tables are built once per grid and cached.
        cos, sin = self.res_blocks[0].attn.rope.tables((grid,), cond.device) if self.depth else (None, None)
        c = self.cond_embed(cond)  # (B, N, W)
        features = [block.condition(cond, cos, sin) for block in self.res_blocks]

        return self._step_function(lambda x, t, interval: self._velocity(x, t, c, features, cos, sin, interval))

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` the arithmetic of each ODE step (``nn.Module.compile``'s arguments). The checks and
        the RoPE table cache stay eager: a dict filled while tracing would be a guard that fails at every new
        grid, so every scale would recompile, past dynamo's limit, and fall back to eager."""
        self._velocity = torch.compile(self._velocity, *args, **kwargs)

    def _velocity(self, x, t, c, features, cos, sin, interval) -> torch.Tensor:
        """One step's arithmetic; ``interval`` is t - r (B,) for a flow-map head, None for an ordinary one. A tensor,
        not a float, so a compiled step does not specialise (and recompile) on r."""
        h = self.input_proj(x)  # (B, N, W)
        t_emb = self._time_embedding(t, interval).unsqueeze(1)  # (B, 1, W)
        for block, block_features in zip(self.res_blocks, features):
            h = block(h, t_emb, c, block_features, cos, sin)
        return self.final_layer(h, c + t_emb).to(x.dtype)


#################################################################################
#                           MAR's per-token MLP head                            #
#################################################################################


class ResBlock(nn.Module):
    """MAR's residual MLP block with adaLN shift, scale and gate."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class MLPHead(FlowMapMode, FlowHead, nn.Module):
    """MAR-style per-token MLP head, conditioned on t_emb + cond_emb; tokens never see each other.

    flow_map: also predict average velocities (see the module docstring)."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int, *, flow_map: bool = False):
        super().__init__()
        self.token_dim, self.width, self.cond_dim, self.depth = token_dim, width, cond_dim, depth
        # Continuous time: no released weights to match here, and a field that is smooth in t is
        # what the higher-order and adaptive solvers assume.
        self.time_embed = TimestepEmbedder(width, quantize=False)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = AdaFinalLayer(width, token_dim, nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
        self._add_interval_embed(flow_map)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        xavier_init_linears(self)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # As in MAR: every block starts as the identity and the head predicts v = 0.
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self._init_interval_embed()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, C), t (B,), cond (B, N, D) -> v (B, N, C) in x's dtype. N need not be square. With r (B,),
        r <= t (a flow-map head only), the average velocity u over [r, t]."""
        _check_inputs(x, t, cond, self.token_dim, self.cond_dim, r, self.flow_map)
        return self._fix_condition(cond)(x, t, r)

    def conditioned(self, cond: torch.Tensor, grid: tuple[int, int] | None = None):
        """The head with its per-token conditions fixed, ``velocity(x, t, r=None) -> v``; cond's embedding is
        computed once instead of at every ODE step. Its tokens do not see each other, so ``grid`` changes
        nothing (it is taken for the heads' common signature)."""
        return self._fix_condition(cond)

    def _fix_condition(self, cond: torch.Tensor):
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must be (B, N, {self.cond_dim}), got {tuple(cond.shape)}")
        c = self.cond_embed(cond)  # (B, N, W)

        return self._step_function(lambda x, t, interval: self._velocity(x, t, c, interval))

    def _velocity(self, x, t, c, interval) -> torch.Tensor:
        h = self.input_proj(x)  # (B, N, W)
        y = self._time_embedding(t, interval).unsqueeze(1) + c  # (B, N, W)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y).to(x.dtype)


def build_head(kind: str, *, token_dim: int, width: int, cond_dim: int, depth: int, flow_map: bool = False,
               quantize_time: Optional[bool] = None) -> nn.Module:
    """Build a head by name: "transformer-v1" (FlowAR-S), "transformer-v2" (FlowAR-L/H) or "mlp" (MAR).

    flow_map: a flow-map head (average velocities, ``heads.meanflow``). quantize_time: None keeps each kind's own
    time embedding (the transformers' int(1000 t), as released; the MLP's continuous one); False makes a
    transformer's continuous, as the MeanFlow objective needs; the MLP head has no quantised time."""
    if quantize_time is not None and not isinstance(quantize_time, bool):
        raise ValueError(f"quantize_time must be None, True or False, got {quantize_time!r}")
    if kind in ("transformer-v1", "transformer-v2"):
        return FlowTransformerHead(token_dim, width, cond_dim, depth, variant=kind[-2:], flow_map=flow_map,
                                   quantize_time=True if quantize_time is None else quantize_time)
    if kind == "mlp":
        if quantize_time:
            raise ValueError("quantize_time=True is for the transformer heads (the released time embedding); the "
                             "mlp head's time is continuous: pass None or False")
        return MLPHead(token_dim, width, cond_dim, depth, flow_map=flow_map)
    raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
