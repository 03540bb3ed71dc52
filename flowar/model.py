"""The FlowAR model: a block-causal scale-wise transformer that conditions a flow-matching head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from heads.flow import FlowSample
from heads.layers import RMSNorm, xavier_init_linears
from heads.multistage import renoise, training_stages
from heads.networks import ROPE_GRID, build_head
from heads.meanflow import MEANFLOW_ADAPTIVE_EPS, adaptive_weighted, draw_flow_map_times
from heads.path import draw_times, interpolate, segment_loss
from vae.files import load_state_strict, read_torch_state_dict
from vae.protocol import mean_latents
from vae.pyramid import area_pyramid, check_scale_list, grid_shape, next_scale_input, token_count

from .attention import ScaleBlock, block_causal_mask, scale_segments
from .config import FlowARConfig, FlowARSampling, get_preset
from .sampling import CachedStepper, Known, generate
from .scalewise import ScaleWiseModel

MODEL_TYPE = "flowar"


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major: one token per latent pixel."""
    return latent.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, side) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) for a grid given as its side (h = w) or as (h, w)."""
    return tokens.transpose(1, 2).unflatten(2, grid_shape(side))


def sincos_grid(width: int, side: int) -> torch.Tensor:
    """(1, width, side, side) 2-D sine-cosine positions: half the channels for the row, half for the column."""
    if width % 4:
        raise ValueError(f"positions='grid' needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.arange(side, dtype=torch.float64)[:, None] * omega  # (side, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, width / 2)
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).permute(2, 0, 1)[None].float()


def check_finite_latents(latents: torch.Tensor, name: str = "latents") -> None:
    """Refuse NaN or infinite latents before they reach a loss. On the CPU a ValueError names them; on an
    accelerator the check is an asynchronous device assert, since a Python-side test would wait for the device
    at every training step."""
    finite = torch.isfinite(latents).all()
    message = f"{name} must be finite: they hold NaN or infinite values (a corrupt image, latent cache or VAE?)"
    if latents.device.type == "cpu":
        if not finite:
            raise ValueError(message)
    else:
        torch._assert_async(finite, message)


class ScaleInput(NamedTuple):
    """What a FlowAR canvas hands the next scale."""

    tokens: torch.Tensor  # (B, s*s, C): the previous scale's result upsampled to this scale, the transformer's input
    previous: torch.Tensor | None = None  # (B, s'*s', C): that result itself, where a multistage stage starts from


@dataclass
class FlowAROutput:
    """Training loss: the scale-weighted total and the unweighted flow loss of each scale."""

    loss: torch.Tensor
    loss_per_scale: torch.Tensor  # (K,), detached


@dataclass
class SampleOutput:
    """Sampled latents with the head-evaluation counts that produced them."""

    latents: torch.Tensor  # (B, C, S, S), in the VAE's scaled latent space
    nfe_per_scale: list[int] = field(default_factory=list)
    head_rows: int = 0  # token rows evaluated by the head, summed over evaluations (CFG doubles rows)

    @property
    def nfe(self) -> int:
        return sum(self.nfe_per_scale)

    @property
    def decoder_input(self) -> torch.Tensor:
        """What the VAE decodes."""
        return self.latents

    @property
    def latent_output(self) -> torch.Tensor:
        """What a pipeline returns for ``output_type="latent"``."""
        return self.latents


class FlowAR(ScaleWiseModel):
    """Scale-wise autoregressive generator over continuous latent tokens (Ren et al., 2025)."""

    model_type = MODEL_TYPE
    config_class = FlowARConfig
    sampling_class = FlowARSampling
    interchangeable_fields = ("scales", "token_dim", "num_classes", "flow", "stage_times")
    training_data = "latents"

    def __init__(self, config: FlowARConfig):
        super().__init__()
        self.config = config
        c = config
        width = c.width
        self.class_emb = nn.Embedding(c.num_classes + 1, width)  # last id is the null class
        self.z_proj = nn.Linear(c.token_dim, width)
        self.z_proj_ln = RMSNorm(width, weight=True)
        self.position_tables = ("encoder", "decoder", "diffusion")
        self._add_position_table("encoder")

        def blocks(depth):
            return nn.ModuleList(
                ScaleBlock(width, c.num_heads, mlp_ratio=c.mlp_ratio, rope_grid=ROPE_GRID,
                           attn_drop=c.attn_dropout, proj_drop=c.proj_dropout)
                for _ in range(depth)
            )

        self.encoder_blocks = blocks(c.encoder_depth)
        self.encoder_norm = RMSNorm(width, weight=True)
        self.decoder_embed = nn.Linear(width, width)
        self._add_position_table("decoder")
        self.decoder_blocks = blocks(c.decoder_depth)
        self.decoder_norm = RMSNorm(width, weight=True)
        self._add_position_table("diffusion")
        # The MeanFlow target differentiates the head in t, which the released head's integer timesteps would zero.
        self.flownet = build_head(c.head, token_dim=c.token_dim, width=c.head_width, cond_dim=width, depth=c.head_depth,
                                  flow_map=c.flow_map, quantize_time=False if c.objective == "mean-flow" else None)
        self.initialize_weights()

    def _add_position_table(self, name: str) -> None:
        """Register position table ``name`` where the released model has it (parameter order is what an
        optimizer's saved state is indexed by)."""
        c = self.config
        if c.positions == "sequence":  # the released layout: one learned vector per token of the fixed scales
            setattr(self, f"{name}_pos_embed_learned", nn.Parameter(torch.zeros(1, c.seq_len, c.width)))
        else:  # one learned side x side table, resized to every scale (positions="grid")
            setattr(self, f"{name}_pos_grid", nn.Parameter(torch.zeros(1, c.width, c.scales[-1], c.scales[-1])))

    def initialize_weights(self):
        nn.init.normal_(self.class_emb.weight, std=0.02)
        for name in self.position_tables:
            if self.config.positions == "sequence":
                nn.init.normal_(getattr(self, f"{name}_pos_embed_learned"), std=0.02)
            else:  # smooth, so that a table resized to a side it was not trained at still varies smoothly
                with torch.no_grad():
                    getattr(self, f"{name}_pos_grid").copy_(0.02 * sincos_grid(self.config.width, self.config.scales[-1]))
        # As in the released code, xavier-uniform covers every Linear, the head's included: the head's
        # own zero-initialised output layer is overwritten too. Training from scratch matches theirs.
        xavier_init_linears(self)

    @property
    def num_layers(self) -> int:
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    # ------------------------------------------------------------------ transformer
    def _rope(self, sides, device):
        return self.encoder_blocks[0].attn.rope.tables(tuple(sides), device)

    def _run_blocks(self, blocks, x, class_embedding, rope_cos, rope_sin, *, segments, cache, layer_offset):
        for i, block in enumerate(blocks):
            if self.config.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, class_embedding, rope_cos, rope_sin, segments=segments, use_reentrant=False
                )
            else:
                x = block(x, class_embedding, rope_cos, rope_sin, segments=segments, cache=cache,
                          layer=layer_offset + i)
        return x

    def transformer(self, tokens, class_embedding, *, sides=None, cache=None):
        """Per-token head conditions z (B, n, D) from input tokens (B, n, D).

        Without a cache, ``tokens`` holds the scales ``sides`` (default: all), from the first on, and
        attention is block-causal. With a cache, ``tokens`` is the one next scale, of side ``sides[0]``.
        """
        sides = tuple(self.config.scales if sides is None else sides)
        start = 0 if cache is None else cache.length
        positions = slice(start, start + tokens.shape[1])
        segments = scale_segments(sides)
        rope_cos, rope_sin = self._rope(sides, tokens.device)
        x = self.z_proj_ln(tokens + self.position_embedding("encoder", sides, positions))
        x = self._run_blocks(self.encoder_blocks, x, class_embedding, rope_cos, rope_sin,
                             segments=segments, cache=cache, layer_offset=0)
        x = self.decoder_embed(self.encoder_norm(x))
        x = x + self.position_embedding("decoder", sides, positions)
        x = self._run_blocks(self.decoder_blocks, x, class_embedding, rope_cos, rope_sin,
                             segments=segments, cache=cache, layer_offset=len(self.encoder_blocks))
        if cache is not None:
            cache.length = positions.stop
        return self.decoder_norm(x) + self.position_embedding("diffusion", sides, positions)

    def position_embedding(self, name: str, sides, positions: slice) -> torch.Tensor:
        """(1, n, D) position embeddings of table ``name`` for the tokens at ``positions`` of the run's sequence
        (positions="sequence"), or for the scales ``sides`` (positions="grid": the table area-resized to each
        side or (height, width) grid, bicubic where the grid is higher or wider than the trained one)."""
        if self.config.positions == "sequence":
            return getattr(self, f"{name}_pos_embed_learned")[:, positions]
        table = getattr(self, f"{name}_pos_grid")
        full = table.shape[-1]
        shapes = [grid_shape(side) for side in sides]
        resized = [table if shape == (full, full) else
                   F.interpolate(table, size=shape, mode="area" if max(shape) <= full else "bicubic")
                   for shape in shapes]
        return torch.cat([to_tokens(r) for r in resized], dim=1)

    # ------------------------------------------------------------------ inputs and labels
    def _check_latents(self, latents: torch.Tensor):
        side, channels = self.config.scales[-1], self.config.token_dim
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (channels, side, side):
            raise ValueError(
                f"latents must be (B, {channels}, {side}, {side}) for this model "
                f"(token_dim={channels}, scales={self.config.scales}), got {tuple(latents.shape)}"
            )

    def input_tokens(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced input tokens for scales 2..K from each scale's map (the targets; a multistage flow's
        stage ends), (B, L-1, C)."""
        full_side = pyramid[-1].shape[-1]
        inputs = [
            to_tokens(next_scale_input(target, full_side=full_side, next_side=following.shape[-1]))
            for target, following in zip(pyramid[:-1], pyramid[1:])
        ]
        return torch.cat(inputs, dim=1)

    # ------------------------------------------------------------------ training
    def draw_scale_list(self, generator=None) -> tuple[int, ...]:
        """A training step's scales under ``scale_lists="random"``: the config's own with probability
        ``fixed_list_share``, else 1, then k sides drawn without replacement from 2 .. S-1 (k uniform in
        1 .. min(S - 2, K) for the config's K scales and latent side S), then S. Each list is a way through the
        pyramid that sampling may take; the heads of every side in between train."""
        c = self.config
        full = c.scales[-1]
        if full <= 2:
            return c.scales
        device = generator.device if generator is not None else "cpu"
        if float(torch.rand((), generator=generator, device=device)) < c.fixed_list_share:
            return c.scales
        count = int(torch.randint(1, min(full - 2, len(c.scales)) + 1, (), generator=generator, device=device))
        interior = torch.randperm(full - 2, generator=generator, device=device)[:count] + 2
        return (1, *sorted(int(v) for v in interior), full)

    def draw_randomness(self, batch_size: int, *, generator=None, device=None, scales=None) -> dict:
        """Every random draw of one training forward, per image (leading dim ``batch_size``).

        A trainer draws these for the global batch and hands each process its rows, so a run gives the
        same result however it is split over processes and accumulation steps. With ``head_batch_mul`` m > 1
        each scale's times are (B, m) and its noise (B, m, s*s, C); with ``context_noise`` the draws add each
        coarser scale's context level (B,) and noise (B, s*s, C); with ``objective="mean-flow"``, each scale's
        times are the (r, t) pairs of the average velocity, ``flow_ends`` and ``flow_times``. With
        ``scale_lists="random"`` the step's list of sides is drawn first (``scales``, shared by every row; or the
        list given) and the other draws follow its sides.
        """
        c = self.config
        device = self.class_emb.weight.device if device is None else device
        sides = c.scales
        if scales is not None:
            sides = tuple(scales)
        elif c.scale_lists == "random":
            sides = self.draw_scale_list(generator)
        m = c.head_batch_mul

        def rand(*shape):
            return torch.rand(shape, generator=generator, device=device)

        def randn(*shape):
            return torch.randn(shape, generator=generator, device=device)

        def times(span):
            drawn = draw_times(batch_size * m, span, generator=generator, device=device, **self._time_law())
            return drawn if m == 1 else drawn.reshape(batch_size, m)

        def flow_map_times():
            drawn = draw_flow_map_times(batch_size * m, generator=generator, device=device,
                                        share_equal=c.mean_flow_share_equal, logit_mean=c.mean_flow_logit_mean,
                                        logit_std=c.mean_flow_logit_std)
            return drawn if m == 1 else tuple(d.reshape(batch_size, m) for d in drawn)

        if c.objective == "mean-flow":  # each scale's (r, t): the jump's end and start
            ends, starts = zip(*(flow_map_times() for _ in sides))
            draws = {"drop_mask": rand(batch_size) < c.label_drop, "flow_times": list(starts),
                     "flow_ends": list(ends)}
        else:
            draws = {"drop_mask": rand(batch_size) < c.label_drop,
                     "flow_times": [times(span) for span in c.spans_for(sides)]}
        draws["flow_noise"] = [randn(batch_size, s * s, c.token_dim) if m == 1
                               else randn(batch_size, m, s * s, c.token_dim) for s in sides]
        if c.context_noise:
            draws["context_levels"] = [c.context_noise * rand(batch_size) for _ in sides[:-1]]
            draws["context_noise"] = [randn(batch_size, s * s, c.token_dim) for s in sides[:-1]]
        if c.scale_lists == "random":
            draws["scales"] = sides  # a tuple: one list for the whole batch, not a row each
        return draws

    def _time_law(self) -> dict:
        c = self.config
        return {"distribution": c.time_distribution, "logit_mean": c.time_logit_mean, "logit_std": c.time_logit_std}

    def forward(self, latents, class_labels=None, *, generator=None, drop_mask=None, flow_times=None,
                flow_noise=None, flow_ends=None, context_levels=None, context_noise=None, scales=None):
        """Training loss of a batch of scaled VAE latents (B, C, S, S): flow matching, or with
        ``objective="mean-flow"`` the MeanFlow loss of a flow-map head (``heads.meanflow``).

        Every random number of the step comes from :meth:`draw_randomness`: ``drop_mask`` (B,) (in training
        mode a share ``label_drop`` of the labels becomes the null class), ``flow_times`` and ``flow_noise``
        (per scale; with ``objective="mean-flow"`` also ``flow_ends``, each scale's r <= t of the average
        velocity), and with ``context_noise`` on, ``context_levels`` / ``context_noise`` (per coarser scale).
        A trainer passes what it drew for its rows of the global batch; whatever is not given is drawn here
        with ``generator``, by that one method. ``scales``: the step's sides (``scale_lists="random"``; default:
        the config's, or a list drawn with the rest). A multistage flow trains each scale on its stage
        (``heads.multistage``): its transformer sees the previous stage's noisy end, and ``flow_noise[k]`` is
        the noise of scale k's jump.
        """
        self._check_latents(latents)
        check_finite_latents(latents)
        labels = self.check_labels(class_labels, latents.shape[0]).to(latents.device)
        c = self.config
        given = {"drop_mask": drop_mask, "flow_times": flow_times, "flow_noise": flow_noise}
        if c.context_noise:
            given.update(context_levels=context_levels, context_noise=context_noise)
        if c.objective == "mean-flow":
            given["flow_ends"] = flow_ends
        if scales is not None and c.scale_lists != "random" and tuple(scales) != c.scales:
            raise ValueError(f"scales {list(scales)}: this model trains on its own scales {list(c.scales)} "
                             "(scale_lists='fixed')")
        if any(v is None for v in given.values()):
            drawn = self.draw_randomness(latents.shape[0], generator=generator, device=latents.device, scales=scales)
            given = {k: drawn[k] if v is None else v for k, v in given.items()}
            scales = drawn.get("scales", scales)
        sides = c.scales if scales is None else check_scale_list(scales)
        if sides[-1] != c.scales[-1]:
            raise ValueError(f"scales {list(sides)} must end at the latent's side {c.scales[-1]}")
        if self.training and c.label_drop > 0 and not c.unconditional:
            labels = torch.where(given["drop_mask"].to(labels.device), torch.full_like(labels, self.null_class), labels)
        pyramid = area_pyramid(latents, sides)
        class_embedding = self.class_emb(labels)  # (B, D)
        if c.flow == "multistage":
            return self._multistage_loss(pyramid, class_embedding, given["flow_times"], given["flow_noise"])
        context = pyramid[:-1]
        if c.context_noise:
            context = [interpolate(x, from_tokens(eps.to(x), x.shape[-1]), level.to(x))
                       for x, level, eps in zip(context, given["context_levels"], given["context_noise"])]
        tokens = torch.cat([class_embedding[:, None], self.z_proj(self.input_tokens([*context, pyramid[-1]]))], dim=1)
        z = self.transformer(tokens, class_embedding, sides=sides)  # (B, L, D)

        losses = []
        for k, ((start, end), target) in enumerate(zip(scale_segments(sides), pyramid)):
            x, cond = to_tokens(target), z[:, start:end]
            t, noise = given["flow_times"][k], given["flow_noise"][k]
            r = given["flow_ends"][k] if c.objective == "mean-flow" else None
            if c.head_batch_mul > 1:  # each token's condition, m times, with its own times and noise
                m = c.head_batch_mul
                x, cond = x.repeat_interleave(m, dim=0), cond.repeat_interleave(m, dim=0)
                t, noise = t.reshape(-1), noise.reshape(-1, *noise.shape[2:])
                r = None if r is None else r.reshape(-1)
            if r is None:
                per_image = self.flownet.loss(x, cond, t=t, noise=noise)
            else:
                per_image = adaptive_weighted(self.flownet.flow_map_loss(x, cond, r=r, t=t, noise=noise),
                                              power=c.mean_flow_adaptive_power, eps=MEANFLOW_ADAPTIVE_EPS)
            losses.append(per_image.mean())
        return self._weighted(losses, sides)

    def _multistage_loss(self, pyramid, class_embedding, flow_times, flow_noise) -> FlowAROutput:
        c = self.config
        xis = [from_tokens(n.to(pyramid[0]), side) for n, side in zip(flow_noise, c.scales)]
        stages = training_stages(pyramid, xis, c.stage_times)
        ends = [end for _, end in stages]
        tokens = torch.cat([class_embedding[:, None], self.z_proj(self.input_tokens(ends))], dim=1)
        z = self.transformer(tokens, class_embedding)
        losses = [
            segment_loss(self.flownet, to_tokens(start), to_tokens(end), z[:, first:last], t=flow_times[k],
                         span=c.stage_times[k]).mean()
            for k, ((first, last), (start, end)) in enumerate(zip(scale_segments(c.scales), stages))
        ]
        return self._weighted(losses, c.scales)

    def _weighted(self, losses: list[torch.Tensor], sides) -> FlowAROutput:
        """The scales' losses added up by ``scale_weights``: by default the released weighting, each scale's loss
        times its share of the last scale's tokens."""
        losses = torch.stack(losses)
        if self.config.scale_weights == "equal":
            weights = torch.ones_like(losses)
        else:
            total = sides[-1] ** 2
            weights = torch.tensor([s * s / total for s in sides], device=losses.device, dtype=losses.dtype)
        return FlowAROutput(loss=(losses * weights).sum(), loss_per_scale=losses.detach())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, class_labels=None, **kwargs) -> torch.Tensor:
        """Sample latents (B, C, S, S); see :meth:`sample_with_stats` for the options."""
        return self.sample_with_stats(class_labels, **kwargs).latents

    @torch.no_grad()
    def sample_with_stats(self, class_labels=None, *, batch_size: int | None = None,
                          sampling: FlowARSampling | None = None, generator: torch.Generator | None = None,
                          noise: list[torch.Tensor] | None = None, progress: bool = False, **options) -> SampleOutput:
        """Generate scale by scale: one cached transformer pass, then the head's ODE solve, per scale.

        sampling: a :class:`~flowar.config.FlowARSampling` (None: the config's saved defaults), updated by
        ``options``, its field names (guidance_scale, cfg_schedule, guidance_interval, solver, steps,
        schedule, atol, rtol). noise: the initial noise per scale, (B, s*s, C) each, instead of drawing it
        from ``generator``.
        """
        return generate(self, class_labels, batch_size=batch_size, sampling=sampling, generator=generator,
                        noise=noise, progress=progress, **options)

    def sampling_hot_modules(self) -> list[nn.Module]:
        # The head runs steps x scales times per image (about 90% of FlowAR-S's sampling FLOPs); each block's MLP
        # is most of the transformer's share.
        return [self.flownet, *(block.mlp for block in (*self.encoder_blocks, *self.decoder_blocks))]

    def stepper(self, labels: torch.Tensor, options: FlowARSampling, *, timed: bool = False) -> "FlowARStepper":
        return FlowARStepper(self, labels, options, timed=timed)

    def canvas(self, batch: int, autoencoder=None, options=None) -> "FlowARCanvas":
        return FlowARCanvas(self.config.scales if options is None else self.sampled_scales(options))

    def sampled_scales(self, options: FlowARSampling) -> tuple[int, ...]:
        return options.scales_for(self.config)

    def check_noise(self, noise: list[torch.Tensor], batch: int, options=None) -> None:
        c = self.config
        sides = c.scales if options is None else self.sampled_scales(options)
        expected = [(batch, token_count(s), c.token_dim) for s in sides]
        if (not isinstance(noise, (list, tuple)) or len(noise) != len(sides)
                or any(not torch.is_tensor(n) or tuple(n.shape) != e for n, e in zip(noise, expected))):
            raise ValueError(f"noise must be a list of tensors of shapes {expected}, got "
                             f"{[tuple(getattr(n, 'shape', ())) for n in noise] if isinstance(noise, (list, tuple)) else type(noise).__name__}")
        if not all(torch.isfinite(n).all() for n in noise):
            raise ValueError("noise must be finite: it holds NaN or infinite values")

    def noise_from_seeds(self, seeds: list[int], options=None) -> list[torch.Tensor]:
        """FlowAR's initial noise, one (B, h*w, C) float32 CPU tensor per sampled scale, row b drawn from seeds[b]."""
        c = self.config
        sides = c.scales if options is None else self.sampled_scales(options)
        per_sample = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            per_sample.append([torch.randn((token_count(side), c.token_dim), generator=g) for side in sides])
        return [torch.stack([noise[k] for noise in per_sample]) for k in range(len(sides))]

    def known_regions(self, autoencoder, images: torch.Tensor, keep: list[torch.Tensor]) -> list[Known]:
        """Each scale's known tokens: the image's latent (the posterior mean where the VAE has one) area-pooled
        to every scale, as the training targets are."""
        latents = mean_latents(autoencoder, images)
        self._check_latents(latents)
        if self.config.flow != "full":
            raise ValueError(f"editing needs a model with flow='full' (this one's flow is {self.config.flow!r}): "
                             "known regions are held on the full path")
        pyramid = area_pyramid(latents.to(self.device, torch.float32), self.config.scales)
        return [(to_tokens(m.to(self.device)[:, None]), to_tokens(target)) for m, target in zip(keep, pyramid)]

    # ------------------------------------------------------------------ training data
    def check_training_source(self, source) -> None:
        self.check_source_shape(source, self.config.token_dim, data="latents", fields="model.token_dim / model.scales")

    def training_inputs(self, autoencoder) -> dict:
        return {}  # the latents are the whole input

    # ------------------------------------------------------------------ files
    @classmethod
    def from_released(cls, path, preset: str | FlowARConfig, *, map_location="cpu") -> "FlowAR":
        """Load ``FlowAR-{S,L,H}.pth`` (a bare EMA state dict with the authors' key names) into ``preset``, a
        preset name or a :class:`FlowARConfig` for checkpoints of other sizes. Read with ``weights_only``."""
        config = preset if isinstance(preset, FlowARConfig) else get_preset(preset)
        state = convert_released_state_dict(read_torch_state_dict(path, map_location=map_location), config)
        model = cls(config)
        load_state_strict(model, state, source=f"checkpoint {path} (preset {preset!r})")
        return model.eval()


