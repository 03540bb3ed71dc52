"""ODE samplers for the flow head: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data).

Time convention: ``heads.path`` (x_t = (1 - t) x + t eps, v = eps - x). The integration itself is
torchdiffeq's; this module adds the step schedules FlowAR uses, float64 state (as the released Euler
sampler keeps), evaluation counting, and classifier-free guidance restricted to a time interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torchdiffeq import odeint

from .path import VelocityNet

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
SCHEDULES = ("flowar", "uniform")
_FIXED_GRID = ("euler", "midpoint", "rk4")

# velocity(x_t (B, ...), t (B,)) -> v (B, ...)
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def step_schedule(steps: int, kind: str = "flowar") -> torch.Tensor:
    """Times from 1 down to 0 (float64) for a fixed-step solver.

    "uniform": ``steps + 1`` evenly spaced points. "flowar": the released sampler's grid, 1 -> 0.3 in
    ``steps // 2`` points, then 0.25 -> 0 in ``steps // 2 + 1`` points, so 25 steps give 24 intervals
    with a finer grid near the data; as released, ``steps == 50`` falls back to the uniform grid.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind == "uniform" or steps == 50:
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if steps < 2:
        # linspace(1, 0.3, 0) is empty: the grid would start at 0.25 and hold a single point.
        raise ValueError(f"steps must be >= 2 for the 'flowar' schedule, got {steps}")
    half = steps // 2
    return torch.cat(
        [torch.linspace(1, 0.3, half, dtype=torch.float64), torch.linspace(0.25, 0, half + 1, dtype=torch.float64)]
    )


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision times would quantise 1000 t coarsely in the FlowAR head; float32 keeps every step.
    return torch.promote_types(dtype, torch.float32)


def _solve(
    rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    *,
    solver: str,
    steps: int,
    schedule: str,
    atol: float,
    rtol: float,
    jumps: Sequence[float] = (),
) -> torch.Tensor:
    """Run torchdiffeq on ``rhs(t, y)`` (0-dim float64 time, float64 state) from t = 1 to t = 0."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    grid = step_schedule(steps, schedule)  # validates steps and schedule for every solver
    if solver in _FIXED_GRID:
        # Without step_size torchdiffeq uses the given times as the grid. Going down in t it negates
        # both times and velocity, which is exact, so Euler is x + (t_next - t_cur) v bit for bit.
        return odeint(rhs, y0, grid.to(y0.device), method=solver)[-1]
    span = torch.tensor([1.0, 0.0], dtype=torch.float64, device=y0.device)
    inner = sorted({float(j) for j in jumps if 0.0 < float(j) < 1.0})
    options = {"jump_t": torch.tensor(inner, dtype=torch.float64, device=y0.device)} if inner else None
    return odeint(rhs, y0, span, method=solver, atol=atol, rtol=rtol, options=options)[-1]


def integrate(
    velocity: Velocity,
    x: torch.Tensor,
    *,
    solver: str = "euler",
    steps: int = 25,
    schedule: str = "flowar",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    jumps: Sequence[float] = (),
) -> tuple[torch.Tensor, int]:
    """Integrate from x at t = 1 down to t = 0; returns (x0 in float64, number of velocity calls).

    The state is float64 throughout. ``velocity(x_t, t)`` gets x_t in x's dtype and t as a (B,) tensor
    in float32 (float64 when x is float64), and its output is promoted back to float64 for the update.
    Fixed-step solvers (euler, midpoint, rk4 = torchdiffeq's 3/8-rule RK4) step exactly on
    ``step_schedule(steps, schedule)``; dopri5 is adaptive with ``atol``/``rtol`` and ignores the grid.
    ``jumps`` lists times where velocity is discontinuous (e.g. the ends of a guidance interval): dopri5
    steps onto them instead of rejecting steps across them; fixed-step solvers ignore them.
    """
    dtype, t_dtype, batch = x.dtype, _time_dtype(x.dtype), x.shape[0]
    nfe = 0

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(y.to(dtype), t.to(device=y.device, dtype=t_dtype).expand(batch)).to(torch.float64)

    x0 = _solve(rhs, x.to(torch.float64), solver=solver, steps=steps, schedule=schedule, atol=atol, rtol=rtol,
                jumps=jumps)
    return x0, nfe


@dataclass
class FlowSample:
    """Result of ``sample_flow``."""

    x: torch.Tensor  # (B, N, C) samples at t = 0, in the noise's dtype
    nfe: int  # velocity evaluations (a guided one counts once)
    rows: int  # token rows pushed through the head in total (doubled where guided): a cost measure


@torch.no_grad()
def sample_flow(
    net: VelocityNet,
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    cond_null: Optional[torch.Tensor] = None,
    cfg: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    solver: str = "euler",
    steps: int = 25,
    schedule: str = "flowar",
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> FlowSample:
    """Sample tokens for one scale: integrate ``net(x_t, t, cond)`` from ``noise`` to t = 0.

    noise (B, N, C), cond and cond_null (B, N, D). With ``cfg != 1`` the velocity at times t with
    ``low <= t <= high`` is ``v_null + cfg * (v_cond - v_null)``, both halves from one head call on the
    doubled batch. Any cfg other than 1 guides (the released sampler guides only for cfg > 1, the only
    case it uses; cfg < 1 is the same linear formula, cfg = 0 being the unconditional model).

    Outside the interval only the conditional half runs. The released sampler also integrates the null
    half there, but overwrites it with the conditional state as soon as guidance starts and discards
    it at the end, so the conditional result is the same and the head does up to half the work.
    """
    if noise.ndim != 3:
        raise ValueError(f"noise must be (B, N, C), got {tuple(noise.shape)}")
    if cond.ndim != 3 or cond.shape[:2] != noise.shape[:2]:
        raise ValueError(f"cond must be ({noise.shape[0]}, {noise.shape[1]}, D) to match noise, got {tuple(cond.shape)}")
    low, high = (float(v) for v in guidance_interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
    guided = cfg != 1.0
    if guided:
        if cond_null is None:
            raise ValueError(f"cond_null is required when cfg != 1 (cfg={cfg})")
        if cond_null.shape != cond.shape:
            raise ValueError(f"cond_null must have the shape of cond {tuple(cond.shape)}, got {tuple(cond_null.shape)}")

    batch, tokens = noise.shape[:2]
    dtype, t_dtype = noise.dtype, _time_dtype(noise.dtype)
    # The head sees one dtype, as in the released sampler; the doubled condition is built once.
    cond = cond.to(dtype)
    cond_pair = torch.cat([cond, cond_null.to(dtype)]) if guided else None
    nfe = rows = 0

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe, rows
        nfe += 1
        x_t, t_batch = y.to(dtype), t.to(device=y.device, dtype=t_dtype).expand(batch)
        # Decide on the float64 solver time, as the released sampler does, not on its float32 copy.
        if guided and low <= float(t) <= high:
            rows += 2 * batch * tokens
            v = net(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]), cond_pair).to(torch.float64)
            v_cond, v_null = v.chunk(2)
            return v_null + cfg * (v_cond - v_null)
        rows += batch * tokens
        return net(x_t, t_batch, cond).to(torch.float64)

    x0 = _solve(rhs, noise.to(torch.float64), solver=solver, steps=steps, schedule=schedule, atol=atol, rtol=rtol,
                jumps=(low, high) if guided else ())
    return FlowSample(x=x0.to(dtype), nfe=nfe, rows=rows)
