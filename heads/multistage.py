"""The multistage flow (E-CAR, Yuan et al. 2024): each scale denoises only part of the way.

In FlowAR every scale's head integrates from pure noise (t = 1) to data (t = 0). Here scale k is a *stage*
that integrates only its span (s_k, e_k): it starts from the previous stage's result, upsampled and
re-noised to level s_k, and ends at level e_k at its own resolution; the first stage starts from pure
noise (s_0 = 1) and the last ends at data (e_{K-1} = 0). Time convention and segments: ``heads.path``.

The path (written after Pyramid Flow's piecewise flow; E-CAR published no code). With x^k the clean target
of scale k (the latent area-pooled to side n_k, so that area-pooling x^k gives x^{k-1}), ``Up`` the
nearest-neighbour 2x upsampling (each token copied onto its 2x2 block) and N_k a standard normal map at
side n_k, stage k is the straight segment (``heads.path.segment_point``)

    x_{s_k} = (1 - s_k) Up(x^{k-1}) + s_k N_k,        x_{e_k} = (1 - e_k) x^k + e_k N_k,

sharing one noise N_k, so x_t = (1 - t) * (data interpolated from Up(x^{k-1}) to x^k) + t N_k within the
stage, and the velocity target is the constant (x_{s_k} - x_{e_k}) / (s_k - e_k). The stage adds the detail
within each 2x2 block (the coarse content of its start is already x^{k-1}) while it removes noise.

The jump between stages (:func:`renoise`). The previous stage ends at x_{e} = (1 - e) x^{k-1} + e N_{k-1}
(e = e_{k-1}). Scaling its upsampled copy by a = (1 - s) / (1 - e) gives the data term (1 - s) Up(x^{k-1}),
but its noise a e Up(N_{k-1}) is the same within each 2x2 block: per token its variance is a^2 e^2, along the
block mean direction 4 a^2 e^2 and zero across the block. The correction adds Gaussian noise m with exactly
the missing covariance, s^2 I - a^2 e^2 Up Up^T, so that the start's noise is white with variance s^2:

    m = s (xi - P xi) + sqrt(s^2 - 4 a^2 e^2) P xi,     xi ~ N(0, I) at side n_k,

where P xi is xi's 2x2 block mean copied back onto the block (a projector). This exists only when
s^2 >= 4 a^2 e^2, i.e. s >= 2 e / (1 + e) (:func:`min_start`): at a jump the noise level must rise at least
that far, since the coarse component of the noise is already there and doubles in amplitude per token under
the upsampling. At the minimum no noise is added along the block means (they carry on as they are); above
it, some is.

Choices of ours where E-CAR's paper is silent, and why:

- One stage per scale of the model's pyramid, its span a config list ``stage_times`` (one (start, end) pair
  per scale), so the transformer, its KV cache and the sampling engine are FlowAR's unchanged.
- The transformer's input at scale k is the previous stage's *end* (partly noisy at level e_{k-1}), upsampled
  as FlowAR upsamples its inputs. Training builds every stage's start with the same jump the sampler uses,
  from that same end, so the head is trained on the joint law of (condition, state) that sampling visits.
- Nearest upsampling and area pooling on the head's path: then Up followed by pooling is the identity and
  the correction above is exact (a bicubic upsampling would correlate the noise across blocks).
- Training times are uniform on each stage's span, and the per-scale loss weights are FlowAR's; the head
  sees the absolute time t, so one head serves all stages.
- Every span [1, 0] (a jump from level 0 to 1 is pure new noise) is exactly FlowAR: the same loss and the
  same samples from the same draws (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .path import check_span

# Rounding slack for the jump condition: a start computed by min_start in float64 must pass.
_SLACK = 1e-9


def min_start(previous_end: float) -> float:
    """The lowest noise level a stage may start at after a stage that ended at ``previous_end``: 2e / (1 + e)
    (see the module docstring)."""
    return 2.0 * previous_end / (1.0 + previous_end)


def stages_from_ends(ends: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """Stage times for len(ends) + 1 scales from the ends of all stages but the last, each later stage starting
    at the lowest level the jump allows (:func:`min_start`): ``stages_from_ends([0.5])`` is
    ((1, 0.5), (2/3, 0))."""
    ends = [float(e) for e in ends]
    starts = [1.0] + [min_start(e) for e in ends]
    return tuple((s, e) for s, e in zip(starts, ends + [0.0]))


def check_stage_times(stage_times, num_scales: int) -> tuple[tuple[float, float], ...]:
    """``stage_times`` as a tuple of (start, end) float pairs, one per scale, or a ValueError naming what is
    wrong: each span 1 >= start > end >= 0, the first starting at 1 (pure noise), the last ending at 0 (data),
    and each later start at least :func:`min_start` of the stage before's end."""
    if isinstance(stage_times, (str, bytes)) or not isinstance(stage_times, Sequence):
        raise ValueError(f"stage_times must be a list of (start, end) pairs, one per scale, got {stage_times!r}")
    if len(stage_times) != num_scales:
        raise ValueError(f"stage_times must hold one (start, end) pair per scale ({num_scales}), got "
                         f"{len(stage_times)}: {list(stage_times)}")
    spans = []
    for k, span in enumerate(stage_times):
        try:
            spans.append(check_span(span))
        except ValueError as err:
            raise ValueError(f"stage_times[{k}]: {err}") from None
    if spans[0][0] != 1.0:
        raise ValueError(f"stage_times[0] must start at 1 (the first stage starts from pure noise), got {spans[0]}")
    if spans[-1][1] != 0.0:
        raise ValueError(f"stage_times[{num_scales - 1}] must end at 0 (the last stage ends at data), got {spans[-1]}")
    for k in range(1, num_scales):
        lowest = min_start(spans[k - 1][1])
        if spans[k][0] < lowest - _SLACK:
            raise ValueError(f"stage_times[{k}] starts at {spans[k][0]:g}, below {lowest:.6g}, the lowest level "
                             f"after a stage ending at {spans[k - 1][1]:g} (2e / (1 + e)): the jump cannot remove "
                             "noise")
    return tuple(spans)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Up: (B, C, n, n) -> (B, C, 2n, 2n), each value copied onto its 2x2 block."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def block_mean(x: torch.Tensor) -> torch.Tensor:
    """P: the mean of each 2x2 block, copied back onto the block (an orthogonal projector)."""
    return upsample(F.avg_pool2d(x, 2))


