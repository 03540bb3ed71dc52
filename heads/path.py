"""The probability paths and the flow-matching loss: the one place the time convention is stated.

Every flow in this library moves along straight segments in time. A segment runs from the state ``x_s`` at
time ``s`` to the state ``x_e`` at an earlier time ``e`` (1 >= s > e >= 0; t = 1 is pure noise, t = 0 data):

    x_t = (t - e) / (s - e) * x_s + (s - t) / (s - e) * x_e,
    v   = d x_t / dt = (x_s - x_e) / (s - e).

FlowAR's path is the full segment: s = 1 with ``x_s = eps`` and e = 0 with ``x_e = x``, so

    x_t = (1 - t) * x + t * eps,    v = eps - x.

This is the released models' own convention, so their head checkpoints predict exactly this ``v`` and the
solvers in ``heads.solvers`` integrate it downwards in t. (The segment formula gives the full path bit for bit:
with s = 1, e = 0 each coefficient is computed exactly.) The multistage flow of ``heads.multistage`` chains one
shorter segment per scale.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# net(x_t (B, N, C), t (B,), cond (B, N, D)) -> v (B, N, C)
VelocityNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FULL_SPAN = (1.0, 0.0)  # FlowAR's: from pure noise to data


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time (B,) to broadcast against x (B, ...)."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def check_span(span) -> tuple[float, float]:
    """(s, e) as floats, or a ValueError unless 1 >= s > e >= 0."""
    try:
        s, e = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"span must be two times (start, end), got {span!r}") from None
    if not 1.0 >= s > e >= 0.0:
        raise ValueError(f"span must satisfy 1 >= start > end >= 0 (t = 1 is noise), got {span!r}")
    return s, e


def segment_point(x_start: torch.Tensor, x_end: torch.Tensor, t: torch.Tensor, span=FULL_SPAN) -> torch.Tensor:
    """x_t on the segment from ``x_start`` at t = span[0] to ``x_end`` at t = span[1]; t (B,)."""
    s, e = span
    t = _expand_time(t, x_start)
    return (t - e) / (s - e) * x_start + (s - t) / (s - e) * x_end


def segment_velocity(x_start: torch.Tensor, x_end: torch.Tensor, span=FULL_SPAN) -> torch.Tensor:
    """The segment's constant velocity d x_t / dt."""
    s, e = span
    return (x_start - x_end) / (s - e)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The full path: x_t = (1 - t) x + t noise, with t (B,) broadcast over the non-batch dims of x."""
    t = _expand_time(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the full path, noise - x; it does not depend on t."""
    return noise - x


def segment_loss(net: VelocityNet, x_start: torch.Tensor, x_end: torch.Tensor, cond: torch.Tensor, *,
                 t: torch.Tensor, span=FULL_SPAN) -> torch.Tensor:
    """Per-sample flow-matching loss (B,) on one segment, at times t (B,) inside ``span``.

    The squared error is averaged over every non-batch dim (FlowAR's ``mean_flat``); the caller does any
    weighting across samples or scales.
    """
    if x_end.shape != x_start.shape:
        raise ValueError(f"x_end must have the shape of x_start {tuple(x_start.shape)}, got {tuple(x_end.shape)}")
    t = t.to(device=x_start.device, dtype=x_start.dtype)
    pred = net(segment_point(x_start, x_end, t, span), t, cond)
    # At least float32 for the error: a bf16 subtraction of two nearly equal velocities loses the loss.
    acc = torch.promote_types(x_start.dtype, torch.float32)
    err = (pred.to(acc) - segment_velocity(x_start, x_end, span).to(acc)).pow(2)
    return err.mean(dim=tuple(range(1, x_start.ndim)))


# How training draws the head's time on a span: "uniform" (the released loss's), or "logit-normal", SD3's
# t = sigmoid(m + s n) with n ~ N(0, 1), which puts more of the training at the middle times, where the
# velocity is hardest to predict, and less at the ends (m > 0 shifts it toward noise, m < 0 toward data).
TIME_DISTRIBUTIONS = ("uniform", "logit-normal")


def check_time_distribution(distribution: str, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"time_distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}")
    if not logit_std > 0:
        raise ValueError(f"time_logit_std must be > 0, got {logit_std}")
    if distribution == "uniform" and (logit_mean, logit_std) != (0.0, 1.0):
        raise ValueError("time_logit_mean / time_logit_std only apply to time_distribution='logit-normal'; "
                         f"got {logit_mean} / {logit_std} with 'uniform'")


def draw_times(batch: int, span=FULL_SPAN, *, generator: Optional[torch.Generator] = None, device=None,
               dtype=torch.float32, distribution: str = "uniform", logit_mean: float = 0.0,
               logit_std: float = 1.0) -> torch.Tensor:
    """One training time per sample on the span: e + (s - e) u, with u ~ U(0, 1) (for the full span, u itself:
    the released loss's draw) or, for ``distribution="logit-normal"``, u = sigmoid(logit_mean + logit_std n)."""
    check_time_distribution(distribution, logit_mean, logit_std)
    s, e = span
    if distribution == "uniform":
        u = torch.rand(batch, generator=generator, device=device)
    else:
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device))
    return e + (s - e) * u.to(dtype)


def flow_matching_loss(net: VelocityNet, x: torch.Tensor, cond: torch.Tensor, *, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss on the full path, shape (B,).

    x: (B, ...) clean data, cond: whatever ``net`` takes as its condition, t (B,) the times and ``noise`` (the
    shape of x) the path's eps. The caller draws both (a model's ``draw_randomness``), so the loss itself is
    deterministic.
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    return segment_loss(net, noise, x, cond, t=t)
