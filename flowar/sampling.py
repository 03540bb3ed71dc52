"""The scale-wise sampling engine: one driver loop over scales for every model family and every sampler.

A model family (FlowAR, VAR) supplies, beside its model:

- a **stepper**, one model's per-scale work: ``feed(scale_input)`` runs one cached transformer pass on the
  next scale's input, ``draw(generator=, noise=, known=)`` makes that scale's result (FlowAR: the head's ODE
  solve; VAR: the categorical draw), ``release()`` frees its KV cache, ``counts`` records its work;
- a **canvas**, the run's accumulated result, shared by all steppers of a run: ``add(k, drawn)`` takes scale
  k's result and returns the input of scale k + 1 (FlowAR: the upsampled token map; VAR: the tokenizer's
  f_hat pooled to the next side), ``output()`` the family's output dataclass.

:func:`run_scales` drives any assignment of steppers to scales: a stepper that takes over at scale k first
teacher-forces the scales before k that others drew (the prefill catch-up of collaborative decoding), and an
``edit(k)`` hook may hand each scale a known region (in- and out-painting). Plain sampling, editing,
collaborative decoding and the per-sample seeds of ``eval.sample`` are all calls of :func:`generate` or
:func:`run_scales`; new samplers (per-scale step counts, multistage flows, a compiled head) plug in as
steppers or as options of one.

Guidance follows one convention for every family: ``guidance_scale`` 1 is unguided, as diffusers'
``guidance_scale`` has it; the per-scale weight ramps by ``cfg_schedule`` (:func:`guidance_excess`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from vae.files import ConfigMixin
from vae.pyramid import token_count

from .attention import KVCache

CFG_SCHEDULES = ("linear", "constant")

# The known part of one scale, given by an editing hook: a boolean keep mask and the values to keep there.
# FlowAR: keep (B, s*s, 1), target (B, s*s, C) latent tokens. VAR: keep (B, s, s), target (B, s, s) ids.
# xAR: keep (B, c*c, 1), target (B, c*c, C), the tokens of one cell.
Known = tuple[torch.Tensor, torch.Tensor]
EditHook = Callable[[int], "Known | None"]
# Called with (k, num_scales) once scale k is drawn.
ScaleCallback = Callable[[int, int], None]


def check_guidance_scale(value, *, name: str = "guidance_scale") -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (1 = unguided), got {value!r}")
    return float(value)


def guidance_excess(guidance_scale: float, k: int, num_scales: int, schedule: str) -> float:
    """The guidance weight of scale k minus one.

    "linear" ramps from 1 (unguided) at the first scale to ``guidance_scale`` at the last, as both FlowAR's
    and VAR's authors do; "constant" guides every scale with ``guidance_scale``. Written as the excess over
    one, so FlowAR's weight ``1 + excess`` and VAR's ``(1 + t) cond - t uncond`` with ``t = excess`` are the
    authors' own arithmetic.
    """
    if schedule == "linear":
        return (guidance_scale - 1.0) * k / max(num_scales - 1, 1)
    return guidance_scale - 1.0


@dataclass
class GuidanceOptions(ConfigMixin):
    """The sampling options every family shares; a family's options dataclass extends it."""

    guidance_scale: float = 1.0  # 1 = unguided; the weight of the last scale under the linear ramp
    cfg_schedule: str = "linear"  # one of CFG_SCHEDULES

    def __post_init__(self):
        self.guidance_scale = check_guidance_scale(self.guidance_scale)
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def replace(self, **overrides):
        """A validated copy with ``overrides`` applied; None means "not given" (keep this value), and a name
        that is not an option is refused with the list of options."""
        given = {k: v for k, v in overrides.items() if v is not None}
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} {'is not a' if len(unknown) == 1 else 'are not'} sampling "
                             f"option{'' if len(unknown) == 1 else 's'} of {type(self).__name__}; the options are "
                             f"{names}")
        return dataclasses.replace(self, **self._complete(given))

    def _complete(self, given: dict) -> dict:
        """Hook: options implied by the ones given (a family's own rules)."""
        return given

    def check_model(self, config) -> None:
        """Hook: raise ValueError naming the option where it does not fit the model of ``config`` (e.g. a
        per-scale list of the wrong length)."""


