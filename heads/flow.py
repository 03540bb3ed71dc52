"""The flow-matching head as one owner of its loss and its sampler (as MAR's diffusion loss owns both).

A head network is ``net(x_t (B, N, C), t (B,), cond (B, N, D)) -> v (B, N, C)``; the path and the loss are
in ``heads.path``, the ODE solvers in ``heads.solvers``. This module turns a network into the velocity
field a solver integrates: :class:`HeadVelocity` fixes the per-token conditions and applies classifier-free
guidance inside a time interval, and :class:`KnownRegionNet` holds part of every token map on its known
path (zero-shot editing). :func:`sample_flow` is the one sampling path; :class:`FlowHead` gives every head
network ``.loss(...)`` and ``.sample(...)`` without adding parameters, so released key names are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .path import FULL_SPAN, VelocityNet, check_span, flow_matching_loss, interpolate, velocity_target
from .solvers import SolveOptions, integrate


def check_guidance_interval(interval) -> tuple[float, float]:
    """(low, high) as floats, or a ValueError unless 0 <= low <= high <= 1 (t = 1 noise, t = 0 data)."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (low, high), got {interval!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {interval}")
    return low, high


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of one solve: the null class's per-token conditions ``cond_null`` (B, N, D),
    the weight ``scale`` (1 leaves the solve unguided) and the ``interval`` (low, high) of times it applies in.
    Nothing here has a default: a model's sampling options hold those (``flowar.sampling.GuidanceOptions``)."""

    cond_null: torch.Tensor
    scale: float
    interval: tuple[float, float]

    def __post_init__(self):
        if not isinstance(self.cond_null, torch.Tensor) or self.cond_null.ndim != 3:
            raise ValueError(f"cond_null must be the null class's conditions, a (B, N, D) tensor, got "
                             f"{type(self.cond_null).__name__} {tuple(getattr(self.cond_null, 'shape', ()))}")
        object.__setattr__(self, "interval", check_guidance_interval(self.interval))


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a head gets its times in: at least float32, since half-precision times would quantise 1000 t
    coarsely in the FlowAR head's timestep embedding."""
    return torch.promote_types(dtype, torch.float32)


def condition_net(net: VelocityNet, cond: torch.Tensor, grid: tuple[int, int] | None = None):
    """``net`` with its per-token conditions fixed: ``velocity(x_t, t, r=None) -> v`` (with r, a flow-map head's
    average velocity over [r, t]). A head network's own ``conditioned(cond, grid)`` where it has one (it computes
    what depends on cond alone once, not at every ODE step), otherwise a plain closure over ``net(x_t, t, cond)``.
    ``grid``: the (height, width) of a token grid that is not square (None: square)."""
    bind = getattr(net, "conditioned", None)
    if bind is not None:
        return bind(cond) if grid is None else bind(cond, grid)
    return lambda x_t, t, r=None: net(x_t, t, cond) if r is None else net(x_t, t, cond, r=r)


