"""Collaborative decoding (CoDe): a large model drafts the first scales, a small one refines the rest.

CoDe (Chen et al., 2024) observes that the coarse scales of a scale-wise generator decide the content and
need the capacity of a large model, while the fine scales, which hold most of the tokens, are local detail a
small model renders almost as well. Without any retraining, the large "drafter" samples scales 1..N and the
small "refiner" samples N+1..K. The refiner has not seen the drafted scales: before its first scale it runs
once over each drafted scale's input (teacher forcing the drafted prefix, one cached pass per scale), so
that its KV cache holds what it would hold had it sampled that prefix itself.

To make that possible this module cuts the two samplers into scale steps: :class:`FlowARScaleSampler` and
:class:`VARScaleSampler` are ``FlowAR.sample_with_stats`` and ``VAR.sample`` taken apart (same operations,
same order of random draws, so one sampler alone reproduces them bit for bit; tests check it), and
:func:`run_flowar` / :func:`run_var` drive any assignment of samplers to scales. ``flowar.editing`` uses the
same drivers with a hook that overwrites each scale's known region.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from heads.categorical import cfg_mix, check_sampling_args, draw_tokens, filter_logits
from heads.solvers import FlowSample, sample_flow
from vae.pyramid import next_scale_input

from .attention import KVCache, scale_segments
from .labels import check_class_labels
from .model import CFG_SCHEDULES, FlowAR, SampleOutput, from_tokens, to_tokens
from .pipeline import OUTPUT_TYPES, autocast_context, decode_output
from .var import VAR, VARSampleOutput, cfg_ramp

# The known part of one scale, given by an editing hook: a boolean keep mask and the values to keep there.
# FlowAR: keep (B, s*s, 1), target (B, s*s, C) latent tokens. VAR: keep (B, s, s), target (B, s, s) ids.
Known = tuple[torch.Tensor, torch.Tensor]
EditHook = Callable[[int], "Known | None"]


def _sync(device: torch.device) -> None:
    # Wall-clock splits on an accelerator are meaningless unless its queued work has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_labels(model, class_labels, batch_size, device, *, allow_null: bool = False) -> torch.Tensor:
    """(B,) long labels for ``model`` (FlowAR or VAR). With ``allow_null``, ``class_labels=None`` on a
    conditional model means the null class for every image (``batch_size`` of them): sampling with no
    class information, as VAR's zero-shot in-painting does."""
    if allow_null and class_labels is None and not model.config.unconditional:
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 when class_labels is None, got {batch_size}")
        return torch.full((batch_size,), model.null_class, dtype=torch.long, device=device)
    return check_class_labels(class_labels, batch_size, num_classes=model.config.num_classes, device=device)


# ---------------------------------------------------------------------------------------------- FlowAR
class KnownRegionVelocity:
    """A head velocity field with part of every token map known: replacement sampling for flow matching.

    On the straight path ``x_t = (1 - t) x + t eps`` the known tokens are at ``(1 - t) target + t noise``
    at every time t (``noise`` being the same eps the scale's ODE starts from, so t = 1 agrees with the
    initial state) and move with the constant velocity ``noise - target``. Before each head call the known
    rows of x_t are put on that path, so the head conditions the unknown tokens on them, and their velocity
    is replaced by the path's. Any solver then carries the known rows along the path (exactly up to float
    rounding: their velocity is constant); the driver sets them to the target exactly at t = 0.
    Called on the doubled (conditional + null) batch under guidance, it tiles the known part, and the
    guided mix of two equal velocities is that velocity.
    """

    def __init__(self, net, keep: torch.Tensor, target: torch.Tensor, noise: torch.Tensor):
        self.net = net
        self.keep = keep  # (B, N, 1) bool
        self.target = target  # (B, N, C)
        self.noise = noise  # (B, N, C)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        repeat = x_t.shape[0] // self.keep.shape[0]  # 2 for the doubled guidance batch
        keep, target, noise = (v.repeat(repeat, 1, 1) for v in (self.keep, self.target, self.noise))
        time_ = t.to(x_t.dtype).view(-1, 1, 1)
        on_path = (1 - time_) * target.to(x_t.dtype) + time_ * noise.to(x_t.dtype)
        v = self.net(torch.where(keep, on_path, x_t), t, cond)
        return torch.where(keep, (noise - target).to(v.dtype), v)


