"""xAR: next-cell prediction with noisy context (Ren et al., 2025, "Beyond Next-Token: Next-X Prediction for
Autoregressive Visual Generation").

The latent (B, C, S, S) is cut into K square cells of c x c tokens (the released X: four 8x8 cells of a 16x16
latent), taken in row-major order with the tokens row-major inside each cell (:func:`to_cells`). There is no
separate head: one transformer predicts the flow velocity of every token of a cell from its noisy tokens and
the cells before it. Each cell carries its own time; its blocks are modulated (adaLN) by the class embedding plus
the embedding of int(1000 t) of that cell.

Training (noisy context learning): every cell gets its own time t ~ logit-normal and its own noise, all K noisy
cells go through one block-causal pass (cell k sees cells 0..k), and the loss is the squared error of the
velocity ``eps - x`` (``heads.path``'s convention) over every token. The model never sees a clean context.

Sampling, cell by cell through the engine (``flowar.sampling``): before cell k > 0 the clean cell k - 1 is fed
once at t = 0 and its keys and values stay in the KV cache (the stepper's ``feed``); the cell's flow is then
integrated with the transformer itself as the velocity, every evaluation reading the cache and storing nothing
(``draw``): by default the released Euler-Maruyama SDE (:func:`euler_maruyama`), an ODE solver of
``heads.solvers`` as an option. Guidance ramps per cell. Beyond the release: a step count per cell, a guidance
interval in time (outside it the null rows do not run), and editing (the known tokens of a cell held on their
straight path while it is integrated; ``flowar.editing``).

Parameter names are the released ones (``class_emb``, ``time_embed.mlp``, ``z_proj``, ``z_proj_ln``,
``encoder_pos_embed_learned``, ``encoder_blocks.{i}``, ``decoder_*``, ``pred``), so ``xAR-{B,L,H}.pth`` loads after
the dense mask and the RoPE tables are checked and dropped (:func:`convert_released_xar_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from heads.flow import FlowSample, KnownRegionNet
from heads.layers import RMSNorm, Rope2D, xavier_init_linears
from heads.networks import TimestepEmbedder
from heads.path import draw_times, interpolate, velocity_target
from heads.solvers import integrate
from vae.files import load_state_strict, read_torch_state_dict
from vae.protocol import mean_latents
from vae.pyramid import scale_masks

from .attention import ScaleBlock
from .model import SampleOutput, check_finite_latents
from .sampling import CachedStepper, Known, generate
from .scalewise import ScaleWiseModel
from .xar_config import XARConfig, XARSampling, get_xar_preset

MODEL_TYPE = "xar"
# The released sampler's last noisy time: its SDE runs from 1 down to SDE_END, then one deterministic step to 0.
SDE_END = 0.04


def to_cells(latent: torch.Tensor, cell_side: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, S*S, C): cell after cell in row-major order, each cell's tokens row-major."""
    batch, channels, side, _ = latent.shape
    per_side = side // cell_side
    cells = latent.reshape(batch, channels, per_side, cell_side, per_side, cell_side)
    return cells.permute(0, 2, 4, 3, 5, 1).reshape(batch, side * side, channels)


def from_cells(tokens: torch.Tensor, latent_side: int, cell_side: int) -> torch.Tensor:
    """The inverse of :func:`to_cells`: (B, S*S, C) -> (B, C, S, S)."""
    batch, _, channels = tokens.shape
    per_side = latent_side // cell_side
    cells = tokens.reshape(batch, per_side, per_side, cell_side, cell_side, channels)
    return cells.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, latent_side, latent_side)


