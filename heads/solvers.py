"""ODE samplers for the flow head: integrate dx/dt = v(x, t) down a span of time, by default from t = 1
(noise) to t = 0 (data); a stage of the multistage flow integrates a shorter span.

Time convention: ``heads.path`` (x_t = (1 - t) x + t eps, v = eps - x). The integration itself is
torchdiffeq's; this module adds the step schedules FlowAR uses, float64 state (as the released Euler
sampler keeps), the validation of solver options and evaluation counting. What is integrated (a head
with guidance, a known region) is a velocity built in ``heads.flow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torchdiffeq import odeint

from .path import FULL_SPAN, check_span

# "flow-map" is no ODE solver: it jumps between the grid's times with a flow-map head's average velocity,
# x_r = x_t - (t - r) u(x_t, r, t) (heads.meanflow), one evaluation per jump.
SOLVERS = ("euler", "midpoint", "rk4", "dopri5", "flow-map")
SCHEDULES = ("flowar", "uniform")
_FIXED_GRID = ("euler", "midpoint", "rk4", "flow-map")
ADAPTIVE_SOLVERS = tuple(name for name in SOLVERS if name not in _FIXED_GRID)  # they pick their own steps
JUMP_SOLVERS = ("flow-map",)  # they need a head that predicts average velocities

# velocity(x_t (B, ...), t (B,) float64[, r (B,) float64]) -> v (B, ...); with r, the average velocity over [r, t]
Velocity = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SolveOptions:
    """One ODE solve's options, validated once when built (a ``ValueError`` names the option otherwise).

    solver: one of ``SOLVERS``; fixed-grid solvers need ``steps`` (an integer >= 1; >= 2 for the "flowar"
    grid) laid on ``schedule``; dopri5 chooses its own steps from ``atol`` / ``rtol``, so giving it ``steps``
    is refused rather than silently ignored. No field has a default: a model's sampling options dataclass
    (``flowar.config.FlowARSampling``) holds the defaults and builds these once per sampling call.
    """

    solver: str
    steps: int | None
    schedule: str
    atol: float
    rtol: float

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.solver in _FIXED_GRID:
            _check_grid(self.steps, self.schedule, solver=self.solver)
        elif self.steps is not None:
            raise ValueError(f"steps must be None for the adaptive {self.solver} solver (it picks its own steps "
                             f"from atol/rtol), got {self.steps!r}")

    @property
    def adaptive(self) -> bool:
        return self.solver not in _FIXED_GRID

    @property
    def jumps_with_flow_map(self) -> bool:
        """Whether the solve calls ``velocity(x_t, t, r)`` for average velocities instead of integrating."""
        return self.solver in JUMP_SOLVERS


def _check_grid(steps, schedule: str, *, solver: str) -> None:
    """A fixed-step grid's own checks: ``steps`` an integer >= 1, and >= 2 on the "flowar" grid."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 for the {solver} solver, got {steps!r}")
    if schedule == "flowar" and steps < 2:
        # linspace(1, 0.3, 0) is empty: the grid would start at 0.25 and hold a single point.
        raise ValueError(f"steps must be >= 2 for the 'flowar' schedule, got {steps}")


