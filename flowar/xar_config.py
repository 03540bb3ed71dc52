"""xAR configuration: the dataclass that gets saved, its sampling options, and the presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from heads.flow import check_guidance_interval
from heads.path import check_time_distribution
from heads.solvers import ADAPTIVE_SOLVERS, SolveOptions
from vae.files import ConfigMixin

from .config import copy_preset
from .sampling import GuidanceOptions, PerScaleSteps, guidance_excess

# How a cell's flow is integrated: "sde", the released sampler (Euler-Maruyama, see flowar.xar.euler_maruyama),
# or one of heads.solvers' ODE solvers on a uniform grid of ``steps``.
XAR_SOLVERS = ("sde", "euler", "midpoint", "rk4", "dopri5")


def _check_positive_int(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class XARSampling(PerScaleSteps, GuidanceOptions):
    """xAR's sampling options, validated once; a release saves its defaults in config.json.

    guidance_scale: 1 is unguided; with ``cfg_schedule="linear"`` the weight ramps per cell, from 1 at the first
    cell to ``guidance_scale`` at the last (the released ``(cfg - 1) k / 3 + 1`` over four cells).
    guidance_interval: (low, high), the times t (1 noise, 0 data) at which guidance applies; an evaluation outside
    it runs the conditional rows alone, which saves the null class's transformer pass there (half the rows), and
    where no evaluation of a run falls inside it, the null rows are left out altogether, their context passes
    included, so the run is the unguided one. The default (0, 1) guides every evaluation, as released.
    solver: "sde", the released Euler-Maruyama sampler on ``linspace(1, 0.04, steps)`` plus a deterministic step to
    0 (``steps`` transformer evaluations per cell, ``steps >= 2``), or an ODE solver of ``heads.solvers`` on a
    uniform grid of ``steps`` (dopri5: adaptive, ``steps=None``, tolerances ``atol`` / ``rtol``). ``steps`` is one
    count for every cell or a tuple with one count per cell.
    """

    guidance_interval: tuple[float, float] = (0.0, 1.0)
    solver: str = "sde"
    steps: int | tuple[int, ...] | None = 40
    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self.guidance_interval = check_guidance_interval(self.guidance_interval)
        if self.solver not in XAR_SOLVERS:
            raise ValueError(f"solver must be one of {XAR_SOLVERS}, got {self.solver!r}")
        counts = self._step_counts()
        if self.solver == "sde":
            # One step would be the deterministic last step alone, from pure noise straight to t = 0.
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in counts):
                raise ValueError(f"steps must be an integer >= 2 for the sde solver (or one per cell, each >= 2), "
                                 f"got {self.steps!r}")
            for name in ("atol", "rtol"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            self._solves = None
        else:  # SolveOptions validates steps, atol and rtol for the ODE solver, each cell's count
            self._solves = [SolveOptions(solver=self.solver, steps=count, schedule="uniform", atol=self.atol,
                                         rtol=self.rtol) for count in counts]

    def solve_at(self, k: int) -> SolveOptions | None:
        """The ODE solve of cell k (None for the sde solver)."""
        return None if self._solves is None else self._solves[k if self.per_scale_steps else 0]

    def noise_draws_at(self, k: int) -> int:
        """Standard normal draws of cell k: the initial noise, and for the sde solver one more per stochastic
        step (``steps - 1``)."""
        return self.steps_at(k) if self.solver == "sde" else 1

    def weight_at(self, k: int, num_cells: int) -> float:
        """The guidance weight of cell k (1: unguided)."""
        return 1.0 + guidance_excess(self.guidance_scale, k, num_cells, self.cfg_schedule)

    def guides_at(self, t: float) -> bool:
        """Whether guidance applies at the solver's time t (float64, as the solver holds it)."""
        low, high = self.guidance_interval
        return low <= t <= high

    def check_model(self, config) -> None:
        self.check_step_count(config.num_cells, f"cell ({config.num_cells}: the model's cells)")

    def _complete(self, given: dict) -> dict:
        # Switching to the adaptive solver drops the step count inherited from the defaults.
        if given.get("solver") in ADAPTIVE_SOLVERS and "steps" not in given:
            return {**given, "steps": None}
        return given


