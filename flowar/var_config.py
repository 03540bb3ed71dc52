"""VAR configuration: one dataclass that is exactly what gets saved, and the presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from heads.categorical import check_sampling_args
from vae.files import ConfigMixin

from .config import copy_preset
from .sampling import GuidanceOptions, check_guidance_scale

# The token pyramids VAR was released with: 680 tokens at 256 px, 2240 at 512 px (16x16 and 32x32 latents).
SCALES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SCALES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def check_var_scales(scales) -> tuple[int, ...]:
    """Validate token-map sides: positive and strictly increasing, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)."""
    try:
        scales = tuple(int(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a sequence of integers, got {scales!r}") from None
    if not scales or scales[0] < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be positive and strictly increasing, e.g. {SCALES_256}; got {scales}")
    return scales


def check_token_transformer(config, *, more_sizes: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the field unless VAR's transformer fields of ``config`` (VARConfig, FlexVARConfig)
    are valid: sizes (and ``more_sizes``) positive integers, a vocabulary of two codes or more, heads dividing
    the width, rates in [0, 1)."""
    for name in ("vocab_size", "code_dim", "depth", "width", "num_heads", *more_sizes):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if config.vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {config.vocab_size}")
    if config.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {config.num_classes}")
    if config.width % config.num_heads:
        raise ValueError(f"width ({config.width}) must be divisible by num_heads ({config.num_heads})")
    if not config.mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {config.mlp_ratio}")
    for name in ("dropout", "attn_dropout", "drop_path", "cond_drop_rate"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")


@dataclass
class VARSampling(GuidanceOptions):
    """VAR's sampling options, validated once; a release saves its defaults in config.json.

    guidance_scale: 1 is unguided, as for FlowAR. VAR's authors write guidance as ``cfg`` = t_max of the
    logits ``(1 + t) cond - t uncond``, t rising linearly from 0 at the first scale to cfg at the last: that
    is ``guidance_scale = 1 + cfg`` on the linear ramp, and ``replace(var_cfg=...)`` (``--var-cfg``) takes
    their number as it is (their FID setting cfg 1.5 is guidance_scale 2.5). top_k / top_p / temperature:
    ``heads.categorical`` (0 = off; temperature 0 is greedy). more_smooth: VAR's Gumbel-softmax mixing of
    code vectors for pictures (not for FID).
    """

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    more_smooth: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_sampling_args(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
        if not isinstance(self.more_smooth, bool):
            raise ValueError(f"more_smooth must be True or False, got {self.more_smooth!r}")

    @property
    def var_cfg(self) -> float:
        """The guidance in VAR's own convention (0 = unguided)."""
        return self.guidance_scale - 1.0

    def replace(self, *, var_cfg: float | None = None, **overrides):
        """As ``GuidanceOptions.replace``, plus ``var_cfg``: guidance in VAR's own convention."""
        if var_cfg is not None:
            if overrides.get("guidance_scale") is not None:
                raise ValueError("give guidance_scale (1 = unguided) or var_cfg (VAR's cfg, 0 = unguided), not both")
            overrides["guidance_scale"] = 1.0 + check_guidance_scale(var_cfg, name="var_cfg")
        return super().replace(**overrides)


@dataclass
class VARConfig(ConfigMixin):
    """Architecture of a VAR transformer (Tian et al., 2024) plus its recommended sampling settings.

    The tokenizer is not part of the model: ``scales``, ``vocab_size`` and ``code_dim`` must match the
    multi-scale VQ tokenizer the model is trained and sampled with.
    """

    scales: tuple[int, ...] = SCALES_256  # token-map sides, coarse to fine; the last is the latent side
    vocab_size: int = 4096  # V, codebook entries of the tokenizer
    code_dim: int = 32  # Cvae, channels of a code vector (the transformer's input features)
    num_classes: int = 1000  # 0 means unconditional; the null class id is always num_classes
    depth: int = 16
    width: int = 1024  # C; the released models use 64 * depth (see VARConfig.from_depth)
    num_heads: int = 16  # the released models use depth heads of 64 channels
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_adaln: bool = False  # one AdaLN projection for all blocks plus a learned per-block offset
    attn_l2_norm: bool = True  # cosine attention with a learned per-head scale (init 4, capped at 100)
    dropout: float = 0.0  # after the attention projection and the MLP (0 in the releases; global RNG)
    attn_dropout: float = 0.0  # (0 in the releases; global RNG, unlike label drop and drop path)
    drop_path: float = 0.1 * 16 / 24  # stochastic depth of the last block, rising linearly from 0 at the first
    cond_drop_rate: float = 0.1  # classifier-free guidance training: share of labels replaced by null
    init_adaln_gamma: float = 1e-5  # initial gain of the AdaLN gate rows (the 512 px d36 run used 5e-6)
    # Sampling defaults: the authors' FID settings (their cfg 1.5 is guidance_scale 2.5, see VARSampling).
    sampling: VARSampling = field(default_factory=lambda: VARSampling(guidance_scale=2.5, top_k=900, top_p=0.96))

    def __post_init__(self):
        self.scales = check_var_scales(self.scales)
        check_token_transformer(self)
        if isinstance(self.sampling, dict):
            self.sampling = VARSampling.from_dict(self.sampling)
        if not isinstance(self.sampling, VARSampling):
            raise ValueError(f"sampling must be a VARSampling, got {type(self.sampling).__name__}")

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "VARConfig":
        """The authors' size rule: width 64 * depth, depth heads, drop path 0.1 * depth / 24."""
        fields = dict(depth=depth, width=64 * depth, num_heads=depth, drop_path=0.1 * depth / 24)
        return cls(**{**fields, **overrides})

    @property
    def seq_len(self) -> int:
        """L, tokens over all scales."""
        return sum(s * s for s in self.scales)

    @property
    def first_len(self) -> int:
        """Tokens of the first scale, all of which get the class token as input."""
        return self.scales[0] ** 2

    @property
    def unconditional(self) -> bool:
        return self.num_classes == 0


# Released architectures (FoundationVision/VAR, models/__init__.py build_vae_var: attn_l2_norm on, shared
# AdaLN off, class table of 1000 + 1). Parameter counts, ours = theirs (tests/test_var_model.py):
# d16 310,283,520, d20 600,917,136, d24 1,033,399,360, d30 2,010,020,356, d36 2,353,893,904.
VAR_PRESETS: dict[str, VARConfig] = {
    "var-d16": VARConfig.from_depth(16),
    "var-d20": VARConfig.from_depth(20),
    "var-d24": VARConfig.from_depth(24),
    "var-d30": VARConfig.from_depth(30),
    # The 512 px model as their README's training command builds it ("d36-s": shared AdaLN, alng 5e-6).
    # Its released file (var_d36.pth) has not been checked against this layout.
    "var-d36": VARConfig.from_depth(36, scales=SCALES_512, shared_adaln=True, init_adaln_gamma=5e-6),
    # For tests and the MNIST demo: matches the tokenizer preset vae.msvq "mnist" (8x8 token maps of a
    # 64-code book with 16 channels, scales 1, 2, 4, 8: 85 tokens); 1.2M parameters.
    "var-tiny": VARConfig(
        scales=(1, 2, 4, 8), vocab_size=64, code_dim=16, num_classes=10, depth=4, width=128, num_heads=4,
        drop_path=0.0, sampling=VARSampling(guidance_scale=2.5),
    ),
}


def get_var_preset(name: str, **overrides) -> VARConfig:
    """A copy of a VAR preset config with optional field overrides (see ``flowar.config.copy_preset``)."""
    return copy_preset(VAR_PRESETS, name, overrides)
