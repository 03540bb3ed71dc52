"""The head-level solve and guidance options of tests, built from the one home of FlowAR's sampling defaults
(``flowar.config.FlowARSampling``) so that a test names only what it changes."""

from flowar import FlowARSampling
from heads.flow import Guidance
from heads.solvers import SolveOptions


def solve(**options) -> SolveOptions:
    """One scale's ODE solve: FlowARSampling's defaults with ``options`` (solver, steps, schedule, atol, rtol)."""
    return FlowARSampling(**options).solve_at(0)


def guide(cond_null, scale: float, interval=None) -> Guidance:
    """Guidance with ``cond_null`` and weight ``scale`` over ``interval`` (default: FlowARSampling's)."""
    return Guidance(cond_null, scale, FlowARSampling().guidance_interval if interval is None else interval)
