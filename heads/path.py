"""The probability path and the flow-matching loss: the one place the time convention is stated.

    x_t = (1 - t) * x + t * eps,    t = 1 is pure noise, t = 0 is data,
    v   = d x_t / dt = eps - x.

This is FlowAR's own convention, so the released head checkpoints predict exactly this ``v`` and the
solvers in ``heads.solvers`` integrate it from t = 1 down to t = 0.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# net(x_t (B, N, C), t (B,), cond (B, N, D)) -> v (B, N, C)
VelocityNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample time (B,) to broadcast against x (B, ...)."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t noise, with t (B,) broadcast over the non-batch dims of x."""
    t = _expand_time(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path, noise - x; it does not depend on t."""
    return noise - x


def flow_matching_loss(
    net: VelocityNet,
    x: torch.Tensor,
    cond: torch.Tensor,
    *,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample flow-matching loss, shape (B,).

    x: (B, ...) clean data, cond: whatever ``net`` takes as its condition. One t ~ U(0, 1) per sample
    and Gaussian noise are drawn with ``generator`` on x's device unless given; passing them makes the
    loss deterministic, e.g. to reproduce a reference. The squared error is averaged over every
    non-batch dim (FlowAR's ``mean_flat``); the caller does any weighting across samples or scales.
    """
    batch = x.shape[0]
    # t first, then noise: the order the released loss draws them in.
    if t is None:
        t = torch.rand(batch, generator=generator, device=x.device).to(x.dtype)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    t = t.to(device=x.device, dtype=x.dtype)

    x_t = interpolate(x, noise, t)
    pred = net(x_t, t, cond)
    # At least float32 for the error: a bf16 subtraction of two nearly equal velocities loses the loss.
    acc = torch.promote_types(x.dtype, torch.float32)
    err = (pred.to(acc) - velocity_target(x, noise).to(acc)).pow(2)
    return err.mean(dim=tuple(range(1, x.ndim)))
