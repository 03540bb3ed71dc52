"""FlexVAR configuration: the dataclass that gets saved, its sampling options, and the presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from vae.files import ConfigMixin
from vae.pyramid import check_scale_list

from .config import copy_preset
from .var_config import SCALES_256, VARSampling, check_token_transformer

# The sides the released sampler draws with top-k / top-p (VAR's 256 px and 512 px pyramids); any other side,
# and every side above ``greedy_above``, takes the most likely token (autoregressive_infer_cfg's fallback).
RELEASED_SAMPLED_SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)
# The scale lists a training step uses: "random" (FlexVAR's law, see FlexVAR.draw_scale_list) or "fixed".
SCALE_LISTS = ("random", "fixed")


def _check_sides(value, name: str) -> tuple[int, ...]:
    try:
        sides = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive integer sides, got {value!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ValueError(f"{name} must be a list of positive integer sides, got {value!r}")
    return sides


@dataclass
class FlexVARSampling(VARSampling):
    """FlexVAR's sampling options: VAR's (guidance in either convention, top-k, top-p, temperature,
    more_smooth), plus the list of sides to sample and the released sampler's rules for sides it was not
    meant to draw from.

    scales: any increasing list of sides from 1 (None: the model's own list), e.g. fewer scales for speed,
    more for quality, or a last side above the trained one for larger images (zero-shot). guidance_ramp: the
    linear ramp reaches ``guidance_scale`` at scale ``guidance_ramp - 1`` and keeps that slope on longer
    lists (the released rule, ``k / min(K - 1, 9)``); 0 ramps over the whole list, as VAR does.
    greedy_above: sides above it are drawn greedily and guided with the full ``guidance_scale`` (the released
    ``max_pn``). sampled_sides: the sides drawn with top-k / top-p, other sides greedily; empty: every side
    is drawn with top-k / top-p.
    """

    scales: tuple[int, ...] | None = None
    guidance_ramp: int = 10
    greedy_above: int = 16
    sampled_sides: tuple[int, ...] = RELEASED_SAMPLED_SIDES

    def __post_init__(self):
        super().__post_init__()
        if self.scales is not None:
            self.scales = check_scale_list(self.scales, name="scales")
        if isinstance(self.guidance_ramp, bool) or not isinstance(self.guidance_ramp, int) or \
                self.guidance_ramp < 0 or self.guidance_ramp == 1:
            raise ValueError(f"guidance_ramp must be an integer >= 2 (scales to reach full guidance) or 0 (the whole "
                             f"list), got {self.guidance_ramp!r}")
        if isinstance(self.greedy_above, bool) or not isinstance(self.greedy_above, int) or self.greedy_above < 1:
            raise ValueError(f"greedy_above must be a positive integer side, got {self.greedy_above!r}")
        self.sampled_sides = _check_sides(self.sampled_sides, "sampled_sides")

    def scales_for(self, config) -> tuple[int, ...]:
        """The sides a run samples: ``scales``, or the model's own list."""
        return config.scales if self.scales is None else self.scales

    def check_model(self, config) -> None:
        sides = self.scales_for(config)
        if sides[-1] > config.max_side:
            raise ValueError(f"scales {list(sides)}: the last side may be at most {config.max_side} (max_side: the "
                             f"largest token map the tokenizer decodes at this model's image sizes)")

    def guidance_excess(self, k: int, sides: tuple[int, ...]) -> float:
        """The guidance weight of scale k of ``sides`` minus one (VAR's ``t``)."""
        excess = self.guidance_scale - 1.0
        if self.cfg_schedule != "linear" or sides[k] > self.greedy_above:
            return excess
        span = len(sides) - 1 if self.guidance_ramp == 0 else min(len(sides) - 1, self.guidance_ramp - 1)
        return excess * k / max(span, 1)

    def greedy_at(self, side: int) -> bool:
        """Whether tokens of this side take the most likely code instead of a top-k / top-p draw."""
        return side > self.greedy_above or (bool(self.sampled_sides) and side not in self.sampled_sides)


@dataclass
class FlexVARConfig(ConfigMixin):
    """Architecture of a FlexVAR transformer (Jiao et al., 2025) plus its training and sampling settings.

    VAR's blocks over the codes of a single-scale VQ tokenizer (``vae.flexvq``): each scale predicts the
    token map of the whole image at its side (no residuals), its input is the previous scale's codes resized
    bicubically, and positions come from one learned 2-D table resized to each side, so any list of sides
    can be trained and sampled. ``vocab_size`` and ``code_dim`` must match the tokenizer.
    """

    scales: tuple[int, ...] = SCALES_256  # the default list (sampling; 5% of the random-list training steps)
    vocab_size: int = 8912  # V, codebook entries of the tokenizer
    code_dim: int = 32  # Cvae, channels of a code vector
    num_classes: int = 1000  # 0 means unconditional; the null class id is always num_classes
    depth: int = 16
    width: int = 1024  # C; the released models use 64 * depth (see FlexVARConfig.from_depth)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_adaln: bool = False
    attn_l2_norm: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.1 * 16 / 24
    cond_drop_rate: float = 0.1
    init_adaln_gamma: float = 1e-5
    position_side: int = 32  # side of the learned position table, area-resized to every scale's side
    max_side: int = 32  # the largest side sampling accepts (the released 512 px lists end at 32)
    scale_lists: str = "random"  # one of SCALE_LISTS: how a training step picks its sides
    fixed_list_share: float = 0.05  # share of random-list steps that train ``scales`` itself
    max_tokens: int = 680  # random lists are cut below this many tokens (VAR's 256 px count)
    sampling: FlexVARSampling = field(
        default_factory=lambda: FlexVARSampling(guidance_scale=3.5, top_k=900, top_p=0.95))

    def __post_init__(self):
        self.scales = check_scale_list(self.scales, name="scales")
        check_token_transformer(self, more_sizes=("position_side", "max_side", "max_tokens"))
        if self.scales[-1] > self.max_side:
            raise ValueError(f"scales {list(self.scales)} end above max_side {self.max_side}")
        if self.scale_lists not in SCALE_LISTS:
            raise ValueError(f"scale_lists must be one of {SCALE_LISTS}, got {self.scale_lists!r}")
        if not 0.0 <= self.fixed_list_share <= 1.0:
            raise ValueError(f"fixed_list_share must be in [0, 1], got {self.fixed_list_share}")
        if self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must hold the config's own list of {self.seq_len} tokens")
        if isinstance(self.sampling, dict):
            self.sampling = FlexVARSampling.from_dict(self.sampling)
        if not isinstance(self.sampling, FlexVARSampling):
            raise ValueError(f"sampling must be a FlexVARSampling, got {type(self.sampling).__name__}")
        self.sampling.check_model(self)

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "FlexVARConfig":
        """The authors' size rule (VAR's): width 64 * depth, depth heads, drop path 0.1 * depth / 24."""
        fields = dict(depth=depth, width=64 * depth, num_heads=depth, drop_path=0.1 * depth / 24)
        return cls(**{**fields, **overrides})

    @property
    def latent_side(self) -> int:
        """The side of the tokenizer's full token map at the trained image size (the list's last side)."""
        return self.scales[-1]

    @property
    def seq_len(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def samples_any_scales(self) -> bool:
        """FlexVAR samples any list of sides up to ``max_side``."""
        return True

    @property
    def unconditional(self) -> bool:
        return self.num_classes == 0


# Released architectures (jiaosiyu1999/FlexVAR, models/__init__.py build_vae_var with train.py's V 8912 and
# Cvae 32; eval_c2i.py's sampling: cfg 2.5 in VAR's convention, top-k 900, top-p 0.95). Parameter counts,
# ours = theirs (tools/parity_flexvar.py builds both): d16 315,561,936, d20 607,513,952, d24 1,041,314,576; the
# paper's 310M / 600M / 1.0B are VAR's, whose 4096-code head is 4.9M to 8.3M smaller.
FLEXVAR_PRESETS: dict[str, FlexVARConfig] = {
    "flexvar-d16": FlexVARConfig.from_depth(16),
    "flexvar-d20": FlexVARConfig.from_depth(20),
    "flexvar-d24": FlexVARConfig.from_depth(24),
    # For tests and the digits demo: matches the tokenizer preset vae.flexvq "mnist" (8x8 token maps of a
    # 64-code book with 16 channels); every side up to 8 is sampled.
    "flexvar-tiny": FlexVARConfig(
        scales=(1, 2, 4, 8), vocab_size=64, code_dim=16, num_classes=10, depth=4, width=128, num_heads=4,
        drop_path=0.0, position_side=8, max_side=16, max_tokens=204, fixed_list_share=0.5,
        sampling=FlexVARSampling(guidance_scale=2.5, greedy_above=16, sampled_sides=()),
    ),
}


def get_flexvar_preset(name: str, **overrides) -> FlexVARConfig:
    """A copy of a FlexVAR preset config with optional field overrides (see ``flowar.config.copy_preset``)."""
    return copy_preset(FLEXVAR_PRESETS, name, overrides)