class PerScaleSteps:
    """The ``steps`` option of a family whose solve may take another step count at each scale (FlowAR's scales,
    xAR's cells): one count (None for an adaptive solver) for every scale, or a tuple of one count per scale.
    A mixin of the options dataclass, which declares the field ``steps``."""

    def _step_counts(self) -> tuple:
        """``steps`` as the counts to validate, one per scale or a single one for all (a list is made a tuple)."""
        if isinstance(self.steps, list):
            self.steps = tuple(self.steps)
        counts = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        if not counts:
            raise ValueError("steps must be an integer, a non-empty list of integers (one per scale) or None")
        return counts

    @property
    def per_scale_steps(self) -> bool:
        return isinstance(self.steps, tuple)

    def steps_at(self, k: int) -> int | None:
        """The step count of scale k."""
        return self.steps[k] if self.per_scale_steps else self.steps

    def check_step_count(self, count: int, unit: str) -> None:
        """A ValueError naming ``steps`` unless it is one count or ``count`` of them; ``unit`` says what each
        count is for (e.g. "scale (4 for scales (1, 2, 4, 8))")."""
        if self.per_scale_steps and len(self.steps) != count:
            raise ValueError(f"steps must hold one count per {unit}, got {len(self.steps)}: {list(self.steps)}")


@dataclass
class StepCounts:
    """Work done by one model in a scale-wise run."""

    forwards: int = 0  # transformer passes (one per scale it saw), prefill included
    prefill_forwards: int = 0  # passes over scales another model drew (teacher forcing)
    nfe: int = 0  # head evaluations (FlowAR; VAR's head is one linear layer inside each pass: 0)
    head_rows: int = 0  # token rows through the FlowAR head (doubled where guided)
    seconds: float = 0.0  # wall time in this model's passes and draws (prefill included), when timed


class Timer:
    """Adds wall time to ``counts.seconds`` when enabled; on an accelerator it waits for queued work first, so
    it is off for plain sampling (a sync per scale would cost throughput) and on for collaborative runs."""

    def __init__(self, counts: StepCounts, device: torch.device, enabled: bool):
        self.counts, self.device, self.enabled = counts, device, enabled

    def __enter__(self):
        if self.enabled:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.counts.seconds += time.perf_counter() - self.start