def step_schedule(steps: int, kind: str) -> torch.Tensor:
    """Times from 1 down to 0 (float64) for a fixed-step solver.

    "uniform": ``steps + 1`` evenly spaced points. "flowar": the released sampler's grid, 1 -> 0.3 in
    ``steps // 2`` points, then 0.25 -> 0 in ``steps // 2 + 1`` points, so 25 steps give 24 intervals
    with a finer grid near the data. (The released sampler switches to the uniform grid at 50 steps, the
    step count of its H model; here the grid is always the one asked for, and the H preset asks for
    "uniform".)
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    _check_grid(steps, kind, solver="fixed-step")
    return _grid(steps, kind)


def _grid(steps: int, kind: str) -> torch.Tensor:
    """:func:`step_schedule` without its checks, for options a :class:`SolveOptions` validated already."""
    if kind == "uniform":
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    half = steps // 2
    return torch.cat(
        [torch.linspace(1, 0.3, half, dtype=torch.float64), torch.linspace(0.25, 0, half + 1, dtype=torch.float64)]
    )


def _solve(
    rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    solve: SolveOptions,
    *,
    jumps: Sequence[float],
    span: tuple[float, float],
) -> torch.Tensor:
    """Run torchdiffeq on ``rhs(t, y)`` (0-dim float64 time, float64 state) from t = span[0] down to span[1]."""
    start, end = check_span(span)
    if not solve.adaptive:
        # The schedule's grid on [0, 1], laid onto the span (for the full span, the grid itself).
        grid = end + (start - end) * _grid(solve.steps, solve.schedule)
        # Without step_size torchdiffeq uses the given times as the grid. Going down in t it negates
        # both times and velocity, which is exact, so Euler is x + (t_next - t_cur) v bit for bit.
        return odeint(rhs, y0, grid.to(y0.device), method=solve.solver)[-1]
    times = torch.tensor([start, end], dtype=torch.float64, device=y0.device)
    inner = sorted({float(j) for j in jumps if end < float(j) < start})
    # step_t: step onto the end instead of past it and back; the head is never asked about times outside the
    # span, and guidance, decided on the solver's time, stays on up to the end of an interval that ends there.
    options = {"step_t": torch.tensor([end], dtype=torch.float64, device=y0.device)}
    if inner:
        options["jump_t"] = torch.tensor(inner, dtype=torch.float64, device=y0.device)
    return odeint(rhs, y0, times, method=solve.solver, atol=solve.atol, rtol=solve.rtol, options=options)[-1]


def integrate(
    velocity: Velocity,
    x: torch.Tensor,
    solve: SolveOptions,
    *,
    jumps: Sequence[float] = (),
    span: tuple[float, float] = FULL_SPAN,
) -> tuple[torch.Tensor, int]:
    """Integrate from x at t = span[0] (default 1) down to t = span[1] (default 0); returns (the end state in
    float64, number of velocity calls).

    The state is float64 throughout. ``velocity(x_t, t)`` gets x_t in x's dtype and t as a (B,) float64
    tensor, the solver's own time (a network wrapper such as ``heads.flow.HeadVelocity`` casts it for its
    network and decides guidance on it); its output is promoted to float64 for the update.
    The "flow-map" solver calls ``velocity(x_t, t, r)`` once per interval of the grid and jumps,
    x_r = x_t - (t - r) u, which is exact for a head that predicts the flow's average velocity.
    Fixed-step solvers (euler, midpoint, rk4 = torchdiffeq's 3/8-rule RK4) step exactly on
    ``step_schedule(solve.steps, solve.schedule)`` laid onto the span; dopri5 is adaptive with
    ``solve.atol`` / ``solve.rtol``. ``jumps`` lists times where velocity is discontinuous (e.g. the ends of a
    guidance interval): dopri5 steps onto them instead of rejecting steps across them; fixed-step solvers
    ignore them.
    """
    dtype, batch = x.dtype, x.shape[0]
    if solve.jumps_with_flow_map:
        return _jump(velocity, x, solve, span=span)
    nfe = 0

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(y.to(dtype), t.to(y.device).expand(batch)).to(torch.float64)

    x0 = _solve(rhs, x.to(torch.float64), solve, jumps=jumps, span=span)
    return x0, nfe


def _jump(velocity: Velocity, x: torch.Tensor, solve: SolveOptions, *, span: tuple[float, float]
          ) -> tuple[torch.Tensor, int]:
    """The flow-map solve: one jump per interval of the grid, ``x_r = x_t - (t - r) u(x_t, r, t)``, in float64 as
    the ODE solvers keep their state."""
    start, end = check_span(span)
    grid = (end + (start - end) * _grid(solve.steps, solve.schedule)).to(x.device)
    dtype, batch = x.dtype, x.shape[0]
    state = x.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        u = velocity(state.to(dtype), t_cur.expand(batch), t_next.expand(batch)).to(torch.float64)
        state = state - (t_cur - t_next) * u
    return state, len(grid) - 1