def cell_rope_tables(rope: Rope2D, latent_side: int, cell_side: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-style 2-D RoPE cos and sin (S*S, head_dim) of the S x S latent's token positions, in cell order.

    ``rope`` must have grid = S, so that the positions are the integers 0..S-1 of the whole latent, as in the
    released model (which builds its 16 x 16 table row-major and then reorders it into its four cells)."""
    cos, sin = rope.tables((latent_side,), device)  # row-major (S*S, head_dim)

    def reorder(table):
        grid = table.T.reshape(1, table.shape[1], latent_side, latent_side)
        return to_cells(grid, cell_side)[0]

    return reorder(cos), reorder(sin)


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The reverse SDE's drift ``v - (g^2 / 2) score`` with diffusion g^2 = 2t, from the velocity v at x_t.

    On the straight path x_t = (1 - t) x + t eps, the score is -E[eps | x_t] / t and E[eps | x_t] = x_t + (1 - t) v,
    so the drift is v + x_t + (1 - t) v."""
    score = -(x + (1 - t) * v) / t
    return v - t * score


def sde_grid(steps: int, *, device=None) -> torch.Tensor:
    """The released grid: ``steps`` times from 1 to SDE_END (float64), then 0."""
    return torch.cat([torch.linspace(1.0, SDE_END, steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)]).to(device)


def euler_maruyama(velocity, normal, steps: int, *, hold=None) -> tuple[torch.Tensor, int]:
    """The released sampler of one cell: Euler-Maruyama on :func:`sde_grid`, returns (x at t = 0 in float64, the
    number of velocity calls = ``steps``).

    velocity(x_t (float64), t (0-dim float64)) -> v. normal(i) gives the i-th standard normal draw of the cell,
    the shape of x: 0 is the initial state at t = 1, i >= 1 the noise of stochastic step i. Each of the
    ``steps - 1`` steps from t to t' < t moves x by ``drift dt + sqrt(2t) sqrt(|dt|) normal`` (dt = t' - t); the
    last, from SDE_END to 0, by the drift alone, so the result is that step's mean.
    hold(x, t) -> x (editing): applied to the state at every time of the grid it reaches, the start and the end
    included, so that the velocity always sees it and the result is its value at t = 0 (known tokens put on
    their path).
    """
    first = normal(0)
    grid = sde_grid(steps, device=first.device)
    x = first.to(torch.float64)
    if hold is not None:
        x = hold(x, grid[0])
    for i in range(steps - 1):
        t, dt = grid[i], grid[i + 1] - grid[i]
        noise = normal(i + 1).to(torch.float64) * dt.abs().sqrt()
        x = x + sde_drift(velocity(x, t), x, t) * dt + (2 * t).sqrt() * noise
        if hold is not None:
            x = hold(x, grid[i + 1])
    t = grid[-2]
    x = x + sde_drift(velocity(x, t), x, t) * (grid[-1] - t)
    return (x if hold is None else hold(x, grid[-1])), steps


def evaluation_times(options: XARSampling, k: int) -> list[float] | None:
    """The times (the solver's float64 values) at which cell k's solve evaluates the velocity, in order; None for
    the adaptive solver, whose times depend on the cell's state. A fixed grid's times do not depend on the state,
    so a solve of a zero velocity on one number gives them exactly."""
    if options.solver == "sde":
        steps = options.steps_at(k)
        return sde_grid(steps)[:steps].tolist()
    solve = options.solve_at(k)
    if solve.adaptive:
        return None
    times = []

    def record(x, t):
        times.append(float(t.reshape(-1)[0]))
        return torch.zeros_like(x)

    integrate(record, torch.zeros(1, 1, 1), solve)
    return times


@dataclass
class XAROutput:
    """Training loss: the mean over every token of every cell, and each cell's mean (the engine's "scales")."""

    loss: torch.Tensor
    loss_per_scale: torch.Tensor  # (K,), detached, cell by cell


class XARBlock(ScaleBlock):
    """FlowAR's block (RMSNorm, adaLN, 2-D RoPE attention, gated GELU MLP) modulated per cell: the tokens of
    each cell get the shifts, scales and gates of that cell's condition."""

    def forward(self, x, conditions, rope_cos, rope_sin, *, segments=None, cache=None, layer=0):
        """x (B, n, D) holding m whole cells; conditions (B, m, D), one per cell."""
        rows, length, dim = x.shape
        cells = conditions.shape[1]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = \
            self.ada_lin(conditions).view(rows, cells, 1, 6, dim).unbind(3)  # each (B, m, 1, D)

        def per_cell(tokens):
            return tokens.view(rows, cells, length // cells, dim)

        h = (per_cell(self.norm1(x)) * (1 + scale1) + shift1).view(rows, length, dim)
        h = self.attn(h, rope_cos, rope_sin, segments=segments, cache=cache, layer=layer)
        x = x + (per_cell(h) * gamma1).view(rows, length, dim)
        h = (per_cell(self.norm2(x)) * (1 + scale2) + shift2).view(rows, length, dim)
        return x + (per_cell(self.mlp(h)) * gamma2).view(rows, length, dim)


class XAR(ScaleWiseModel):
    """Class-conditional next-cell prediction of continuous latent tokens with a flow-matching transformer."""

    model_type = MODEL_TYPE
    config_class = XARConfig
    sampling_class = XARSampling
    interchangeable_fields = ("latent_side", "cell_side", "token_dim", "num_classes")
    training_data = "latents"

    def __init__(self, config: XARConfig):
        super().__init__()
        self.config = c = config
        self.class_emb = nn.Embedding(c.num_classes + 1, c.width)  # last id is the null class
        self.time_embed = TimestepEmbedder(c.width)  # of int(1000 t), as released
        self.z_proj = nn.Linear(c.token_dim, c.width)
        self.z_proj_ln = RMSNorm(c.width, weight=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.width))  # in cell order
        self.encoder_blocks = self._blocks(c.encoder_depth)
        self.encoder_norm = RMSNorm(c.width, weight=True)
        self.decoder_embed = nn.Linear(c.width, c.width)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.width))
        self.decoder_blocks = self._blocks(c.decoder_depth)
        self.decoder_norm = RMSNorm(c.width, weight=True)
        self.pred = nn.Linear(c.width, c.token_dim)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialize_weights()

    def _blocks(self, depth: int) -> nn.ModuleList:
        c = self.config
        # grid = S: RoPE positions are the integer coordinates of the whole latent.
        return nn.ModuleList(XARBlock(c.width, c.num_heads, mlp_ratio=c.mlp_ratio, rope_grid=c.latent_side,
                                      attn_drop=c.attn_dropout, proj_drop=c.proj_dropout) for _ in range(depth))

    def initialize_weights(self) -> None:
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.encoder_pos_embed_learned, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        xavier_init_linears(self)  # every Linear, the adaLN and time MLPs included, as released

    @property
    def num_layers(self) -> int:
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell-ordered RoPE cos and sin (S*S, head_dim) on ``device``."""
        key = str(device)
        if key not in self._rope:
            c = self.config
            self._rope[key] = cell_rope_tables(self.encoder_blocks[0].attn.rope, c.latent_side, c.cell_side, device)
        return self._rope[key]

    # ------------------------------------------------------------------ transformer
    def cell_conditions(self, class_embedding: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Per-cell conditions (B, m, D): the class embedding (B, D) plus the time embedding of each cell's time,
        ``times`` (B, m), or (1, m) shared by every row. The network sees int(1000 t) of the float32 t, as released
        (float64 times are cast first)."""
        rows, cells = times.shape
        embedded = self.time_embed(times.reshape(-1).to(torch.float32)).view(rows, cells, -1)
        return class_embedding[:, None] + embedded

    def run_cells(self, tokens: torch.Tensor, conditions: torch.Tensor, *, first_cell: int = 0, cache=None,
                  store: bool = False) -> torch.Tensor:
        """The predicted velocities (B, n, C) of ``tokens`` (B, n, C): m = conditions.shape[1] whole cells, from
        cell ``first_cell`` on, each under its condition (B, m, D).

        Without a cache the cells attend block-causally among themselves (cell i sees the given cells up to i):
        all K cells from 0 is the training pass. With a cache (``flowar.attention.KVCache``) ``tokens`` is the one
        cell after the cached ones, and it sees them and itself; ``store`` keeps its keys and values (a clean
        context cell), otherwise the cache's length is unchanged and the next call overwrites them (an evaluation
        of the cell being sampled).
        """
        c = self.config
        per_cell = c.cell_tokens
        cells = conditions.shape[1]
        if tokens.shape[1] != cells * per_cell or (cache is not None and cells != 1):
            raise ValueError(f"tokens must hold {'one cell' if cache is not None else f'{cells} cells'} of "
                             f"{per_cell} tokens, got {tuple(tokens.shape)}")
        start = first_cell * per_cell
        positions = slice(start, start + tokens.shape[1])
        rope_cos, rope_sin = (table[positions] for table in self.rope_tables(tokens.device))
        segments = None if cache is not None else [(i * per_cell, (i + 1) * per_cell) for i in range(cells)]
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, positions])
        for layer, block in enumerate(self.encoder_blocks):
            x = block(x, conditions, rope_cos, rope_sin, segments=segments, cache=cache, layer=layer)
        x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[:, positions]
        for layer, block in enumerate(self.decoder_blocks, start=len(self.encoder_blocks)):
            x = block(x, conditions, rope_cos, rope_sin, segments=segments, cache=cache, layer=layer)
        if cache is not None and store:
            cache.length = positions.stop
        return self.pred(self.decoder_norm(x))

    # ------------------------------------------------------------------ training
    def _check_latents(self, latents) -> None:
        c = self.config
        shape = (c.token_dim, c.latent_side, c.latent_side)
        if not torch.is_tensor(latents) or latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents must be (B, {', '.join(map(str, shape))}) for this model (token_dim, "
                             f"latent_side), got {tuple(getattr(latents, 'shape', ()))}")

    def draw_randomness(self, batch_size: int, *, generator=None, device=None) -> dict:
        """Every random draw of one training forward, batch-first: ``drop_mask`` (B,) (labels replaced by the null
        class), ``cell_times`` (B, K) (logit-normal) and ``cell_noise`` (B, K, c*c, C). A trainer draws them for
        the global batch and hands each process its rows."""
        c = self.config
        device = self.device if device is None else device
        drop_mask = torch.rand(batch_size, generator=generator, device=device) < c.label_drop
        times = draw_times(batch_size * c.num_cells, generator=generator, device=device, distribution="logit-normal",
                           logit_mean=c.time_logit_mean, logit_std=c.time_logit_std)
        noise = torch.randn((batch_size, c.num_cells, c.cell_tokens, c.token_dim), generator=generator, device=device)
        return {"drop_mask": drop_mask, "cell_times": times.view(batch_size, c.num_cells), "cell_noise": noise}

    def forward(self, latents, class_labels=None, *, generator=None, drop_mask=None, cell_times=None,
                cell_noise=None) -> XAROutput:
        """Training loss of scaled VAE latents (B, C, S, S): each cell on its own point of the straight path, all
        cells through one block-causal pass, the velocity's squared error averaged over every token.

        drop_mask (B,) (in training mode those labels become the null class), cell_times (B, K) and cell_noise
        (B, K, c*c, C) come from :meth:`draw_randomness`; whatever is not given is drawn there with ``generator``.
        """
        self._check_latents(latents)
        check_finite_latents(latents)
        c = self.config
        batch, cells, per_cell = latents.shape[0], c.num_cells, c.cell_tokens
        labels = self.check_labels(class_labels, batch).to(latents.device)
        if drop_mask is None or cell_times is None or cell_noise is None:
            drawn = self.draw_randomness(batch, generator=generator, device=latents.device)
            drop_mask = drawn["drop_mask"] if drop_mask is None else drop_mask
            cell_times = drawn["cell_times"] if cell_times is None else cell_times
            cell_noise = drawn["cell_noise"] if cell_noise is None else cell_noise
        for name, value, shape in (("drop_mask", drop_mask, (batch,)), ("cell_times", cell_times, (batch, cells)),
                                   ("cell_noise", cell_noise, (batch, cells, per_cell, c.token_dim))):
            if not torch.is_tensor(value) or tuple(value.shape) != shape:
                raise ValueError(f"{name} must be a tensor of shape {shape}, got {tuple(getattr(value, 'shape', ()))}")
        if self.training and c.label_drop > 0 and not c.unconditional:
            labels = torch.where(drop_mask.to(labels.device), torch.full_like(labels, self.null_class), labels)
        x = to_cells(latents, c.cell_side).reshape(batch * cells, per_cell, c.token_dim)  # one row per cell
        noise = cell_noise.to(x).reshape(x.shape)
        times = cell_times.to(x).reshape(-1)
        x_t = interpolate(x, noise, times).view(batch, cells * per_cell, c.token_dim)
        v = self.run_cells(x_t, self.cell_conditions(self.class_emb(labels), cell_times.to(x)))
        # At least float32 for the error (a bf16 difference of close velocities loses the loss).
        error = (v.float() - velocity_target(x, noise).float().view(v.shape)).pow(2)
        per_cell_loss = error.view(batch, cells, -1).mean(-1)  # (B, K)
        return XAROutput(loss=per_cell_loss.mean(), loss_per_scale=per_cell_loss.mean(0).detach())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, class_labels=None, **kwargs) -> torch.Tensor:
        """Sample latents (B, C, S, S); see :meth:`sample_with_stats` for the options."""
        return self.sample_with_stats(class_labels, **kwargs).latents

    @torch.no_grad()
    def sample_with_stats(self, class_labels=None, *, batch_size: int | None = None,
                          sampling: XARSampling | None = None, generator: torch.Generator | None = None,
                          noise: list[torch.Tensor] | None = None, progress: bool = False, **options) -> SampleOutput:
        """Generate cell by cell; ``nfe_per_scale`` counts the transformer's velocity evaluations per cell and
        ``head_rows`` their token rows (the transformer is xAR's head).

        sampling: an :class:`~flowar.xar_config.XARSampling` (None: the config's saved defaults), updated by
        ``options`` (guidance_scale, cfg_schedule, guidance_interval, solver, steps, atol, rtol). noise: per cell
        k, (B, D_k, c*c, C) of standard normal draws instead of the generator's, D_k = ``noise_draws_at(k)`` of
        the options (the sde solver: the initial noise, then one per stochastic step of that cell; an ODE solver:
        the initial noise).
        """
        return generate(self, class_labels, batch_size=batch_size, sampling=sampling, generator=generator,
                        noise=noise, progress=progress, **options)

    def sampling_hot_modules(self) -> list[nn.Module]:
        # The KV cache's bookkeeping lives in the attention; each block's MLP is most of a pass's work.
        return [block.mlp for block in (*self.encoder_blocks, *self.decoder_blocks)]

    def stepper(self, labels: torch.Tensor, options: XARSampling, *, timed: bool = False) -> "XARStepper":
        return XARStepper(self, labels, options, timed=timed)

    def canvas(self, batch: int, autoencoder=None, options=None) -> "XARCanvas":
        return XARCanvas(self.config)

    def _noise_shapes(self, batch: int, options: XARSampling | None) -> list[tuple[int, ...]]:
        """Each cell's noise shape (B, D_k, c*c, C): D_k draws of the cell's solver."""
        c = self.config
        options = c.sampling if options is None else options
        return [(batch, options.noise_draws_at(k), c.cell_tokens, c.token_dim) for k in range(c.num_cells)]

    def check_noise(self, noise: list[torch.Tensor], batch: int, options=None) -> None:
        shapes, cells = self._noise_shapes(batch, options), self.config.num_cells
        if (not isinstance(noise, (list, tuple)) or len(noise) != cells
                or any(not torch.is_tensor(n) or tuple(n.shape) != shape for n, shape in zip(noise, shapes))):
            got = ([tuple(getattr(n, "shape", ())) for n in noise] if isinstance(noise, (list, tuple))
                   else type(noise).__name__)
            raise ValueError(f"noise must be a list of {cells} tensors (one per cell) of shapes {shapes} (batch, "
                             f"draws of the cell's solver, tokens, channels), got {got}")
        if not all(torch.isfinite(n).all() for n in noise):
            raise ValueError("noise must be finite: it holds NaN or infinite values")

    def noise_from_seeds(self, seeds: list[int], options=None) -> list[torch.Tensor]:
        """Per cell k, (B, D_k, c*c, C) float32 CPU normals in which row b is drawn from ``seeds[b]`` alone."""
        shapes = [shape[1:] for shape in self._noise_shapes(len(seeds), options)]
        per_sample = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            per_sample.append([torch.randn(shape, generator=g) for shape in shapes])
        return [torch.stack([cells[k] for cells in per_sample]) for k in range(len(shapes))]

    @property
    def latent_side(self) -> int:
        return self.config.latent_side

    def edit_masks(self, mask: torch.Tensor, *, mask_resize: str = "area",
                   keep_scales: int = 0) -> list[torch.Tensor]:
        """Boolean keep maps (B, c, c), one per cell. The cells are pieces of one latent, not levels of a pyramid,
        so the mask is resized once, to the latent's side (``vae.pyramid.scale_masks``' rule), and each cell keeps
        its own piece; ``keep_scales`` keeps the first cells whole."""
        c = self.config
        if isinstance(keep_scales, bool) or not isinstance(keep_scales, int) or not 0 <= keep_scales <= c.num_cells:
            raise ValueError(f"keep_scales must be an integer in [0, {c.num_cells}] (for xAR, the first cells kept "
                             f"whole), got {keep_scales!r}")
        whole = scale_masks(mask, (c.latent_side,), mask_resize=mask_resize)[0]  # (B, S, S)
        cells = to_cells(whole[:, None], c.cell_side).view(whole.shape[0], c.num_cells, c.cell_side, c.cell_side)
        return [torch.ones_like(m) if k < keep_scales else m for k, m in enumerate(cells.unbind(1))]

    def known_regions(self, autoencoder, images: torch.Tensor, keep: list[torch.Tensor]) -> list[Known]:
        """Each cell's known tokens: its piece of the image's latent (the posterior mean where the VAE has one),
        where ``keep`` (one (B, c, c) map per cell, :meth:`edit_masks`) is True."""
        c = self.config
        latents = mean_latents(autoencoder, images)
        self._check_latents(latents)
        batch, per_cell = latents.shape[0], c.cell_tokens
        shape = (batch, c.cell_side, c.cell_side)
        if (not isinstance(keep, (list, tuple)) or len(keep) != c.num_cells
                or any(not torch.is_tensor(m) or m.dtype != torch.bool or tuple(m.shape) != shape for m in keep)):
            raise ValueError(f"keep must be a list of {c.num_cells} bool tensors (one per cell) of shape {shape}, "
                             "as edit_masks gives them")
        tokens = to_cells(latents.to(self.device), c.cell_side)  # (B, S*S, C), cell after cell
        return [(m.to(self.device).reshape(batch, per_cell, 1), tokens[:, k * per_cell:(k + 1) * per_cell])
                for k, m in enumerate(keep)]

    # ------------------------------------------------------------------ training data
    def check_training_source(self, source) -> None:
        self.check_source_shape(source, self.config.token_dim, data="latents",
                                fields="model.token_dim / model.latent_side")

    def training_inputs(self, autoencoder) -> dict:
        return {}  # the latents are the whole input

    # ------------------------------------------------------------------ files
    @classmethod
    def from_released(cls, path, preset: str | XARConfig, *, map_location="cpu") -> "XAR":
        """Load ``xAR-{B,L,H}.pth`` (a bare state dict with the authors' key names) into ``preset``, a preset name
        or an :class:`XARConfig`. Read with ``weights_only=True``; the dense mask and every block's RoPE tables
        are checked against the config and dropped, and the other keys must match exactly."""
        config = preset if isinstance(preset, XARConfig) else get_xar_preset(preset)
        state = convert_released_xar_state_dict(read_torch_state_dict(path, map_location=map_location), config)
        model = cls(config)
        load_state_strict(model, state, source=f"checkpoint {path} (preset {preset!r})")
        return model.eval()


