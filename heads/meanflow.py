"""The MeanFlow objective (Geng et al., 2025, "Mean Flows for One-step Generative Modeling") for flow-map heads.

A flow-map head (``heads.networks``, ``flow_map=True``) predicts the average velocity over [r, t], r <= t,

    u(x_t, r, t) = 1 / (t - r) * integral_r^t v(x_s, s) ds,

so that x_r = x_t - (t - r) u(x_t, r, t) jumps along the flow in one evaluation (sampling runs t downward, from
t = 1 noise to t = 0 data; at r = t, u is the velocity v). The time convention is ``heads.path``'s,
x_t = (1 - t) x + t eps, v = eps - x, which is also the paper's, so its equations hold here sign for sign.

Training needs no integral: u obeys the MeanFlow identity (see :func:`mean_flow_target`), whose right side is
computed from the network itself by one forward-mode derivative and used as a stop-gradient target.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .path import interpolate, velocity_target

# velocity(x_t (B, ...), t (B,), r (B,)) -> u (B, ...): a flow-map head's conditioned closure
FlowMapVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The paper's defaults (its ablation's best, kept for ImageNet): (t, r) from a logit-normal with mean -0.4 and
# std 1.0, sorted, and r = t for 75% of the samples (25% train the average velocity, the rest are plain flow
# matching, which the paper found better than any other share).
MEANFLOW_SHARE_EQUAL = 0.75
MEANFLOW_LOGIT_MEAN = -0.4
MEANFLOW_LOGIT_STD = 1.0
# The paper's adaptive loss weight, w = 1 / (error + c)^p with p = 1 and c = 1e-3 (its ImageNet choice): each
# sample's squared error divided by a stop-gradient copy of itself, so the few samples whose target carries a
# large (t - r) du/dt (the untrained network is steep in t) do not swamp the step.
MEANFLOW_ADAPTIVE_POWER = 1.0
MEANFLOW_ADAPTIVE_EPS = 1e-3


def draw_flow_map_times(batch: int, *, generator: Optional[torch.Generator] = None, device=None,
                        share_equal: float, logit_mean: float, logit_std: float,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times (r, t), each (B,) with r <= t, for the MeanFlow loss.

    Two logit-normal times per sample, sigmoid(logit_mean + logit_std n) with n ~ N(0, 1), the smaller as r and the
    larger as t; then each sample independently gets r = t with probability ``share_equal`` (the paper's values:
    ``MEANFLOW_SHARE_EQUAL``, ``MEANFLOW_LOGIT_MEAN``, ``MEANFLOW_LOGIT_STD``). A per-sample draw rather than a
    fixed count: the head's batches are small, and rounding a share of two samples would train only one kind.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if not 0.0 <= share_equal <= 1.0:
        raise ValueError(f"share_equal must be in [0, 1], got {share_equal}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    pair = torch.sigmoid(logit_mean + logit_std * torch.randn(2, batch, generator=generator, device=device))
    r, t = pair.min(dim=0).values, pair.max(dim=0).values
    equal = torch.rand(batch, generator=generator, device=device) < share_equal
    r = torch.where(equal, t, r)
    return r.to(dtype), t.to(dtype)


def _expand(time: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return time.reshape(-1, *([1] * (x.ndim - 1)))


def mean_flow_target(velocity_fn: FlowMapVelocity, x_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction u(x_t, r, t) and its MeanFlow target, from one ``torch.func.jvp`` call.

    velocity_fn(x, t, r) -> u (a flow-map head's ``conditioned(cond)``); x_t (B, ...); r, t (B,) with r <= t; v the
    velocity dx_t/dt at (x_t, t) (in training, the conditional one, eps - x, as the paper).

    The identity, in our convention (dx_t/dt = v, r <= t): by u's definition, (t - r) u(x_t, r, t) = x_t - x_r =
    integral_r^t v(x_s, s) ds. Differentiating in t along the trajectory, with r fixed, gives
    u + (t - r) du/dt = v(x_t, t), so

        u_tgt = v - (t - r) du/dt,    du/dt = v . d_x u + d_t u,

    the total derivative: the jvp of fn(x, r, t) = velocity_fn(x, t, r) at the tangents (v, 0, 1). The sign is the
    paper's (same path, same direction of t); at r = t the target is v itself, flow matching.

    Returns (u_pred, u_tgt.detach()): the prediction carries the graph for the loss, the target none.
    """
    def fn(x, r_, t_):
        return velocity_fn(x, t_, r_)

    # Forward-mode AD has no rule for the fused attention kernels (CPU flash, CUDA flash and memory-efficient):
    # the transformer head's attention runs through the math backend inside the jvp. The MLP head has none.
    with sdpa_kernel(SDPBackend.MATH):
        u, dudt = torch.func.jvp(fn, (x_t, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    u_tgt = v.to(dudt.dtype) - _expand(t - r, dudt).to(dudt.dtype) * dudt
    return u, u_tgt.detach()


def flow_map_loss(net_velocity: FlowMapVelocity, x: torch.Tensor, noise: torch.Tensor, r: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """Per-sample MeanFlow loss (B,): the squared error of u(x_t, r, t) against the stop-gradient target of
    :func:`mean_flow_target`, averaged over every non-batch dim (as ``heads.path.segment_loss``).

    net_velocity(x_t, t, r) -> u (a flow-map head's ``conditioned(cond)``); x (B, ...) clean data and ``noise`` (the
    shape of x) the path's eps, x_t = (1 - t) x + t noise and v = noise - x; r, t (B,) with r <= t (see
    :func:`draw_flow_map_times`). The caller draws every random input, so the loss is deterministic. Where r = t
    it is the flow-matching loss. The paper's adaptive weighting of the error is the caller's to apply.
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    for name, time in (("r", r), ("t", t)):
        if time.shape != (x.shape[0],):
            raise ValueError(f"{name} must have shape ({x.shape[0]},), got {tuple(time.shape)}")
    # The head's times in at least float32 (half-precision times would be coarse in the time embeddings).
    time_dtype = torch.promote_types(x.dtype, torch.float32)
    r, t = r.to(device=x.device, dtype=time_dtype), t.to(device=x.device, dtype=time_dtype)
    x_t, v = interpolate(x, noise, t), velocity_target(x, noise)
    u, u_tgt = mean_flow_target(net_velocity, x_t, r, t, v)
    # At least float32 for the error, as in segment_loss.
    acc = torch.promote_types(x.dtype, torch.float32)
    err = (u.to(acc) - u_tgt.to(acc)).pow(2)
    return err.mean(dim=tuple(range(1, x.ndim)))


def adaptive_weighted(loss: torch.Tensor, *, power: float, eps: float) -> torch.Tensor:
    """Per-sample losses (B,) times the paper's adaptive weight 1 / (loss + eps)^power, the weight held constant
    (no gradient through it); power 0 leaves the loss as it is."""
    if power == 0:
        return loss
    return loss / (loss.detach() + eps).pow(power)
