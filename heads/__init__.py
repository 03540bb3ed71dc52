"""Flow-matching heads: the velocity networks, the path and loss, and the ODE samplers.

Time convention (stated once, in ``heads.path``): x_t = (1 - t) x + t eps, t = 1 noise, t = 0 data,
v = eps - x. This package imports nothing else of ours.
"""

from .networks import HEAD_KINDS, FlowTransformerHead, MLPHead, build_head
from .path import flow_matching_loss, interpolate, velocity_target
from .solvers import SCHEDULES, SOLVERS, FlowSample, integrate, sample_flow, step_schedule

__all__ = [
    "HEAD_KINDS",
    "FlowTransformerHead",
    "MLPHead",
    "build_head",
    "flow_matching_loss",
    "interpolate",
    "velocity_target",
    "SCHEDULES",
    "SOLVERS",
    "FlowSample",
    "integrate",
    "sample_flow",
    "step_schedule",
]