class XARStepper(CachedStepper):
    """xAR's per-cell step (``flowar.sampling.Stepper``): ``feed`` puts the clean previous cell into the KV cache
    at t = 0, ``draw`` integrates the cell's flow with the transformer as the velocity.

    The released sampler feeds the clean cell together with the cell's first noisy evaluation, one pass of both
    under the block-causal mask; the clean cell's queries do not see the noisy tokens, so that pass is this feed
    followed by the first evaluation. Under guidance the null rows [B, 2B) run wherever they are used: at the
    evaluations inside the guidance interval of every cell but the first when the ramp leaves it unguided (the
    released sampler runs them there too and discards them). Outside the interval the conditional rows run alone
    on their part of the KV cache; where no evaluation of the run falls inside it the null rows are not carried.

    Editing (``known``): the cell's known tokens are held on their straight path ``(1 - t) target + t eps``, eps
    the cell's initial noise, at every time the solver reaches, and equal the target at t = 0 (the SDE puts them
    there after every update, so each transformer call sees them on the path; an ODE solver integrates through
    ``heads.flow.KnownRegionNet``). A cell known entirely is not integrated: it is the target, and the next feed
    makes it the clean context as it would a sampled cell.
    """

    def _null_rows(self, options: XARSampling) -> bool:
        if not options.guided:
            return False
        low, high = options.guidance_interval
        if low == 0.0 and high == 1.0:  # every time a solver evaluates lies in [0, 1]
            return True
        cells = self.model.config.num_cells
        for k in range(cells):
            if k == 0 and options.weight_at(0, cells) == 1.0:
                continue  # see draw: the first cell runs its null rows only where weighted
            times = evaluation_times(options, k)
            if times is None or any(options.guides_at(t) for t in times):
                return True
        return False

    def _first_pass(self, prefill: bool) -> None:
        self.class_embedding = self.model.class_emb(self.labels)  # (rows, D); the first cell has no context

    def _pass(self, clean: torch.Tensor, k: int, prefill: bool) -> None:
        """clean: cell k - 1 as sampled (B, c*c, C)."""
        tokens = clean.to(self.device)
        tokens = torch.cat([tokens, tokens]) if self.guided else tokens
        conditions = self.model.cell_conditions(self.class_embedding, torch.zeros(1, 1, device=self.device))
        self.model.run_cells(tokens, conditions, first_cell=k - 1, cache=self.cache, store=True)

    @torch.no_grad()
    def draw(self, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             known: Known | None = None) -> FlowSample:
        """The tokens (B, c*c, C) of the cell fed last, from ``noise`` (B, D, c*c, C) or draws of ``generator``;
        ``known``: (keep (B, c*c, 1) bool, target (B, c*c, C)), tokens held on the target's path."""
        o, c, k = self.options, self.model.config, self.scales_seen - 1
        shape = (self.batch, c.cell_tokens, c.token_dim)
        if known is not None:
            keep, target = known
            if keep.dtype != torch.bool or tuple(keep.shape) != (*shape[:2], 1) or tuple(target.shape) != shape:
                raise ValueError(f"known must be (keep {(*shape[:2], 1)} bool, target {shape}), got "
                                 f"({keep.dtype} {tuple(keep.shape)}, {tuple(target.shape)})")
            keep, target = keep.to(self.device), target.to(device=self.device, dtype=torch.float32)
            if bool(keep.all()):
                return FlowSample(x=target, nfe=0, rows=0)
        weight = o.weight_at(k, c.num_cells)
        paired = self.guided and (k > 0 or weight != 1.0)  # the null rows may run in this cell
        cache = self.cache if k > 0 else None
        conditional_cache = cache.rows(self.batch) if cache is not None and self.guided else cache
        model, class_embedding, evaluated = self.model, self.class_embedding, [0]
        given = None if noise is None else noise.to(device=self.device, dtype=torch.float32)

        def normal(i: int) -> torch.Tensor:
            if given is not None:
                return given[:, i]
            return torch.randn(shape, generator=generator, device=self.device)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # The network sees float32 tokens and one time for every row, as the released sampler gives it;
            # guidance is decided on the solver's float64 time.
            tokens = x.to(torch.float32)
            guided = paired and o.guides_at(float(t.reshape(-1)[0]))
            rows = 2 * self.batch if guided else self.batch
            tokens = torch.cat([tokens, tokens]) if guided else tokens
            conditions = model.cell_conditions(class_embedding[:rows], t.reshape(1, -1)[:, :1])
            v = model.run_cells(tokens, conditions, first_cell=k,
                                cache=cache if guided else conditional_cache).to(torch.float64)
            evaluated[0] += rows * c.cell_tokens
            if not guided:
                return v
            v_cond, v_null = v.chunk(2)
            return v_null + weight * (v_cond - v_null)

        with self.timer:
            first = normal(0)  # the known tokens' path starts from it too

            def draws(i: int) -> torch.Tensor:
                return first if i == 0 else normal(i)

            if o.solver == "sde":
                hold = None
                if known is not None:
                    target64, first64 = target.to(torch.float64), first.to(torch.float64)

                    def on_path(x, t):
                        return torch.where(keep, interpolate(target64, first64, t.reshape(1).expand(x.shape[0])), x)

                    hold = on_path
                x, nfe = euler_maruyama(velocity, draws, o.steps_at(k), hold=hold)
            else:
                field = velocity
                if known is not None:
                    def network(x_t, t, cond):  # the cell's conditions are fixed in velocity; cond is unused
                        return velocity(x_t, t)

                    field = KnownRegionNet(network, keep, target, first).conditioned(None)
                x, nfe = integrate(field, first, o.solve_at(k), jumps=o.guidance_interval if paired else ())
                if known is not None:
                    x = torch.where(keep, target.to(x.dtype), x)  # exactly the target at t = 0
        self.counts.nfe += nfe
        self.counts.head_rows += evaluated[0]
        return FlowSample(x=x.to(torch.float32), nfe=nfe, rows=evaluated[0])