class FlowARStepper(CachedStepper):
    """FlowAR's per-scale step (``flowar.sampling.Stepper``): a cached transformer pass, then the head's solve.
    Under guidance the head evaluates the null rows only inside the guidance interval."""

    z = None  # head conditions of the last scale fed, (rows, s*s, D)
    previous = None  # the result of the scale before the one fed last, (B, s'*s', C) (a ScaleInput's)

    def release(self) -> None:
        self.cache = self.z = self.previous = None

    def _first_pass(self, prefill: bool) -> None:
        self.class_embedding = self.model.class_emb(self.labels)
        self._run(self.class_embedding[:, None], 0)  # the first scale's input is the class token

    def _pass(self, scale_input: ScaleInput, k: int, prefill: bool) -> None:
        tokens = scale_input.tokens
        self.previous = scale_input.previous
        self._run(self.model.z_proj(torch.cat([tokens, tokens]) if self.guided else tokens), k)

    def _run(self, tokens: torch.Tensor, k: int) -> None:
        self.z = self.model.transformer(tokens, self.class_embedding, sides=(self.sides[k],), cache=self.cache)

    @torch.no_grad()
    def draw(self, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             known: Known | None = None) -> FlowSample:
        """Solve the head's ODE for the scale fed last, from ``noise`` (B, s*s, C) or noise drawn from
        ``generator``; ``known`` holds part of it on the target's path (see ``heads.flow.KnownRegionNet``).
        A multistage stage after the first starts from the previous result re-noised with that noise
        (``heads.multistage.renoise``) and integrates only its span."""
        o, c, k = self.options, self.model.config, self.scales_seen - 1
        side, span = self.sides[k], c.spans_for(self.sides)[k]
        with self.timer:
            if noise is not None:
                x_init = noise.to(device=self.device, dtype=torch.float32)
            else:
                x_init = torch.randn((self.batch, token_count(side), c.token_dim), generator=generator,
                                     device=self.device)
            if c.flow == "multistage" and k > 0:
                previous = from_tokens(self.previous.float(), self.sides[k - 1])
                x_init = to_tokens(renoise(previous, from_tokens(x_init, side), previous_end=c.spans[k - 1][1],
                                           start=span[0]))
            z = self.z
            guidance = o.guidance_at(k, len(self.sides), z[self.batch:].float()) if self.guided else None
            flow = self.model.flownet.sample(x_init, z[:self.batch].float(), o.solve_at(k), guidance=guidance,
                                             known=known, span=span, grid=grid_shape(side))
        self.counts.nfe += flow.nfe
        self.counts.head_rows += flow.rows
        return flow