class CachedStepper:
    """What the families' steppers share: the batch layout under guidance, the KV cache's life, counting and
    timing. A family implements ``_first_pass()`` (the class token's pass at scale 1), ``_pass(scale_input, k,
    prefill)`` (one cached transformer pass over scale k's input) and ``draw``.

    labels (B,) may hold the null class. Rows [0, B) are conditional; with guidance, rows [B, 2B) carry the
    null class through the transformer (they need their own KV cache).
    """

    def __init__(self, model, labels: torch.Tensor, options, *, timed: bool = False):
        self.model, self.options = model, options
        self.sides = model.sampled_scales(options)  # the scales this run samples
        self.device = model.device
        self.batch = labels.shape[0]
        self.guided = self._null_rows(options)
        if self.guided:
            labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        self.labels = labels.to(self.device)
        self.cache = None  # allocated at the first scale fed, dropped by release()
        self.scales_seen = 0
        self.counts = StepCounts()
        self.timer = Timer(self.counts, self.device, timed)

    def _null_rows(self, options) -> bool:
        """Whether rows [B, 2B) carry the null class: wherever the options guide. A family whose sampler can tell
        before the first pass that guidance never applies (no evaluation inside its interval) leaves them out."""
        return options.guided

    def release(self) -> None:
        """Free the KV cache (and the last pass's outputs) once this stepper has no scales left."""
        self.cache = None

    @torch.no_grad()
    def feed(self, scale_input, *, prefill: bool = False) -> None:
        """One cached transformer pass over the next scale's input (None before the first scale, whose input is
        the class token). ``prefill``: a scale another model drew, fed only to fill the KV cache."""
        model, c, k = self.model, self.model.config, self.scales_seen
        if k >= len(self.sides):
            raise ValueError(f"all {len(self.sides)} scales were fed already")
        with self.timer:
            if k == 0:
                length = sum(token_count(side) for side in self.sides)
                self.cache = KVCache(model.num_layers, self.labels.shape[0], c.num_heads, length,
                                     c.width // c.num_heads, device=self.device, dtype=model.cache_dtype(self.device))
                self._first_pass(prefill)
            else:
                self._pass(scale_input, k, prefill)
        self.scales_seen += 1
        self.counts.forwards += 1
        self.counts.prefill_forwards += int(prefill)

    def _first_pass(self, prefill: bool) -> None:
        raise NotImplementedError

    def _pass(self, scale_input, k: int, prefill: bool) -> None:
        raise NotImplementedError


class Stepper(Protocol):
    """One model's per-scale operations (see the module docstring)."""

    batch: int
    scales_seen: int  # scales whose inputs are in the KV cache
    counts: StepCounts

    def feed(self, scale_input, *, prefill: bool = False) -> None: ...

    def draw(self, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             known: Known | None = None) -> Any: ...

    def release(self) -> None: ...


class Canvas(Protocol):
    """A run's accumulated result."""

    def add(self, k: int, drawn) -> Any: ...

    def output(self) -> Any: ...


@torch.no_grad()
def run_scales(steppers: Sequence[Stepper], canvas: Canvas, *, generator: torch.Generator | None = None,
               noise: list[torch.Tensor] | None = None, edit: EditHook | None = None, progress: bool = False,
               on_scale: ScaleCallback | None = None):
    """Sample every scale, scale k with ``steppers[k]`` (the same object may serve several scales).

    A stepper that takes over at scale k first feeds the inputs of the scales before k that others drew.
    ``noise[k]`` (optional) is scale k's randomness, given instead of drawn from ``generator`` (FlowAR: the
    initial noise; VAR: one uniform per token); steppers check it. ``edit(k)`` may return a known region of
    scale k (see ``Known``). ``on_scale(k, num_scales)`` is called after scale k is drawn (a progress bar of
    an application); an exception it raises stops the run there (cancellation), and the KV caches go with
    the steppers. Returns ``canvas.output()``.
    """
    inputs: list = [None]  # input of scale k; None: the class token
    for k in tqdm(range(len(steppers)), desc="scales", disable=not progress):
        stepper = steppers[k]
        while stepper.scales_seen < k:
            stepper.feed(inputs[stepper.scales_seen], prefill=True)
        stepper.feed(inputs[k])
        drawn = stepper.draw(generator=generator, noise=None if noise is None else noise[k],
                             known=None if edit is None else edit(k))
        inputs.append(canvas.add(k, drawn))
        if all(other is not stepper for other in steppers[k + 1:]):
            stepper.release()
        if on_scale is not None:
            on_scale(k, len(steppers))
    return canvas.output()


@torch.no_grad()
def generate(model, class_labels=None, *, autoencoder=None, batch_size: int | None = None, sampling=None,
             generator: torch.Generator | None = None, noise: list[torch.Tensor] | None = None,
             edit: EditHook | None = None, null_labels: bool = False, progress: bool = False,
             on_scale: ScaleCallback | None = None, **options):
    """Sample with one model (FlowAR or VAR) through :func:`run_scales`.

    sampling: the family's options dataclass (None: the model's saved defaults), updated by ``options``
    (its field names). autoencoder: what the canvas needs to turn a scale's result into the next input
    (VAR: its tokenizer; FlowAR: none). null_labels: ``class_labels=None`` on a conditional model means the
    null class for ``batch_size`` images, unguided (sampling with no class information, as zero-shot
    editing does).
    """
    options = model.sampling_options(sampling, **options)
    labels = model.check_labels(class_labels, batch_size, allow_null=null_labels)
    if null_labels and class_labels is None and options.guided:
        options = options.replace(guidance_scale=1.0)  # null against null: guidance would change nothing
    sides = model.sampled_scales(options)
    if edit is not None and sides != model.config.scales:
        raise ValueError(f"scales {list(sides)}: editing samples the model's own scales {list(model.config.scales)}")
    steppers = [model.stepper(labels, options)] * len(sides)
    if noise is not None:
        model.check_noise(noise, labels.shape[0], options)
    return run_scales(steppers, model.canvas(labels.shape[0], autoencoder, options), generator=generator, noise=noise,
                      edit=edit, progress=progress, on_scale=on_scale)
