"""Collaborative decoding (CoDe): a large model drafts the first scales, a small one refines the rest.

CoDe (Chen et al., 2024) observes that the coarse scales of a scale-wise generator decide the content and
need the capacity of a large model, while the fine scales, which hold most of the tokens, are local detail a
small model renders almost as well. Without any retraining, the large "drafter" samples scales 1..N and the
small "refiner" samples N+1..K. The refiner has not seen the drafted scales: before its first scale it runs
once over each drafted scale's input (teacher forcing the drafted prefix, one cached pass per scale), so
that its KV cache holds what it would hold had it sampled that prefix itself.

Both are steppers of the one sampling engine (``flowar.sampling.run_scales``): the drafter's stepper serves
scales 1..N and the refiner's the rest, and the engine runs the refiner's prefill. Nothing here loops over
scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .outputs import autocast_context, check_output_type, decode_output
from .sampling import StepCounts, run_scales


# ---------------------------------------------------------------------------------------------- CoDe
@dataclass
class CollaborativeStats:
    """Who did what in a collaborative run, and how long it took."""

    draft_scales: int
    draft: StepCounts
    refine: StepCounts
    nfe_per_scale: list[int] = field(default_factory=list)  # head evaluations per scale (FlowAR; VAR: zeros)
    seconds: float = 0.0  # the whole run's wall time

    @property
    def forwards(self) -> int:
        return self.draft.forwards + self.refine.forwards


@dataclass
class CollaborativeOutput:
    """The sample in the family's own output type (FlowAR: ``SampleOutput``, VAR: ``VARSampleOutput``) and stats."""

    sample: object
    stats: CollaborativeStats


def check_draft_scales(draft_scales, num_scales: int) -> int:
    if isinstance(draft_scales, bool) or not isinstance(draft_scales, int) or not 0 <= draft_scales <= num_scales:
        raise ValueError(f"draft_scales must be an integer in [0, {num_scales}] (the models have {num_scales} "
                         f"scales), got {draft_scales!r}")
    return draft_scales


@torch.no_grad()
def collaborative_sample(draft_model, refine_model, class_labels=None, *, draft_scales: int, autoencoder=None,
                         batch_size: int | None = None, generator: torch.Generator | None = None,
                         noise: list[torch.Tensor] | None = None, sampling=None, refine_sampling=None,
                         refine_options: dict | None = None, progress: bool = False, **options) -> CollaborativeOutput:
    """Sample with ``draft_model`` on the first ``draft_scales`` scales and ``refine_model`` on the rest.

    Both models are of one family (FlowAR, or VAR with its tokenizer as ``autoencoder``) and share scales and
    token space (checked). sampling / options: the family's sampling options for both models; left unset,
    each model takes its own saved defaults (e.g. its guidance scale). refine_sampling / refine_options
    override them for the refiner only. ``draft_scales=0`` is the refiner alone and ``draft_scales=K`` the
    drafter alone, each equal to its own ``sample`` with the same generator or noise.
    """
    draft_model.check_compatible(refine_model)
    num_scales = len(draft_model.config.scales)
    check_draft_scales(draft_scales, num_scales)
    labels = draft_model.check_labels(class_labels, batch_size)
    draft_choice = draft_model.sampling_options(sampling, **options)
    refine_choice = refine_model.sampling_options(refine_sampling or sampling, **{**options, **(refine_options or {})})
    for model, choice in ((draft_model, draft_choice), (refine_model, refine_choice)):
        if model.sampled_scales(choice) != draft_model.config.scales:
            raise ValueError(f"scales {list(model.sampled_scales(choice))}: collaborative decoding samples the "
                             f"models' own scales {list(draft_model.config.scales)}")
    if noise is not None:
        draft_model.check_noise(noise, labels.shape[0])
    start = time.perf_counter()
    draft = draft_model.stepper(labels, draft_choice, timed=True)
    refine = refine_model.stepper(labels, refine_choice, timed=True)
    steppers = [draft] * draft_scales + [refine] * (num_scales - draft_scales)
    sample = run_scales(steppers, refine_model.canvas(labels.shape[0], autoencoder), generator=generator, noise=noise,
                        progress=progress)
    if draft_model.device.type == "cuda":
        torch.cuda.synchronize(draft_model.device)
    stats = CollaborativeStats(draft_scales=draft_scales, draft=draft.counts, refine=refine.counts,
                               nfe_per_scale=list(getattr(sample, "nfe_per_scale", [0] * num_scales)),
                               seconds=time.perf_counter() - start)
    return CollaborativeOutput(sample=sample, stats=stats)


class CollaborativePipeline:
    """Two pipelines of one family that decode together: ``draft_pipe`` drafts ``draft_scales`` scales,
    ``refine_pipe`` refines the rest; images come out through their shared VAE / tokenizer."""

    def __init__(self, draft_pipe, refine_pipe, draft_scales: int):
        if type(draft_pipe) is not type(refine_pipe) or not hasattr(refine_pipe, "autoencoder"):
            raise ValueError(f"draft_pipe and refine_pipe must be pipelines of the same kind, got "
                             f"{type(draft_pipe).__name__} and {type(refine_pipe).__name__}")
        draft_pipe.model.check_compatible(refine_pipe.model)
        check_same_decoder(draft_pipe.autoencoder, refine_pipe.autoencoder, name=refine_pipe.autoencoder_folder)
        check_draft_scales(draft_scales, len(refine_pipe.model.config.scales))
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
        :func:`collaborative_sample` (``refine_options`` included)."""
        check_output_type(output_type)
        refine = self.refine_pipe
        with autocast_context(self.device, autocast_dtype):
            result = collaborative_sample(self.draft_pipe.model, refine.model, class_labels,
                                          draft_scales=self.draft_scales, batch_size=batch_size,
                                          autoencoder=refine.autoencoder, **sample_kwargs)
        images = decode_output(refine.autoencoder, result.sample, output_type, decode_batch=decode_batch)
        return (images, result.stats) if return_stats else images


def check_same_decoder(a, b, *, name: str = "vae") -> None:
    """Raise ValueError unless ``a`` and ``b`` are one autoencoder: the same object, or equal type, scaling,
    config and weights (a latent of one decodes identically with the other)."""
    if a is b:
        return
    problems = []
    if type(a) is not type(b):
        problems.append(f"types {type(a).__name__} vs {type(b).__name__}")
    for attr in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "config"):
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