def renoise(previous: torch.Tensor, xi: torch.Tensor, *, previous_end: float, start: float) -> torch.Tensor:
    """The start of a stage from the previous stage's end (the jump of the module docstring).

    previous (B, C, n, n): the previous stage's result at noise level ``previous_end``; xi (B, C, 2n, 2n):
    standard normal. Returns a (1 - s) / (1 - e) * Up(previous) + m at level s = ``start``. Linear in
    ``previous``: applied to a noise map alone it gives that map's part of the start.
    """
    e, s = float(previous_end), float(start)
    if xi.shape[:2] != previous.shape[:2] or xi.shape[-2:] != tuple(2 * n for n in previous.shape[-2:]):
        raise ValueError(f"xi must be {tuple(previous.shape[:2])} at twice the side of previous "
                         f"{tuple(previous.shape)}, got {tuple(xi.shape)}")
    if not 0.0 <= e < 1.0 or s < min_start(e) - _SLACK or s > 1.0:
        raise ValueError(f"start must lie in [{min_start(e):.6g}, 1] after a stage ending at {e:g}, got {s:g}")
    scale = (1.0 - s) / (1.0 - e)
    coarse = math.sqrt(max(s * s - 4.0 * scale * scale * e * e, 0.0))
    added = s * xi + (coarse - s) * block_mean(xi)  # at s = 1 after e = 0: xi itself, bit for bit
    return scale * upsample(previous) + added


def training_stages(pyramid: Sequence[torch.Tensor], xis: Sequence[torch.Tensor],
                    stage_times: Sequence[tuple[float, float]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each stage's (start, end) states for training, (B, C, n_k, n_k) each.

    pyramid[k]: the clean target of scale k; xis[k]: standard normal of its shape. Stage 0 starts at xi_0 (its
    noise N_0); each later start is :func:`renoise` of the previous end, as in sampling, and its unit noise N_k
    is the same jump applied to the previous end's noise alone, over s_k. Ends: (1 - e_k) x^k + e_k N_k.
    """
    stages = []
    previous = None
    for k, (x, xi, (s, e)) in enumerate(zip(pyramid, xis, stage_times)):
        if k == 0:
            start, noise = xi, xi  # s_0 = 1: pure noise
        else:
            (previous_end, previous_noise), previous_e = previous, stage_times[k - 1][1]
            start = renoise(previous_end, xi, previous_end=previous_e, start=s)
            noise = renoise(previous_e * previous_noise, xi, previous_end=previous_e, start=s) / s
        end = (1.0 - e) * x + e * noise
        stages.append((start, end))
        previous = (end, noise)
    return stages