class FlowARCanvas:
    """A FlowAR run's result (``flowar.sampling.Canvas``): each scale's tokens, and the next scale's input made
    from them (upsampled to the next side as in training)."""

    def __init__(self, sides: tuple[int, ...]):
        self.sides = sides  # the run's scales
        self.out = SampleOutput(latents=None)
        self.last = None

    def add(self, k: int, flow: FlowSample) -> ScaleInput | None:
        sides = self.sides
        self.out.nfe_per_scale.append(flow.nfe)
        self.out.head_rows += flow.rows
        self.last = flow.x.float()  # (B, s*s, C)
        if k + 1 == len(sides):
            return None
        upsampled = next_scale_input(from_tokens(self.last, sides[k]), full_side=sides[-1], next_side=sides[k + 1])
        return ScaleInput(to_tokens(upsampled), self.last)

    def output(self) -> SampleOutput:
        self.out.latents = from_tokens(self.last, self.sides[-1])
        return self.out


# ---------------------------------------------------------------------------------------- released files
# Keys of the released state dicts that we do not keep as state: the dense float block-causal mask
# (ours is implied by the scale segments, see attention.block_causal_attention).
RELEASED_ONLY_KEYS = ("mask",)


def convert_released_state_dict(state: dict, config: FlowARConfig) -> dict:
    """Authors' key layout -> ours. Names are shared; only the dense mask buffer is dropped (after a check)."""
    state = dict(state)
    mask = state.pop("mask", None)
    expected = block_causal_mask(config.scales)
    # A mask of another size goes with mis-shaped position embeddings, which the key check reports.
    if mask is not None and mask.shape[-2:] == expected.shape:
        if not torch.equal(torch.isfinite(mask.reshape(expected.shape)), expected):
            raise ValueError(
                f"checkpoint mask {tuple(mask.shape)} is not the block-causal mask of scales {config.scales}"
            )
    return state