class HeadVelocity:
    """v(x_t, t) of a head network for fixed per-token conditions, with classifier-free guidance.

    cond (B, N, D). With a :class:`Guidance` of weight w != 1, the velocity at times ``low <= t <= high`` of its
    interval is ``v_null + w * (v_cond - v_null)``, both halves from one head call on the doubled batch; any w
    other than 1 guides (the released sampler guides only for w > 1, the only case it uses; w < 1 is the same linear
    formula, w = 0 the unconditional model). Guidance is decided on the solver's float64 time, as the
    released sampler does, and the network gets t in :func:`time_dtype` of x_t's dtype.

    Outside the interval only the conditional half runs. The released sampler also integrates the null half
    there, but overwrites it with the conditional state as soon as guidance starts and discards it at the
    end, so the conditional result is the same and the head does up to half the work. ``rows`` counts the
    token rows pushed through the network (doubled where guided): a cost measure.
    """

    def __init__(self, net: VelocityNet, cond: torch.Tensor, *, guidance: Optional[Guidance] = None,
                 dtype: torch.dtype = torch.float32, grid: Optional[tuple[int, int]] = None):
        if cond.ndim != 3:
            raise ValueError(f"cond must be (B, N, D), got {tuple(cond.shape)}")
        self.guided = guidance is not None and guidance.scale != 1.0
        if self.guided and guidance.cond_null.shape != cond.shape:
            raise ValueError(f"cond_null must have the shape of cond {tuple(cond.shape)}, got "
                             f"{tuple(guidance.cond_null.shape)}")
        self.weight = guidance.scale if self.guided else 1.0
        self.low, self.high = guidance.interval if self.guided else (0.0, 1.0)
        self.dtype, self.t_dtype = dtype, time_dtype(dtype)
        # The head sees one dtype, as in the released sampler; the doubled condition is built once, and the head
        # does its condition-only work once per scale (condition_net).
        cond = cond.to(dtype)
        self.velocity = condition_net(net, cond, grid)
        self.velocity_pair = (condition_net(net, torch.cat([cond, guidance.cond_null.to(dtype)]), grid) if self.guided
                              else None)
        self.rows = 0

    @property
    def jumps(self) -> tuple[float, ...]:
        """Times where the velocity is discontinuous (the ends of the guidance interval)."""
        return (self.low, self.high) if self.guided else ()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """v(x_t, t), or with r the flow-map head's average velocity over [r, t] (guided alike)."""
        batch, tokens = x_t.shape[:2]
        t_net = t.to(self.t_dtype)
        r_net = None if r is None else r.to(self.t_dtype)
        if self.guided and self.low <= float(t[0]) <= self.high:
            self.rows += 2 * batch * tokens
            x_pair, t_pair = torch.cat([x_t, x_t]), torch.cat([t_net, t_net])
            v = (self.velocity_pair(x_pair, t_pair) if r is None
                 else self.velocity_pair(x_pair, t_pair, torch.cat([r_net, r_net]))).to(torch.float64)
            v_cond, v_null = v.chunk(2)
            return v_null + self.weight * (v_cond - v_null)
        self.rows += batch * tokens
        v = self.velocity(x_t, t_net) if r is None else self.velocity(x_t, t_net, r_net)
        return v.to(torch.float64)