@dataclass
class SamplerCounts:
    """Work done by one model in a scale-wise run."""

    forwards: int = 0  # transformer passes (one per scale it saw), prefill included
    prefill_forwards: int = 0  # passes over scales another model sampled (teacher forcing)
    nfe: int = 0  # head evaluations (FlowAR; VAR's head is one linear layer inside each pass: 0)
    head_rows: int = 0  # token rows through the FlowAR head (doubled where guided)
    seconds: float = 0.0  # wall time in this model's passes and ODE solves (prefill included)

    def add_forward(self, device: torch.device, *, prefill: bool, start: float) -> None:
        """Count one transformer pass that began at ``start`` (``time.perf_counter``) on ``device``."""
        _sync(device)
        self.forwards += 1
        self.prefill_forwards += int(prefill)
        self.seconds += time.perf_counter() - start


class FlowARScaleSampler:
    """``FlowAR.sample_with_stats`` cut into scales: feed a scale's input to the transformer, then solve its ODE.

    ``labels`` (B,) may hold the null class. Options and defaults are those of ``sample_with_stats``
    (None: the model's own defaults); they are validated here, the solver and schedule by ``heads.solvers``.
    """

    def __init__(self, model: FlowAR, labels: torch.Tensor, *, cfg: float | None = None,
                 cfg_schedule: str = "linear", guidance_interval: tuple[float, float] | None = None,
                 steps: int | None = None, solver: str = "euler", schedule: str = "flowar",
                 atol: float = 1e-5, rtol: float = 1e-5):
        c = model.config
        self.model = model
        self.device = model.class_emb.weight.device
        self.cfg = c.default_cfg if cfg is None else float(cfg)
        self.steps = c.default_steps if steps is None else steps
        self.guidance_interval = (c.default_guidance_interval if guidance_interval is None
                                  else tuple(guidance_interval))
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.cfg != 1.0 and c.unconditional:
            raise ValueError(f"cfg must be 1.0 for an unconditional model, got {self.cfg}")
        self.cfg_schedule = cfg_schedule
        self.solve_options = dict(solver=solver, steps=self.steps, schedule=schedule, atol=atol, rtol=rtol)
        self.batch = labels.shape[0]
        # Rows [0, B) are conditional; with guidance, rows [B, 2B) carry the null class (own KV cache).
        self.guided = self.cfg != 1.0
        if self.guided:
            labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        self.labels = labels.to(self.device)
        self.cache = None  # allocated at the first scale fed, dropped by release()
        self.scales_seen = 0  # scales whose inputs are in the KV cache
        self.z = None  # head conditions of the last scale fed, (rows, s*s, D)
        self.counts = SamplerCounts()

    def _start(self) -> None:
        c = self.model.config
        with torch.no_grad():
            self.class_embedding = self.model.class_emb(self.labels)
        self.cache = KVCache(self.model.num_layers, self.labels.shape[0], c.num_heads, c.seq_len,
                             c.width // c.num_heads, device=self.device, dtype=self.model._cache_dtype(self.device))

    def release(self) -> None:
        """Free the KV cache once this sampler has no scales left to sample."""
        self.cache = self.z = None

    @torch.no_grad()
    def feed(self, previous: torch.Tensor | None, *, prefill: bool = False) -> None:
        """Run the transformer on the next scale's input, made from the previous scale's tokens
        (B, s*s, C) (None before the first scale, whose input is the class token)."""
        c, k = self.model.config, self.scales_seen
        if k >= len(c.scales):
            raise ValueError(f"all {len(c.scales)} scales were fed already")
        start = time.perf_counter()
        if k == 0:
            self._start()
            tokens = self.class_embedding[:, None]
        else:
            nxt = next_scale_input(from_tokens(previous.to(self.device, torch.float32), c.scales[k - 1]),
                                   full_side=c.scales[-1], next_side=c.scales[k])
            nxt = to_tokens(nxt)
            tokens = self.model.z_proj(torch.cat([nxt, nxt]) if self.guided else nxt)
        self.z = self.model.transformer(tokens, self.class_embedding, sides=(c.scales[k],), cache=self.cache)
        self.scales_seen += 1
        self.counts.add_forward(self.device, prefill=prefill, start=start)

    @torch.no_grad()
    def solve(self, x_init: torch.Tensor, *, known: Known | None = None) -> FlowSample:
        """Integrate the head from ``x_init`` (B, s*s, C) for the scale fed last, optionally with a known region."""
        c, k = self.model.config, self.scales_seen - 1
        start = time.perf_counter()
        num_scales = len(c.scales)
        if self.cfg_schedule == "linear":
            scale_cfg = 1.0 + (self.cfg - 1.0) * k / max(num_scales - 1, 1)
        else:
            scale_cfg = self.cfg
        net = self.model.flownet
        if known is not None:
            net = KnownRegionVelocity(net, known[0], known[1], x_init)
        z = self.z
        flow = sample_flow(net, x_init, z[:self.batch].float(), cond_null=z[self.batch:].float() if self.guided else None,
                           cfg=scale_cfg, guidance_interval=self.guidance_interval, **self.solve_options)
        _sync(self.device)
        self.counts.nfe += flow.nfe
        self.counts.head_rows += flow.rows
        self.counts.seconds += time.perf_counter() - start
        return flow


def _check_noise(noise, batch: int, config) -> None:
    expected = [(batch, s * s, config.token_dim) for s in config.scales]
    if len(noise) != len(config.scales) or any(tuple(n.shape) != e for n, e in zip(noise, expected)):
        raise ValueError(f"noise must be a list of tensors of shapes {expected}, got {[tuple(n.shape) for n in noise]}")


@torch.no_grad()
def run_flowar(samplers: Sequence[FlowARScaleSampler], *, generator: torch.Generator | None = None,
               noise: list[torch.Tensor] | None = None, edit: EditHook | None = None,
               progress: bool = False) -> SampleOutput:
    """Sample every scale, scale k with ``samplers[k]`` (the same object may serve several scales).

    A sampler that takes over at scale k first teacher-forces the scales before k that others sampled.
    Noise is drawn per scale from ``generator`` (or taken from ``noise``) in scale order, as
    ``FlowAR.sample_with_stats`` does. ``edit(k)`` may return (keep (B, s*s, 1) bool, target (B, s*s, C)):
    those tokens follow the target's path during the solve and equal the target afterwards.
    """
    config = samplers[0].model.config
    batch, device = samplers[0].batch, samplers[0].device
    if noise is not None:
        _check_noise(noise, batch, config)
    samples: list[torch.Tensor] = []  # each scale's final tokens (B, s*s, C), float32
    out = SampleOutput(latents=None)
    for k in tqdm(range(len(config.scales)), desc="scales", disable=not progress):
        sampler = samplers[k]
        while sampler.scales_seen < k:
            j = sampler.scales_seen
            sampler.feed(samples[j - 1] if j else None, prefill=True)
        sampler.feed(samples[k - 1] if k else None)
        side = config.scales[k]
        if noise is not None:
            x_init = noise[k].to(device=device, dtype=torch.float32)
        else:
            x_init = torch.randn((batch, side * side, config.token_dim), generator=generator, device=device)
        known = edit(k) if edit is not None else None
        flow = sampler.solve(x_init, known=known)
        out.nfe_per_scale.append(flow.nfe)
        out.head_rows += flow.rows
        sample = flow.x.float()
        if known is not None:
            sample = torch.where(known[0], known[1].to(sample), sample)  # exactly the target at t = 0
        samples.append(sample)
        if all(other is not sampler for other in samplers[k + 1:]):
            sampler.release()
    out.latents = from_tokens(samples[-1], config.scales[-1])
    return out


# ---------------------------------------------------------------------------------------------- VAR
class VARScaleSampler:
    """``VAR.sample`` (without ``more_smooth``) cut into scales: feed a scale's input, then draw its ids.

    ``labels`` (B,) may hold the null class. Options and defaults are those of ``VAR.sample``; cfg follows
    VAR's convention (0 = unguided).
    """

    def __init__(self, model: VAR, labels: torch.Tensor, *, cfg: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0):
        c = model.config
        self.model = model
        self.device = model.class_emb.weight.device
        cfg = (0.0 if c.unconditional else c.default_cfg) if cfg is None else cfg
        self.top_k = c.default_top_k if top_k is None else top_k
        self.top_p = c.default_top_p if top_p is None else top_p
        self.temperature = temperature
        check_sampling_args(top_k=self.top_k, top_p=self.top_p, temperature=temperature)
        if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
            raise ValueError(f"cfg must be a finite number, got {cfg!r}")
        if cfg != 0 and c.unconditional:
            raise ValueError(f"cfg must be 0 for an unconditional model (num_classes=0), got {cfg}")
        self.cfg = cfg
        self.batch = labels.shape[0]
        self.guided = cfg != 0
        if self.guided:
            labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        self.labels = labels.to(self.device)
        self.segments = scale_segments(c.scales)
        self.cache = None  # allocated at the first scale fed, dropped by release()
        self.scales_seen = 0
        self.logits = None  # (rows, s*s, V) float32 of the last scale sampled
        self.counts = SamplerCounts()

    def _start(self) -> None:
        model, c = self.model, self.model.config
        with torch.no_grad():
            self.class_embedding = model.class_emb(self.labels)
            self.modulation = model.block_modulation(self.class_embedding)  # per class, once for all scales
            self.positions = model.level_positions()
        self.cache = KVCache(c.depth, self.labels.shape[0], c.num_heads, c.seq_len, c.width // c.num_heads,
                             device=self.device, dtype=model._cache_dtype(self.device))

    def release(self) -> None:
        """Free the KV cache once this sampler has no scales left to sample."""
        self.cache = self.logits = None

    @torch.no_grad()
    def feed(self, next_input: torch.Tensor | None, *, prefill: bool = False) -> None:
        """Run the transformer on the next scale's input: the tokenizer's accumulated f_hat pooled to this
        scale, (B, s*s, Cvae) (None before the first scale, whose input is the class token)."""
        model, c, k = self.model, self.model.config, self.scales_seen
        if k >= len(c.scales):
            raise ValueError(f"all {len(c.scales)} scales were fed already")
        start = time.perf_counter()
        if k == 0:
            self._start()
            tokens = model.embed_inputs(self.class_embedding)
        else:
            begin, end = self.segments[k]
            tokens = model.word_embed(next_input.to(self.device, model.word_embed.weight.dtype)) + self.positions[:, begin:end]
            if self.guided:
                tokens = torch.cat([tokens, tokens])
        hidden = model.transformer(tokens, self.modulation, sides=(c.scales[k],), cache=self.cache)
        # Over another model's scales only the KV cache matters: no logits.
        self.logits = None if prefill else model.head_logits(hidden, self.class_embedding).float()
        self.scales_seen += 1
        self.counts.add_forward(self.device, prefill=prefill, start=start)

    @torch.no_grad()
    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids (B, s, s) of the scale fed last."""
        c, k = self.model.config, self.scales_seen - 1
        start = time.perf_counter()
        logits = self.logits
        if self.guided:
            logits = cfg_mix(logits[:self.batch], logits[self.batch:], cfg_ramp(self.cfg, k, len(c.scales)))
        filtered = filter_logits(logits, top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
        ids = draw_tokens(filtered, greedy=self.temperature == 0, generator=generator)
        side = c.scales[k]
        self.counts.seconds += time.perf_counter() - start
        return ids.view(self.batch, side, side)


@torch.no_grad()
def run_var(samplers: Sequence[VARScaleSampler], tokenizer, *, generator: torch.Generator | None = None,
            edit: EditHook | None = None, progress: bool = False) -> VARSampleOutput:
    """Sample every scale, scale k with ``samplers[k]``; the tokenizer accumulates f_hat and makes each input.

    ``edit(k)`` may return (keep (B, s, s) bool, target ids (B, s, s)): those ids replace the drawn ones
    before f_hat is accumulated, so the following scales build on them.
    """
    config = samplers[0].model.config
    for sampler in {id(s): s for s in samplers}.values():
        sampler.model.check_tokenizer(tokenizer)
    inputs: list[torch.Tensor | None] = [None]  # input of scale k (None: the class token)
    f_hat, indices = None, []
    for k in tqdm(range(len(config.scales)), desc="scales", disable=not progress):
        sampler = samplers[k]
        while sampler.scales_seen < k:
            sampler.feed(inputs[sampler.scales_seen], prefill=True)
        sampler.feed(inputs[k])
        ids = sampler.draw(generator)
        known = edit(k) if edit is not None else None
        if known is not None:
            ids = torch.where(known[0].to(ids.device), known[1].to(ids.device), ids)
        indices.append(ids)
        start = time.perf_counter()
        f_hat, nxt = tokenizer.accumulate(k, f_hat, ids)
        sampler.counts.seconds += time.perf_counter() - start
        inputs.append(nxt)
        if all(other is not sampler for other in samplers[k + 1:]):
            sampler.release()
    return VARSampleOutput(indices=indices, f_hat=f_hat)


# ---------------------------------------------------------------------------------------------- CoDe
@dataclass
class CollaborativeStats:
    """Who did what in a collaborative run, and how long it took."""

    draft_scales: int
    draft: SamplerCounts
    refine: SamplerCounts
    nfe_per_scale: list[int] = field(default_factory=list)  # head evaluations per scale (FlowAR; VAR: zeros)
    seconds: float = 0.0  # the whole run's wall time

    @property
    def forwards(self) -> int:
        return self.draft.forwards + self.refine.forwards


@dataclass
class CollaborativeOutput:
    """The sample in the family's own output type (FlowAR: ``SampleOutput``, VAR: ``VARSampleOutput``) and stats."""

    sample: SampleOutput | VARSampleOutput
    stats: CollaborativeStats


def check_compatible(draft_model, refine_model) -> None:
    """Raise ValueError unless the two models can share one sampling run (same family, scales, token space,
    classes and device)."""
    if type(draft_model) is not type(refine_model) or not isinstance(draft_model, (FlowAR, VAR)):
        raise ValueError(f"draft_model and refine_model must both be FlowAR or both be VAR models, got "
                         f"{type(draft_model).__name__} and {type(refine_model).__name__}")
    if isinstance(draft_model, FlowAR):
        fields = ("scales", "token_dim", "num_classes")
    else:
        fields = ("scales", "vocab_size", "code_dim", "num_classes")
    differ = [f"{name}: {getattr(draft_model.config, name)} vs {getattr(refine_model.config, name)}"
              for name in fields if getattr(draft_model.config, name) != getattr(refine_model.config, name)]
    if differ:
        raise ValueError("draft_model and refine_model must share " + ", ".join(fields) + " to decode together; "
                         "they differ in " + "; ".join(differ))
    devices = (draft_model.class_emb.weight.device, refine_model.class_emb.weight.device)
    if devices[0] != devices[1]:
        raise ValueError(f"draft_model and refine_model must be on one device, got {devices[0]} and {devices[1]}")


@torch.no_grad()
def collaborative_sample(draft_model, refine_model, class_labels=None, *, draft_scales: int, tokenizer=None,
                         batch_size: int | None = None, generator: torch.Generator | None = None,
                         refine_kwargs: dict | None = None, progress: bool = False,
                         **sample_kwargs) -> CollaborativeOutput:
    """Sample with ``draft_model`` on the first ``draft_scales`` scales and ``refine_model`` on the rest.

    Both models are FlowAR, or both VAR with ``tokenizer`` (the multi-scale VQ tokenizer they share).
    sample_kwargs are the sampling options of that family (FlowAR: cfg, cfg_schedule, guidance_interval,
    steps, solver, schedule, atol, rtol, noise; VAR: cfg, top_k, top_p, temperature), applied to both
    models; options left at None take each model's own default (e.g. its cfg). ``refine_kwargs``
    overrides options for the refiner only. ``draft_scales=0`` is the refiner alone and
    ``draft_scales=K`` the drafter alone, each equal to its own ``sample`` with the same generator.
    """
    check_compatible(draft_model, refine_model)
    num_scales = len(draft_model.config.scales)
    if isinstance(draft_scales, bool) or not isinstance(draft_scales, int) or not 0 <= draft_scales <= num_scales:
        raise ValueError(f"draft_scales must be an integer in [0, {num_scales}] (the models have {num_scales} "
                         f"scales), got {draft_scales!r}")
    device = draft_model.class_emb.weight.device
    labels = resolve_labels(draft_model, class_labels, batch_size, device)
    if refine_kwargs and "noise" in refine_kwargs:
        raise ValueError("refine_kwargs must not hold noise: the initial noise belongs to the run (pass noise=...)")
    noise = sample_kwargs.pop("noise", None)
    refine_options = {**sample_kwargs, **(refine_kwargs or {})}
    start = time.perf_counter()
    if isinstance(draft_model, FlowAR):
        if tokenizer is not None:
            raise ValueError("tokenizer is for VAR models; FlowAR models share a VAE, which the pipeline holds")
        draft = FlowARScaleSampler(draft_model, labels, **sample_kwargs)
        refine = FlowARScaleSampler(refine_model, labels, **refine_options)
        samplers = [draft] * draft_scales + [refine] * (num_scales - draft_scales)
        sample = run_flowar(samplers, generator=generator, noise=noise, progress=progress)
        nfe_per_scale = list(sample.nfe_per_scale)
    else:
        if tokenizer is None:
            raise ValueError("tokenizer is required for VAR models (the vae.msvq.MultiScaleVQVAE both were trained with)")
        if noise is not None:
            raise ValueError("noise is for FlowAR models; VAR draws its tokens from generator")
        draft = VARScaleSampler(draft_model, labels, **sample_kwargs)
        refine = VARScaleSampler(refine_model, labels, **refine_options)
        samplers = [draft] * draft_scales + [refine] * (num_scales - draft_scales)
        sample = run_var(samplers, tokenizer, generator=generator, progress=progress)
        nfe_per_scale = [0] * num_scales
    _sync(device)
    stats = CollaborativeStats(draft_scales=draft_scales, draft=draft.counts, refine=refine.counts,
                               nfe_per_scale=nfe_per_scale, seconds=time.perf_counter() - start)
    return CollaborativeOutput(sample=sample, stats=stats)


class CollaborativePipeline:
    """Two pipelines of one family that decode together: ``draft_pipe`` drafts ``draft_scales`` scales,
    ``refine_pipe`` refines the rest; images come out through their shared VAE / tokenizer."""

    def __init__(self, draft_pipe, refine_pipe, draft_scales: int):
        check_compatible(draft_pipe.model, refine_pipe.model)
        decoder = _decoder_name(refine_pipe)
        if _decoder_name(draft_pipe) != decoder:
            raise ValueError("draft_pipe and refine_pipe must be pipelines of the same kind")
        check_same_decoder(getattr(draft_pipe, decoder), getattr(refine_pipe, decoder), name=decoder)
        num_scales = len(refine_pipe.model.config.scales)
        if isinstance(draft_scales, bool) or not isinstance(draft_scales, int) or not 0 <= draft_scales <= num_scales:
            raise ValueError(f"draft_scales must be an integer in [0, {num_scales}], got {draft_scales!r}")
        self.draft_pipe, self.refine_pipe, self.draft_scales = draft_pipe, refine_pipe, draft_scales

    @property
    def device(self) -> torch.device:
        return self.refine_pipe.device

    def to(self, device=None, dtype=None) -> "CollaborativePipeline":
        self.draft_pipe.to(device=device, dtype=dtype)
        self.refine_pipe.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, class_labels=None, *, batch_size=None, output_type: str = "pil",
                 autocast_dtype: torch.dtype | None = None, decode_batch: int = 32, return_stats: bool = False,
                 **sample_kwargs):
        """Images as the member pipelines make them (``output_type`` "pil" | "pt" | "np" | "latent"); with
        ``return_stats`` a pair (images, :class:`CollaborativeStats`). sample_kwargs: see
        :func:`collaborative_sample` (``refine_kwargs`` included)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        refine = self.refine_pipe
        is_var = isinstance(refine.model, VAR)
        with autocast_context(self.device, autocast_dtype):
            result = collaborative_sample(
                self.draft_pipe.model, refine.model, class_labels, draft_scales=self.draft_scales,
                batch_size=batch_size, tokenizer=refine.tokenizer if is_var else None, **sample_kwargs)
        sample = result.sample
        decodable, latent = (sample.f_hat, sample.indices) if is_var else (sample.latents, sample.latents)
        images = decode_output(refine.autoencoder.decode, decodable, output_type, latent=latent,
                               decode_batch=decode_batch)
        return (images, result.stats) if return_stats else images


def _decoder_name(pipe) -> str:
    if hasattr(pipe, "tokenizer") and isinstance(pipe.model, VAR):
        return "tokenizer"
    if hasattr(pipe, "vae") and isinstance(pipe.model, FlowAR):
        return "vae"
    raise ValueError(f"expected a FlowARPipeline or a VARPipeline, got {type(pipe).__name__}")


def check_same_decoder(a, b, *, name: str = "vae") -> None:
    """Raise ValueError unless ``a`` and ``b`` are one autoencoder: the same object, or equal type, scaling,
    config and weights (a latent of one decodes identically with the other)."""
    if a is b:
        return
    problems = []
    if type(a) is not type(b):
        problems.append(f"types {type(a).__name__} vs {type(b).__name__}")
    for attr in ("scaling_factor", "shift_factor", "config"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            problems.append(f"{attr} differs")
    if not problems:
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys():
            problems.append("state dict keys differ")
        else:
            differ = [key for key in sa if sa[key].shape != sb[key].shape
                      or not torch.equal(sa[key].to(sb[key].device), sb[key])]
            if differ:
                problems.append(f"{len(differ)} weights differ, e.g. {differ[0]}")
    if problems:
        raise ValueError(f"the two pipelines must share one {name} (the latent space both models were trained "
                         f"in): {'; '.join(problems)}")