class XARCanvas:
    """An xAR run's result (``flowar.sampling.Canvas``): the cells as sampled; each is the next cell's context."""

    def __init__(self, config: XARConfig):
        self.config = config
        self.cells: list[torch.Tensor] = []
        self.out = SampleOutput(latents=None)

    def add(self, k: int, flow: FlowSample) -> torch.Tensor | None:
        self.out.nfe_per_scale.append(flow.nfe)
        self.out.head_rows += flow.rows
        self.cells.append(flow.x)
        return None if k + 1 == self.config.num_cells else flow.x

    def output(self) -> SampleOutput:
        c = self.config
        self.out.latents = from_cells(torch.cat(self.cells, dim=1), c.latent_side, c.cell_side)
        return self.out


# ---------------------------------------------------------------------------------------- released files
def convert_released_xar_state_dict(state: dict, config: XARConfig) -> dict:
    """Authors' key layout -> ours. Names are shared; constant buffers are checked against ``config``, then
    dropped: the dense additive block-causal ``mask`` (1, 1, S*S, S*S) (ours is implied by the cells) and every
    block's ``attn.rope.freqs_cos`` / ``freqs_sin`` (the cell-ordered RoPE tables, which we compute). Each block's
    ``attn.rope.freqs`` stays (our Rope2D keeps it as state)."""
    state = dict(state)
    mask = state.pop("mask", None)
    # A mask of another size goes with mis-shaped position embeddings, which the key check reports.
    if mask is not None and mask.shape[-2:] == (config.seq_len, config.seq_len):
        cell = torch.arange(config.seq_len) // config.cell_tokens
        allowed = cell[None, :] <= cell[:, None]
        if not torch.equal(mask.reshape(allowed.shape) == 0, allowed) or \
                not bool(torch.isneginf(mask.reshape(allowed.shape)[~allowed]).all()):
            raise ValueError(f"checkpoint mask {tuple(mask.shape)} is not the block-causal mask (0 allowed, -inf not) "
                             f"of {config.num_cells} cells of {config.cell_tokens} tokens")
    rope_keys = sorted(k for k in state if k.endswith((".attn.rope.freqs_cos", ".attn.rope.freqs_sin")))
    if rope_keys:
        expected_cos, expected_sin = cell_rope_tables(Rope2D(config.head_dim, grid=config.latent_side),
                                                      config.latent_side, config.cell_side, "cpu")
        for key in rope_keys:
            table = state.pop(key)
            expected = expected_cos if key.endswith("cos") else expected_sin
            if tuple(table.shape) != tuple(expected.shape) or \
                    not torch.allclose(table.float().cpu(), expected, rtol=0.0, atol=1e-5):
                raise ValueError(f"checkpoint {key} {tuple(table.shape)} is not the 2-D RoPE table of a "
                                 f"{config.latent_side}x{config.latent_side} latent in cells of {config.cell_side}x"
                                 f"{config.cell_side} with head_dim {config.head_dim} {tuple(expected.shape)}")
    return state