@dataclass
class XARConfig(ConfigMixin):
    """Architecture of an xAR model (Ren et al., 2025) plus its training and sampling settings.

    The latent (token_dim, latent_side, latent_side) is cut into cells of cell_side x cell_side tokens, one
    autoregressive step each, in row-major order (released: four 8x8 cells of MAR's 16x16x16 KL-16 latent).
    """

    latent_side: int = 16  # S: side of the VAE latent
    cell_side: int = 8  # side of one cell (the X of next-X prediction); must divide latent_side
    token_dim: int = 16  # latent channels of the VAE; one token is one latent pixel
    num_classes: int = 1000  # 0 means unconditional; the null class id is always num_classes
    width: int = 768
    encoder_depth: int = 8
    decoder_depth: int = 8
    num_heads: int = 12
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.1  # the released training command's
    proj_dropout: float = 0.1
    label_drop: float = 0.1  # share of labels replaced by the null class in training (classifier-free guidance)
    # Each cell's training time: t = sigmoid(mean + std n), n ~ N(0, 1), the paper's logit-normal(0, 1).
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0
    sampling: XARSampling = field(default_factory=XARSampling)

    def __post_init__(self):
        for name in ("latent_side", "cell_side", "token_dim", "width", "encoder_depth", "decoder_depth", "num_heads"):
            _check_positive_int(getattr(self, name), name)
        if self.latent_side % self.cell_side:
            raise ValueError(f"cell_side ({self.cell_side}) must divide latent_side ({self.latent_side})")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = unconditional), got {self.num_classes!r}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"width ({self.width}) must be num_heads ({self.num_heads}) times a multiple of 4 "
                             "(each head's channels split into row and column pairs of the 2-D RoPE)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.label_drop <= 1.0:
            raise ValueError(f"label_drop must lie in [0, 1], got {self.label_drop}")
        check_time_distribution("logit-normal", self.time_logit_mean, self.time_logit_std)
        if isinstance(self.sampling, dict):
            self.sampling = XARSampling.from_dict(self.sampling)
        if not isinstance(self.sampling, XARSampling):
            raise ValueError(f"sampling must be an XARSampling, got {type(self.sampling).__name__}")
        self.sampling.check_model(self)

    @property
    def cells_per_side(self) -> int:
        return self.latent_side // self.cell_side

    @property
    def num_cells(self) -> int:
        """K, the autoregressive steps of one image."""
        return self.cells_per_side ** 2

    @property
    def cell_tokens(self) -> int:
        return self.cell_side ** 2

    @property
    def seq_len(self) -> int:
        return self.latent_side ** 2

    @property
    def scales(self) -> tuple[int, ...]:
        """The sampling engine's steps: one per cell, each a cell_side x cell_side square of tokens."""
        return (self.cell_side,) * self.num_cells

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def unconditional(self) -> bool:
        return self.num_classes == 0


# Released architectures (OliverRensu/xAR, models/xar.py: xar_base, xar_large, xar_huge; 256 px, MAR's KL-16) and
# the README's evaluation settings (cfg and flow steps).
XAR_PRESETS: dict[str, XARConfig] = {
    "xar-b": XARConfig(width=768, encoder_depth=8, decoder_depth=8, num_heads=12,
                       sampling=XARSampling(guidance_scale=2.7, steps=40)),
    "xar-l": XARConfig(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16,
                       sampling=XARSampling(guidance_scale=2.3, steps=50)),
    "xar-h": XARConfig(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16,
                       sampling=XARSampling(guidance_scale=2.2, steps=50)),
    # For tests and the CPU demo: 8x8x4 latents in four 4x4 cells.
    "xar-tiny": XARConfig(latent_side=8, cell_side=4, token_dim=4, num_classes=10, width=64, encoder_depth=2,
                          decoder_depth=2, num_heads=4, attn_dropout=0.0, proj_dropout=0.0,
                          sampling=XARSampling(guidance_scale=2.0, steps=10)),
}


def get_xar_preset(name: str, **overrides) -> XARConfig:
    """A copy of an xAR preset config with optional field overrides (see ``flowar.config.copy_preset``)."""
    return copy_preset(XAR_PRESETS, name, overrides)
