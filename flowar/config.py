"""FlowAR configuration: one dataclass that is exactly what gets saved, and the presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from heads.flow import Guidance, check_guidance_interval
from heads.meanflow import (MEANFLOW_ADAPTIVE_POWER, MEANFLOW_LOGIT_MEAN, MEANFLOW_LOGIT_STD,
                            MEANFLOW_SHARE_EQUAL)
from heads.multistage import check_stage_times, stages_from_ends
from heads.networks import HEAD_KINDS
from heads.path import FULL_SPAN, check_time_distribution
from heads.solvers import ADAPTIVE_SOLVERS, JUMP_SOLVERS, SOLVERS, SolveOptions
from vae.files import ConfigMixin
from vae.pyramid import check_scale_list, check_scales

from .sampling import GuidanceOptions, PerScaleSteps, guidance_excess

# How the head's flow is laid over the scales: "full", FlowAR's (every scale from noise to data), or
# "multistage", E-CAR's (scale k integrates only its span of stage_times; heads.multistage).
FLOWS = ("full", "multistage")
# How the per-scale flow losses add up: "area", the released weighting (each scale by its share s^2 / S^2 of
# the last scale's tokens, so the 1x1 scale gets 1/64 of the 8x8 one's weight), or "equal" (1 per scale, so
# the coarse scales, where the class and layout are decided, train as hard as the last one).
SCALE_WEIGHTS = ("area", "equal")
# What the head learns: "flow-matching" (the velocity, FlowAR's loss) or "mean-flow" (a flow-map head's average
# velocity from scratch, heads.meanflow).
OBJECTIVES = ("flow-matching", "mean-flow")
# Where a token's position embedding comes from: "sequence", the released one (a learned vector per token of the
# fixed scale sequence), or "grid" (a learned 2-D table per embedding, area-resized to each scale's side, as
# FlexVAR's), which any list of scales can use.
POSITIONS = ("sequence", "grid")
# The scales a training step uses: "fixed" (the config's) or "random" (a new increasing list from 1 to the
# latent's side every step, heads of every side trained; needs positions="grid"), see FlowAR.draw_scale_list.
SCALE_LISTS = ("fixed", "random")


@dataclass
class FlowARSampling(PerScaleSteps, GuidanceOptions):
    """FlowAR's sampling options, validated once; a release saves its defaults in config.json.

    guidance_scale: 1 is unguided; with ``cfg_schedule="linear"`` the weight ramps from 1 at the first scale
    to ``guidance_scale`` at the last, as the authors do. guidance_interval: (low, high) times in which
    guidance applies (t = 1 noise, t = 0 data). solver / steps / schedule / atol / rtol: the head's ODE
    solve per scale (``heads.solvers``); dopri5 is adaptive and takes ``steps=None``. ``steps`` is one count
    for every scale or a list with one count per scale (e.g. fewer at the late scales); each scale's grid is
    the schedule laid onto that scale's span of time (all of [1, 0] unless the model's flow is multistage).
    """

    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # The sides sampled, any increasing list from 1 (None: the model's scales); other lists than the trained
    # one need a model with positions="grid". A last side above the trained one samples larger images.
    scales: tuple[int, ...] | None = None
    solver: str = "euler"
    steps: int | tuple[int, ...] | None = 25
    schedule: str = "flowar"
    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self.guidance_interval = check_guidance_interval(self.guidance_interval)
        if self.scales is not None:
            self.scales = check_scale_list(self.scales, name="scales", grids=True)
        per_scale = self._step_counts()
        # Each scale's solve (one for all scales when steps is one count), validated here once: sampling reads
        # them per scale through solve_at and checks nothing again.
        self._solves = [SolveOptions(solver=self.solver, steps=count, schedule=self.schedule, atol=self.atol,
                                     rtol=self.rtol) for count in per_scale]

    def solve_at(self, k: int) -> SolveOptions:
        """The head's ODE solve at scale k."""
        return self._solves[k if self.per_scale_steps else 0]

    def guidance_at(self, k: int, num_scales: int, cond_null: torch.Tensor) -> Guidance:
        """Scale k's guidance of the head: the null class's conditions ``cond_null`` (B, N, D), the weight of the
        scale on ``cfg_schedule``'s ramp, and ``guidance_interval``."""
        weight = 1.0 + guidance_excess(self.guidance_scale, k, num_scales, self.cfg_schedule)
        return Guidance(cond_null, weight, self.guidance_interval)

    def check_model(self, config) -> None:
        if self.solver in JUMP_SOLVERS and not config.flow_map:
            raise ValueError(f"solver {self.solver!r} jumps with a head that predicts average velocities, and this "
                             "model's head predicts the instantaneous velocity (flow_map=False); use an ODE solver "
                             f"({', '.join(s for s in SOLVERS if s not in JUMP_SOLVERS)}), or train or distill a "
                             "flow-map head")
        sides = self.scales_for(config)
        if sides != config.scales and not config.samples_any_scales:
            raise ValueError(f"scales {list(sides)}: this model samples only its own scales {list(config.scales)}; "
                             "other lists need a model with positions='grid' and flow='full' (see "
                             f"FlowARConfig.scale_lists), this one has positions={config.positions!r}, "
                             f"flow={config.flow!r}")
        self.check_step_count(len(sides), f"scale ({len(sides)} for scales {sides})")

    def scales_for(self, config) -> tuple[int, ...]:
        """The sides this sampling runs for a model of ``config``."""
        return config.scales if self.scales is None else self.scales

    def _complete(self, given: dict) -> dict:
        # Switching to an adaptive solver drops the step count inherited from the defaults.
        if given.get("solver") in ADAPTIVE_SOLVERS and "steps" not in given:
            return {**given, "steps": None}
        return given