class KnownRegionNet:
    """A head network with part of every token map known: replacement sampling for flow matching.

    On the straight path (``heads.path``) the known tokens are at ``(1 - t) target + t noise`` at every time
    t (``noise`` being the same eps the scale's ODE starts from, so t = 1 agrees with the initial state) and
    move with the constant velocity ``noise - target``. Before each network call the known rows of x_t are
    put on that path, so the network conditions the unknown tokens on them, and their velocity is replaced
    by the path's. Any solver then carries the known rows along the path (exactly up to float rounding:
    their velocity is constant); :func:`sample_flow` sets them to the target exactly at t = 0. Called on the
    doubled (conditional + null) batch under guidance, it tiles the known part, and the guided mix of two
    equal velocities is that velocity.
    """

    def __init__(self, net: VelocityNet, keep: torch.Tensor, target: torch.Tensor, noise: torch.Tensor):
        if keep.dtype != torch.bool or keep.ndim != 3 or keep.shape[-1] != 1 or keep.shape[:2] != noise.shape[:2]:
            raise ValueError(f"keep must be a bool tensor ({noise.shape[0]}, {noise.shape[1]}, 1), got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        if target.shape != noise.shape:
            raise ValueError(f"target must have the shape of noise {tuple(noise.shape)}, got {tuple(target.shape)}")
        self.net, self.keep, self.target, self.noise = net, keep, target, noise

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.conditioned(cond)(x_t, t)

    def conditioned(self, cond: torch.Tensor, grid: Optional[tuple[int, int]] = None):
        """``velocity(x_t, t)`` with the conditions fixed, the inner network's condition-only work done once."""
        velocity = condition_net(self.net, cond, grid)

        def known_velocity(x_t: torch.Tensor, t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
            repeat = x_t.shape[0] // self.keep.shape[0]  # 2 for the doubled guidance batch
            keep, target, noise = (v.repeat(repeat, 1, 1).to(x_t.device) for v in (self.keep, self.target, self.noise))
            target, noise = target.to(x_t.dtype), noise.to(x_t.dtype)
            x_known = torch.where(keep, interpolate(target, noise, t), x_t)
            v = velocity(x_known, t) if r is None else velocity(x_known, t, r)
            # The known path is straight: its average velocity over any [r, t] is its velocity.
            return torch.where(keep, velocity_target(target, noise).to(v.dtype), v)

        return known_velocity


@dataclass
class FlowSample:
    """Result of :func:`sample_flow`."""

    x: torch.Tensor  # (B, N, C) samples at the span's end (t = 0 for the full span), in the start's dtype
    nfe: int  # velocity evaluations (a guided one counts once)
    rows: int  # token rows pushed through the head in total (doubled where guided): a cost measure


@torch.no_grad()
def sample_flow(
    net: VelocityNet,
    noise: torch.Tensor,
    cond: torch.Tensor,
    solve: SolveOptions,
    *,
    guidance: Optional[Guidance] = None,
    known: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    span: tuple[float, float] = FULL_SPAN,
    grid: Optional[tuple[int, int]] = None,
) -> FlowSample:
    """Sample tokens for one scale: integrate the head from ``noise`` (B, N, C) at t = 1 to t = 0, or, for a
    stage of the multistage flow, from the stage's start state ``noise`` at t = span[0] to span[1].

    cond (B, N, D); guidance (None: unguided): see :class:`HeadVelocity`; solve: ``heads.solvers.SolveOptions``.
    known: (keep (B, N, 1) bool, target (B, N, C)): those tokens follow the target's path during the solve
    and equal the target afterwards (see :class:`KnownRegionNet`); full span only. grid: the (height, width) of
    the N tokens where they are not a square grid (a head with attention among them places them by it).
    """
    if noise.ndim != 3:
        raise ValueError(f"noise must be (B, N, C), got {tuple(noise.shape)}")
    if cond.ndim != 3 or cond.shape[:2] != noise.shape[:2]:
        raise ValueError(f"cond must be ({noise.shape[0]}, {noise.shape[1]}, D) to match noise, got {tuple(cond.shape)}")
    token_dim = getattr(net, "token_dim", None)  # the head networks' checks, once per solve instead of per step
    if token_dim is not None and noise.shape[-1] != token_dim:
        raise ValueError(f"noise must be (B, N, {token_dim}) for this head, got {tuple(noise.shape)}")
    span = check_span(span)
    if known is not None:
        if span != FULL_SPAN:
            raise ValueError(f"known regions need the full span (1, 0): the known path is the full one; got span {span}")
        net = KnownRegionNet(net, known[0], known[1], noise)
    velocity = HeadVelocity(net, cond, guidance=guidance, dtype=noise.dtype, grid=grid)
    x0, nfe = integrate(velocity, noise, solve, jumps=velocity.jumps, span=span)
    x = x0.to(noise.dtype)
    if known is not None:
        x = torch.where(known[0].to(x.device), known[1].to(x), x)  # exactly the target at t = 0
    return FlowSample(x=x, nfe=nfe, rows=velocity.rows)


class FlowHead:
    """Mixin for head networks: the flow-matching loss and the sampler, owned by the head."""

    def loss(self, x: torch.Tensor, cond: torch.Tensor, *, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample flow-matching loss (B,) of clean tokens x (B, N, C) under cond (B, N, D) at times t (B,)
        with the path's noise; see ``heads.path.flow_matching_loss``."""
        return flow_matching_loss(self, x, cond, t=t, noise=noise)

    def sample(self, noise: torch.Tensor, cond: torch.Tensor, solve: SolveOptions, **options) -> FlowSample:
        """Tokens at t = 0 from ``noise`` at t = 1 (or along ``span=``); options as :func:`sample_flow`'s."""
        return sample_flow(self, noise, cond, solve, **options)
