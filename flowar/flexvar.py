"""FlexVAR: next-scale prediction of whole token maps, with no residuals, over any list of scales (Jiao et al., 2025).

Scale k's target is the tokenizer's index map of the image's features area-resized to side s_k; its input is
the previous scale's code vectors resized bicubically to s_k (no accumulated f_hat, no phi convolutions),
and its positions are one learned (1, C, P, P) table area-resized to s_k. Nothing in the model depends on
the list of sides, so training draws a new list at every step and sampling takes any list: fewer scales
for speed, more for quality, a larger last side for larger images. Only the last scale is decoded.

The blocks, class token, AdaLN and head are VAR's (``flowar.var.TokenScaleModel``), with the released
parameter names (``word_embed``, ``class_emb``, ``pos_start``, ``pos_1LC``, ``blocks.{i}...``, ``head_nm``,
``head``), so ``FlexVARd{16,20,24}-epo*.pth`` loads after dropping two constant buffers
(:func:`convert_released_flexvar_state_dict`). The tokenizer (``vae.flexvq.FlexVQVAE``) is passed in, never
part of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae.files import load_state_strict, read_torch_state_dict
from vae.pyramid import check_scale_list

from .attention import scale_segments
from .flexvar_config import FlexVARConfig, FlexVARSampling, get_flexvar_preset
from .sampling import Known, generate
from .var import TokenScaleModel, VARDraw, VAROutput, VARStepper

MODEL_TYPE = "flexvar"
# Constant buffers of the released state dicts that we do not keep: the additive block-causal mask (of
# whatever list the run used last) and each block's all-zero key bias.
RELEASED_ONLY_KEYS = ("attn_bias_for_masking", "blocks.{i}.attn.zero_k_bias")


def sinusoid_position_table(side: int, width: int) -> torch.Tensor:
    """(1, width, side, side): channel 2i holds sin(row * f_i) and channel 2i + 1 cos(column * f_i), with
    f_i = 10000^(-2i / width): the released table's initial values."""
    if width % 2:
        raise ValueError(f"width must be even for a sinusoid position table, got {width}")
    freqs = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * -(math.log(10000.0) / width))  # (width/2,)
    coords = torch.arange(side, dtype=torch.float32)
    table = torch.empty(width, side, side)
    table[0::2] = torch.sin(coords[None, :, None] * freqs[:, None, None]).expand(-1, side, side)
    table[1::2] = torch.cos(coords[None, None, :] * freqs[:, None, None]).expand(-1, side, side)
    return table[None]


@dataclass
class FlexVARSampleOutput:
    """Sampled token maps and the code vectors of the last one, which the tokenizer decodes."""

    indices: list[torch.Tensor]  # K LongTensors (B, s_k, s_k)
    codes: torch.Tensor  # (B, Cvae, S, S): the last scale's code vectors

    @property
    def decoder_input(self) -> torch.Tensor:
        return self.codes

    @property
    def latent_output(self) -> list[torch.Tensor]:
        return self.indices


