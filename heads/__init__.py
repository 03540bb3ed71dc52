"""Flow-matching heads (the velocity networks, the path and loss, the ODE samplers) and VAR's categorical
sampling (temperature, top-k, top-p, CFG mixing).

Time convention (stated once, in ``heads.path``): x_t = (1 - t) x + t eps, t = 1 noise, t = 0 data,
v = eps - x. This package imports nothing else of ours.
"""

from .categorical import cfg_mix, filter_logits, sample_tokens
from .networks import HEAD_KINDS, FlowTransformerHead, MLPHead, build_head
from .meanflow import (MEANFLOW_LOGIT_MEAN, MEANFLOW_LOGIT_STD, MEANFLOW_SHARE_EQUAL, draw_flow_map_times,
                       flow_map_loss, mean_flow_target)
from .path import flow_matching_loss, interpolate, velocity_target
from .flow import FlowHead, FlowSample, Guidance, HeadVelocity, KnownRegionNet, sample_flow
from .solvers import SCHEDULES, SOLVERS, SolveOptions, integrate, step_schedule

__all__ = [
    "cfg_mix",
    "filter_logits",
    "sample_tokens",
    "HEAD_KINDS",
    "FlowTransformerHead",
    "MLPHead",
    "build_head",
    "MEANFLOW_LOGIT_MEAN",
    "MEANFLOW_LOGIT_STD",
    "MEANFLOW_SHARE_EQUAL",
    "draw_flow_map_times",
    "flow_map_loss",
    "mean_flow_target",
    "flow_matching_loss",
    "interpolate",
    "velocity_target",
    "SCHEDULES",
    "SOLVERS",
    "FlowHead",
    "FlowSample",
    "Guidance",
    "HeadVelocity",
    "KnownRegionNet",
    "SolveOptions",
    "integrate",
    "sample_flow",
    "step_schedule",
]