@dataclass
class FlowARConfig(ConfigMixin):
    """Architecture of a FlowAR model plus its recommended sampling settings."""

    scales: tuple[int, ...] = (1, 2, 4, 8, 16)  # sides of the latent pyramid, doubling from 1
    token_dim: int = 16  # latent channels of the VAE; one token is one latent pixel
    num_classes: int = 1000  # 0 means unconditional; the null class id is always num_classes
    width: int = 768  # D of the scale-wise transformer
    encoder_depth: int = 6
    decoder_depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    head: str = "transformer-v1"  # one of heads.networks.HEAD_KINDS
    head_width: int = 1024
    head_depth: int = 2
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    label_drop: float = 0.1  # classifier-free guidance training: share of labels replaced by null
    grad_checkpointing: bool = False
    flow: str = "full"  # one of FLOWS; every released model is "full"
    stage_times: tuple[tuple[float, float], ...] | None = None  # multistage only: (start, end) per scale
    # Training levers (ours; the defaults are the released training, so a released model trains as published).
    time_distribution: str = "uniform"  # the head's training times (heads.path.TIME_DISTRIBUTIONS)
    time_logit_mean: float = 0.0  # logit-normal only: t = sigmoid(mean + std n)
    time_logit_std: float = 1.0
    scale_weights: str = "area"  # one of SCALE_WEIGHTS
    # How many (time, noise) draws each token's condition trains the head on per step (MAR's diffusion_batch_mul):
    # the transformer runs once and the light head m times, so the head sees m times the samples per step.
    head_batch_mul: int = 1
    # Noisy context (after xAR, by FlowAR's authors): in training, each teacher-forced coarser scale is moved
    # to a noise level tau ~ U(0, context_noise) on the straight path, (1 - tau) x + tau eps, before it becomes
    # the next scale's input, so the model learns to correct the imperfect scales it is given when sampling
    # (exposure bias). Sampling is unchanged: its inputs are the generated scales. 0 = off.
    context_noise: float = 0.0
    # A flow-map head (heads.meanflow): it predicts the average velocity u(x_t, r, t) over [r, t], so the
    # "flow-map" solver jumps a scale in one or a few evaluations. objective="mean-flow" trains it from scratch
    # (the MeanFlow identity, with a continuous-time head); a flow-map head with the default objective is trained
    # by distillation from an ordinary head. The (r, t) law is the paper's unless changed.
    flow_map: bool = False
    objective: str = "flow-matching"  # one of OBJECTIVES
    positions: str = "sequence"  # one of POSITIONS
    scale_lists: str = "fixed"  # one of SCALE_LISTS
    # scale_lists="random": the share of steps that train the config's own list (FlexVAR's 5%), which a short
    # training needs more of to sample that list as well as a fixed model does.
    fixed_list_share: float = 0.05
    mean_flow_share_equal: float = MEANFLOW_SHARE_EQUAL
    mean_flow_logit_mean: float = MEANFLOW_LOGIT_MEAN
    mean_flow_logit_std: float = MEANFLOW_LOGIT_STD
    mean_flow_adaptive_power: float = MEANFLOW_ADAPTIVE_POWER  # 0: the plain squared error
    # Sampling defaults (the authors' evaluation settings for the released models).
    sampling: FlowARSampling = field(default_factory=FlowARSampling)

    def __post_init__(self):
        self.scales = check_scales(self.scales)
        if isinstance(self.sampling, dict):
            self.sampling = FlowARSampling.from_dict(self.sampling)
        if not isinstance(self.sampling, FlowARSampling):
            raise ValueError(f"sampling must be a FlowARSampling, got {type(self.sampling).__name__}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        for name in ("token_dim", "width", "num_heads", "head_width", "head_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.flow not in FLOWS:
            raise ValueError(f"flow must be one of {FLOWS}, got {self.flow!r}")
        if self.flow == "multistage":
            if self.stage_times is None:
                raise ValueError("stage_times must be given for flow='multistage': one (start, end) pair per scale, "
                                 "e.g. heads.multistage.stages_from_ends([...])")
            self.stage_times = check_stage_times(self.stage_times, len(self.scales))
        elif self.stage_times is not None:
            raise ValueError(f"stage_times is only for flow='multistage' (flow is {self.flow!r}), got "
                             f"{self.stage_times!r}")
        check_time_distribution(self.time_distribution, self.time_logit_mean, self.time_logit_std)
        if self.scale_weights not in SCALE_WEIGHTS:
            raise ValueError(f"scale_weights must be one of {SCALE_WEIGHTS}, got {self.scale_weights!r}")
        if not (isinstance(self.head_batch_mul, int) and self.head_batch_mul >= 1):
            raise ValueError(f"head_batch_mul must be an integer >= 1, got {self.head_batch_mul!r}")
        if not 0.0 <= self.context_noise <= 1.0:
            raise ValueError(f"context_noise must be in [0, 1] (a noise level; 0 = off), got {self.context_noise}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "mean-flow" and (not self.flow_map or self.flow != "full"):
            raise ValueError("objective='mean-flow' trains a flow-map head on the full flow: it needs flow_map=True "
                             f"and flow='full', got flow_map={self.flow_map}, flow={self.flow!r}")
        if self.objective == "mean-flow" and (self.time_distribution, self.time_logit_mean, self.time_logit_std) != \
                ("uniform", 0.0, 1.0):
            raise ValueError("time_distribution and time_logit_* are the flow-matching objective's; objective="
                             "'mean-flow' draws (r, t) by mean_flow_share_equal / mean_flow_logit_mean / _std")
        if not 0.0 <= self.mean_flow_share_equal <= 1.0 or not self.mean_flow_logit_std > 0 or \
                not self.mean_flow_adaptive_power >= 0:
            raise ValueError("mean_flow_share_equal must be in [0, 1], mean_flow_logit_std > 0 and "
                             f"mean_flow_adaptive_power >= 0, got {self.mean_flow_share_equal}, "
                             f"{self.mean_flow_logit_std} and {self.mean_flow_adaptive_power}")
        if self.flow == "multistage" and (self.head_batch_mul != 1 or self.context_noise):
            # The stages chain one noise per scale (each start is the previous end, re-noised) and their inputs
            # are noisy already; neither lever is defined on that chain.
            raise ValueError("head_batch_mul and context_noise are for flow='full' only; got head_batch_mul="
                             f"{self.head_batch_mul}, context_noise={self.context_noise} with flow='multistage'")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.scale_lists not in SCALE_LISTS:
            raise ValueError(f"scale_lists must be one of {SCALE_LISTS}, got {self.scale_lists!r}")
        if self.scale_lists == "random" and (self.positions != "grid" or self.flow != "full"):
            raise ValueError("scale_lists='random' trains on lists of scales that a per-token table cannot place: it "
                             f"needs positions='grid' and flow='full', got positions={self.positions!r}, "
                             f"flow={self.flow!r}")
        if not 0.0 <= self.fixed_list_share <= 1.0:
            raise ValueError(f"fixed_list_share must be in [0, 1], got {self.fixed_list_share}")
        self.sampling.check_model(self)

    @property
    def spans(self) -> tuple[tuple[float, float], ...]:
        """The span of time each scale's head integrates: [1, 0] everywhere for the full flow."""
        return self.spans_for(self.scales)

    @property
    def samples_any_scales(self) -> bool:
        """Whether sampling may take other lists of sides than ``scales``: grid positions place any side, and
        the full flow starts every scale from noise."""
        return self.positions == "grid" and self.flow == "full"

    def spans_for(self, sides) -> tuple[tuple[float, float], ...]:
        """The spans of a run over ``sides``: the stages of a multistage flow (which samples only its own
        scales), else [1, 0] for every side of any list."""
        return self.stage_times if self.flow == "multistage" else (FULL_SPAN,) * len(sides)

    @property
    def seq_len(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def unconditional(self) -> bool:
        return self.num_classes == 0


# Released architectures (wangqiang9/FlowAR, models/flowar.py + eval.sh) and the paper's B size.
PRESETS: dict[str, FlowARConfig] = {
    "flowar-s": FlowARConfig(
        width=768, encoder_depth=6, decoder_depth=6, num_heads=12,
        head="transformer-v1", head_width=1024, head_depth=2,
        sampling=FlowARSampling(guidance_scale=4.3, steps=25, guidance_interval=(0.0, 0.9)),
    ),
    # The paper lists a 300M "B" model but the code has no B preset. This is our own fill-in:
    # the S layout made twice as deep (12 + 12 blocks), with the S head.
    "flowar-b": FlowARConfig(
        width=768, encoder_depth=12, decoder_depth=12, num_heads=12,
        head="transformer-v1", head_width=1024, head_depth=2,
        sampling=FlowARSampling(guidance_scale=3.0, steps=25, guidance_interval=(0.0, 0.9)),
    ),
    "flowar-l": FlowARConfig(
        width=1024, encoder_depth=8, decoder_depth=8, num_heads=16,
        head="transformer-v2", head_width=1024, head_depth=12,
        sampling=FlowARSampling(guidance_scale=2.4, steps=25, guidance_interval=(0.0, 0.9)),
    ),
    "flowar-h": FlowARConfig(
        width=1536, encoder_depth=15, decoder_depth=15, num_heads=16,
        head="transformer-v2", head_width=1536, head_depth=12, grad_checkpointing=True,
        # The released sampler runs H's 50 steps on the uniform grid.
        sampling=FlowARSampling(guidance_scale=2.4, steps=50, schedule="uniform", guidance_interval=(0.0, 0.7)),
    ),
    # Our own, not released: FlowAR-S with E-CAR's multistage flow (heads.multistage). Stages end at noise levels
    # 0.7, 0.5, 0.35, 0.2 and each next one starts as low as the jump allows; 8 uniform steps per stage, about
    # S's 25 per unit of time, so the head runs 8 of S's 24 evaluations per scale.
    "flowar-s-multistage": FlowARConfig(
        width=768, encoder_depth=6, decoder_depth=6, num_heads=12,
        head="transformer-v1", head_width=1024, head_depth=2,
        flow="multistage", stage_times=stages_from_ends([0.7, 0.5, 0.35, 0.2]),
        sampling=FlowARSampling(guidance_scale=4.3, steps=8, schedule="uniform", guidance_interval=(0.0, 0.9)),
    ),
    # For tests and the CPU demo: 8x8 latents, a few thousand tokens of compute.
    "flowar-tiny": FlowARConfig(
        scales=(1, 2, 4, 8), token_dim=4, num_classes=10, width=64, encoder_depth=2, decoder_depth=2,
        num_heads=4, head="transformer-v1", head_width=64, head_depth=2,
        attn_dropout=0.0, proj_dropout=0.0,
        sampling=FlowARSampling(guidance_scale=2.0, steps=10, guidance_interval=(0.0, 0.9)),
    ),
}


def copy_preset(presets: dict, name: str, overrides: dict):
    """A copy of ``presets[name]`` with field ``overrides``; a ``sampling`` dict updates the preset's sampling
    defaults instead of replacing them."""
    if name not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {name!r}")
    preset = presets[name]
    if isinstance(overrides.get("sampling"), dict):
        overrides = {**overrides, "sampling": preset.sampling.replace(**overrides["sampling"])}
    return dataclasses.replace(preset, **overrides)


def get_preset(name: str, **overrides) -> FlowARConfig:
    """A copy of a FlowAR preset config with optional field overrides (see :func:`copy_preset`)."""
    return copy_preset(PRESETS, name, overrides)