class FlexVAR(TokenScaleModel):
    """Class-conditional next-scale prediction of whole token maps over any list of sides."""

    model_type = MODEL_TYPE
    config_class = FlexVARConfig
    sampling_class = FlexVARSampling
    interchangeable_fields = ("vocab_size", "code_dim", "num_classes")
    # The tokenizer's continuous features (its ``encode``): each step quantizes them at its own sides.
    training_data = "latents"

    def _add_positions(self) -> None:
        c = self.config
        self.pos_start = nn.Parameter(torch.empty(1, 1, c.width))  # added to the class token
        self.pos_1LC = nn.Parameter(torch.empty(1, c.width, c.position_side, c.position_side))

    def _initialize_positions(self, std: float) -> None:
        nn.init.trunc_normal_(self.pos_start, std=std)
        with torch.no_grad():
            self.pos_1LC.copy_(sinusoid_position_table(self.config.position_side, self.config.width))

    def input_positions(self, sides) -> torch.Tensor:
        """(1, L, D): the position table area-resized to every side of ``sides``, concatenated row-major."""
        return torch.cat([F.interpolate(self.pos_1LC, size=(s, s), mode="area").flatten(2).transpose(1, 2)
                          for s in sides], dim=1)

    # ------------------------------------------------------------------ inputs
    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless ``tokenizer``'s codebook size and code dimension are this model's."""
        c = self.config
        if tokenizer is None:
            raise ValueError("tokenizer is required (a vae.flexvq.FlexVQVAE matching the model)")
        theirs = (getattr(tokenizer, "codebook_size", None), getattr(tokenizer, "code_dim", None))
        if theirs != (c.vocab_size, c.code_dim) or not hasattr(tokenizer, "next_input"):
            raise ValueError(f"tokenizer does not match the model: a FlexVQ tokenizer with codebook_size/code_dim "
                             f"{(c.vocab_size, c.code_dim)} is needed, got {type(tokenizer).__name__} with {theirs}")

    def embed_inputs(self, class_embedding, inputs=None, *, sides=None) -> torch.Tensor:
        """Input tokens (B, n, D): the class token, then the embedded inputs (B, n - 1, Cvae) of the following
        scales of ``sides`` (default: the config's), with positions added."""
        sides = self.config.scales if sides is None else sides
        batch = class_embedding.shape[0]
        start = class_embedding[:, None] + self.pos_start
        tokens = start if inputs is None else torch.cat([start, self.word_embed(inputs.to(start.dtype))], dim=1)
        return tokens + self.input_positions(sides)[:, : tokens.shape[1]].expand(batch, -1, -1)

    # ------------------------------------------------------------------ training
    def draw_scale_list(self, generator=None) -> tuple[int, ...]:
        """A training step's sides: the config's own list with probability ``fixed_list_share``; else FlexVAR's
        law, 1 and 2, then 5/8 of the sides from 3 to 5S/8 and 2/5 of those above it up to S - 1 (drawn without
        replacement), then S, for the latent side S (at S = 16: 5 of 3-10 and 2 of 11-15); then one interior
        side dropped with probability 10%, a second with 5%, a third with 2%, a fourth with 1%; then sides
        among the last four dropped at random until the list holds at most ``max_tokens`` tokens."""
        c = self.config
        full = c.latent_side
        device = generator.device if generator is not None else "cpu"

        def uniform() -> float:
            return float(torch.rand((), generator=generator, device=device))

        def pick(values: list[int], count: int) -> list[int]:
            order = torch.randperm(len(values), generator=generator, device=device)[:count]
            return [values[i] for i in order.tolist()]

        if uniform() < c.fixed_list_share:
            return c.scales
        split = full * 5 // 8
        low, high = list(range(3, split + 1)), list(range(split + 1, full))
        middle = pick(low, round(len(low) * 5 / 8)) + pick(high, round(len(high) * 2 / 5))
        sides = sorted({1, 2, full} | set(middle)) if full >= 2 else [1]
        draw = uniform()
        for threshold in (0.9, 0.95, 0.98, 0.99):
            if draw > threshold and len(sides) > 3:  # interior sides: never 1, 2 or the last
                del sides[2 + int(torch.randint(len(sides) - 3, (), generator=generator, device=device))]
        while sum(s * s for s in sides) > c.max_tokens and len(sides) > 1:
            first = max(len(sides) - 4, 1)
            del sides[first + int(torch.randint(len(sides) - first, (), generator=generator, device=device))]
        return tuple(sides)

    def draw_randomness(self, batch_size: int, *, generator=None, device=None, scales=None) -> dict:
        """VAR's draws (``drop_mask``, ``keep``), after the step's list of sides (``scales``, shared by every
        row) when ``scale_lists="random"`` or when ``scales`` is given."""
        sides = None if scales is None else check_scale_list(scales, name="scales")
        if sides is None and self.config.scale_lists == "random":
            sides = self.draw_scale_list(generator)
        draws = super().draw_randomness(batch_size, generator=generator, device=device)
        if sides is not None:
            draws["scales"] = sides
        return draws

    def check_sides(self, sides, *, name: str = "scales") -> tuple[int, ...]:
        """Validated sides of a training or sampling list: increasing from 1, the last at most ``max_side``."""
        sides = check_scale_list(sides, name=name)
        if sides[-1] > self.config.max_side:
            raise ValueError(f"{name} {list(sides)}: the last side may be at most {self.config.max_side} (max_side)")
        return sides

    def logits(self, inputs, class_labels=None, *, sides=None, drop_mask=None, keep=None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) over ``sides`` (default: the config's list).

        inputs: (B, L - 1, Cvae), the tokenizer's ``teacher_forcing_inputs`` for ``sides`` (each scale's
        codes resized to the next side). drop_mask (B,) bool: labels to replace by the null class. keep
        (B, depth, 2) bool: drop-path draws, used in training mode only.
        """
        c = self.config
        sides = c.scales if sides is None else self.check_sides(sides)
        expected = (sum(s * s for s in sides) - 1, c.code_dim)
        if not torch.is_tensor(inputs) or inputs.ndim != 3 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"inputs must be (B, {expected[0]}, {expected[1]}) for sides {list(sides)} and code_dim "
                             f"{c.code_dim}, got {tuple(getattr(inputs, 'shape', ()))}")
        class_embedding = self.class_embedding(class_labels, inputs.shape[0], drop_mask=drop_mask)
        tokens = self.embed_inputs(class_embedding, inputs, sides=sides)  # (B, L, D)
        multipliers = self.drop_path_multipliers(None if keep is None else keep.to(tokens.device), tokens.dtype)
        hidden = self.transformer(tokens, self.block_modulation(class_embedding), sides=sides, keep=multipliers)
        return self.head_logits(hidden, class_embedding)

    def forward(self, features, class_labels=None, *, tokenizer, scales=None, drop_mask=None, keep=None,
                generator=None) -> VAROutput:
        """Cross-entropy loss of the token maps of ``features`` (B, Cvae, S, S) (the tokenizer's ``encode``)
        quantized at the sides ``scales``: the config's list, or a list drawn from ``generator`` in training
        mode with ``scale_lists="random"``. Label drop and drop path are drawn from ``generator`` in training
        mode unless ``drop_mask`` (B,) / ``keep`` (B, depth, 2) are given. The tokenizer is never trained here.
        """
        c = self.config
        self.check_tokenizer(tokenizer)
        if not torch.is_tensor(features) or features.ndim != 4 or features.shape[1] != c.code_dim \
                or features.shape[2] != features.shape[3]:
            raise ValueError(f"features must be (B, {c.code_dim}, S, S) tokenizer features, got "
                             f"{tuple(getattr(features, 'shape', ()))}")
        batch = features.shape[0]
        if self.training and (drop_mask is None or keep is None or scales is None):
            draws = self.draw_randomness(batch, generator=generator, device=features.device, scales=scales)
            scales = draws.get("scales", scales)
            drop_mask = draws["drop_mask"] if drop_mask is None else drop_mask
            keep = draws["keep"] if keep is None else keep
        sides = c.scales if scales is None else self.check_sides(scales)
        if sides[-1] > features.shape[-1]:
            raise ValueError(f"scales {list(sides)} end above the features' side {features.shape[-1]}")
        with torch.no_grad():
            indices = tokenizer.indices_from_features(features, sides)
            inputs = tokenizer.teacher_forcing_inputs(indices, sides)
        logits = self.logits(inputs.to(self.word_embed.weight.device), class_labels, sides=sides,
                             drop_mask=drop_mask, keep=keep)
        targets = torch.cat([idx.flatten(1) for idx in indices], dim=1).to(logits.device)  # (B, L)
        per_token = self.head.loss(logits, targets)  # (B, L)
        per_scale = torch.stack([per_token[:, start:end].mean() for start, end in scale_segments(sides)])
        return VAROutput(loss=per_token.mean(), loss_per_scale=per_scale.detach())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, class_labels=None, *, tokenizer, batch_size: int | None = None,
               sampling: FlexVARSampling | None = None, generator: torch.Generator | None = None,
               noise: list[torch.Tensor] | None = None, progress: bool = False, **options) -> FlexVARSampleOutput:
        """Generate token maps over the sides ``scales`` (an option; default the config's list): one cached
        transformer pass per scale, each scale's input the previous one's codes resized bicubically.

        sampling / options: :class:`~flowar.flexvar_config.FlexVARSampling` and overrides of its fields
        (guidance_scale or var_cfg, cfg_schedule, guidance_ramp, top_k, top_p, temperature, greedy_above,
        sampled_sides, more_smooth, scales). noise: one (B, s*s) tensor of uniforms in [0, 1) per sampled side
        (see ``VAR.sample``).
        """
        return generate(self, class_labels, autoencoder=tokenizer, batch_size=batch_size, sampling=sampling,
                        generator=generator, noise=noise, progress=progress, **options)

    def sampled_scales(self, options: FlexVARSampling) -> tuple[int, ...]:
        return options.scales_for(self.config)

    def stepper(self, labels: torch.Tensor, options: FlexVARSampling, *, timed: bool = False) -> "FlexVARStepper":
        return FlexVARStepper(self, labels, options, timed=timed)

    def canvas(self, batch: int, autoencoder=None, options=None) -> "FlexVARCanvas":
        self.check_tokenizer(autoencoder)
        sides = self.config.scales if options is None else self.sampled_scales(options)
        return FlexVARCanvas(sides, autoencoder)

    def known_regions(self, autoencoder, images: torch.Tensor, keep: list[torch.Tensor]) -> list[Known]:
        """Each scale's known ids: the image's features quantized at the config's sides."""
        self.check_tokenizer(autoencoder)
        indices = autoencoder.encode_indices(images, self.config.scales)
        return [(m.to(self.device), idx.to(self.device)) for m, idx in zip(keep, indices)]

    # ------------------------------------------------------------------ training data
    def check_training_source(self, source) -> None:
        self.check_tokenizer(source.autoencoder)
        self.check_source_shape(source, self.config.code_dim, data="features",
                                fields="model.code_dim / model.scales (the tokenizer's)")

    def training_inputs(self, autoencoder) -> dict:
        return {"tokenizer": autoencoder}  # each step's targets and inputs come from the frozen tokenizer

    # ------------------------------------------------------------------ files
    @classmethod
    def from_released(cls, path, preset: str | FlexVARConfig, *, map_location="cpu") -> "FlexVAR":
        """Load ``FlexVARd{16,20,24}-epo*.pth`` (a bare state dict, or a trainer checkpoint holding it under
        ``['trainer']['var_wo_ddp']``) into ``preset``, a preset name or a :class:`FlexVARConfig`. Read with
        ``weights_only=True``; a checkpoint of another size fails listing missing, unexpected and mis-shaped
        keys."""
        config = preset if isinstance(preset, FlexVARConfig) else get_flexvar_preset(preset)
        state = read_torch_state_dict(path, map_location=map_location, wrappers=(("trainer", "var_wo_ddp"),))
        model = cls(config)
        load_state_strict(model, convert_released_flexvar_state_dict(state),
                          source=f"checkpoint {path} (preset {preset!r})")
        return model.eval()


class FlexVARStepper(VARStepper):
    """VAR's per-scale step over the sampled sides, with the released sampler's guidance ramp and greedy sides."""

    def guidance_at(self, k: int) -> float:
        return self.options.guidance_excess(k, self.sides)

    def top_k_at(self, k: int) -> int:
        # A greedy side keeps one candidate and still draws from it, consuming the generator as the released
        # sampler does, so that later scales draw what it draws.
        return 1 if self.options.greedy_at(self.sides[k]) else self.options.top_k


class FlexVARCanvas:
    """A FlexVAR run's result (``flowar.sampling.Canvas``): the token maps, and each scale's code vectors,
    which the tokenizer resizes into the next scale's input."""

    def __init__(self, sides: tuple[int, ...], tokenizer):
        self.sides, self.tokenizer = sides, tokenizer
        self.indices, self.codes = [], None

    def add(self, k: int, drawn: VARDraw) -> torch.Tensor | None:
        self.indices.append(drawn.ids)
        last = k + 1 == len(self.sides)
        if drawn.weights is None:
            if last:
                self.codes = self.tokenizer.embed(drawn.ids)
                return None
            return self.tokenizer.next_input(drawn.ids, self.sides[k + 1])
        # more_smooth: the Gumbel-softmax mixture of the (normalised) code vectors
        side = self.sides[k]
        mixed = drawn.weights @ self.tokenizer.codebook.to(drawn.weights)  # (B, s*s, Cvae)
        self.codes = mixed.transpose(1, 2).reshape(mixed.shape[0], -1, side, side)
        return None if last else self.tokenizer.resize_codes(self.codes, self.sides[k + 1])

    def output(self) -> FlexVARSampleOutput:
        return FlexVARSampleOutput(indices=self.indices, codes=self.codes)


# ---------------------------------------------------------------------------------------- released files
def convert_released_flexvar_state_dict(state: dict) -> dict:
    """Authors' key layout -> ours. Names are shared; two constant buffers are checked, then dropped:
    ``attn_bias_for_masking`` (the additive mask of the last list their run used; block-causal attention needs
    none) and every block's ``attn.zero_k_bias`` (a bias that is always zero)."""
    state = dict(state)
    bias = state.pop("attn_bias_for_masking", None)
    if bias is not None and bool((bias.float() > 0).any()):
        raise ValueError("checkpoint attn_bias_for_masking is not an additive mask (it holds positive values)")
    for key in [k for k in state if k.startswith("blocks.") and k.endswith(".attn.zero_k_bias")]:
        if torch.count_nonzero(state.pop(key)):
            raise ValueError(f"checkpoint {key} is not all zeros; this model has no key bias")
    return state
