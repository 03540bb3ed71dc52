"""The categorical head (VAR) and its sampler: logits -> token ids with temperature, top-k, top-p and a generator.

Everything here works on logits of shape (..., V) and returns ids of shape (...). Order of operations:
temperature, then top-k, then top-p on what top-k kept, then one multinomial draw per position, which
consumes the generator exactly as VAR's sampler does (``torch.multinomial`` on the flattened (N, V)
probabilities, one sample with replacement), so both give the same ids for the same logits and seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_sampling_args(*, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> None:
    """Raise ``ValueError`` naming the argument when a sampling option is out of range."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must lie in [0, 1] (0 or 1 = off), got {top_p!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest value set to -inf (ties with it are kept).

    ``top_k`` of 0, or at least the vocabulary size, keeps everything.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits restricted to the nucleus: the fewest most likely tokens whose probability reaches ``top_p``.

    Going up from the least likely token, a token is dropped while the mass of it and everything below
    stays within ``1 - top_p``; the most likely token always survives. ``top_p`` of 0 or 1 keeps everything.
    """
    if top_p <= 0.0 or top_p >= 1.0:
        return logits
    ascending, order = logits.sort(dim=-1)
    mass_from_bottom = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_from_bottom <= 1.0 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled logits with top-k, then top-p applied (removed entries are -inf)."""
    check_sampling_args(top_k=top_k, top_p=top_p, temperature=temperature)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def draw_tokens(filtered: torch.Tensor, *, greedy: bool = False, generator: torch.Generator | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Ids (...) from already filtered logits (..., V): the argmax when ``greedy``, else one draw per
    position from softmax(filtered), in float32.

    The draw is a multinomial from ``generator``, or, with ``uniforms`` (...) in [0, 1), an inverse-CDF
    draw: the first token whose cumulative probability exceeds ``u`` times the total. Then each row's ids
    depend on its own uniforms alone, not on which batch it was drawn in (evaluation sets use this).
    """
    if greedy:
        return filtered.argmax(dim=-1)
    vocab = filtered.shape[-1]
    probs = filtered.float().softmax(dim=-1)
    if uniforms is not None:
        if tuple(uniforms.shape) != tuple(filtered.shape[:-1]):
            raise ValueError(f"uniforms must have shape {tuple(filtered.shape[:-1])}, got {tuple(uniforms.shape)}")
        cdf = probs.double().cumsum(dim=-1)
        target = uniforms.to(cdf).unsqueeze(-1) * cdf[..., -1:]
        ids = (cdf <= target).sum(dim=-1)  # tokens left of the first one whose cdf exceeds the target
        # Rounding may not push the target past the last token; never pick a token of zero probability.
        last_kept = vocab - 1 - (probs > 0).flip(-1).long().argmax(dim=-1)
        return torch.minimum(ids, last_kept)
    ids = torch.multinomial(probs.reshape(-1, vocab), num_samples=1, replacement=True, generator=generator)
    return ids.reshape(filtered.shape[:-1])


def sample_tokens(
    logits: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids (...) drawn from logits (..., V).

    temperature 0 is greedy decoding (the argmax, no draw); so is top_k=1 when the maximum is unique.
    The draw happens in float32 whatever the logits' dtype.
    """
    filtered = filter_logits(logits.float(), top_k=top_k, top_p=top_p, temperature=temperature)
    return draw_tokens(filtered, greedy=temperature == 0.0, generator=generator)


def gumbel_softmax(logits: torch.Tensor, tau: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft one-hot weights (..., V): softmax((logits + Gumbel noise) / tau), the noise drawn from ``generator``.

    VAR mixes code vectors with these weights instead of embedding the sampled ids when it samples "more
    smoothly" for pictures (never for FID). The noise is -log of Exp(1) draws, made with ``exponential_``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbel) / tau).softmax(dim=-1)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``(1 + t) * cond - t * uncond`` (t = 0: the conditional logits)."""
    if t == 0:
        return cond  # exactly, even where the null branch holds -inf
    return (1 + t) * cond - t * uncond


def smoothing_temperature(ratio: float) -> float:
    """Gumbel-softmax temperature of VAR's "more smooth" sampling at progress ratio = k / (K - 1)."""
    return max(0.27 * (1 - 0.95 * ratio), 0.005)


@dataclass
class CategoricalSample:
    """Ids drawn at one scale, and VAR's soft code weights when sampling "more smoothly"."""

    ids: torch.Tensor  # (B, N) long
    weights: torch.Tensor | None = None  # (B, N, V) Gumbel-softmax weights, or None


class CategoricalHead(nn.Linear):
    """The last layer of a token model, hidden states -> logits over a codebook, owning its loss and sampler.

    A plain ``nn.Linear`` (so a released ``head.weight`` / ``head.bias`` loads unchanged) with the
    cross-entropy loss and the guided, filtered draw of VAR.
    """

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy (B, L), in float32, of logits (B, L, V) against ids (B, L)."""
        batch = logits.shape[0]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(batch, -1)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, null_logits: torch.Tensor | None = None, *, guidance: float,
               top_k: int, top_p: float, temperature: float,
               generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None,
               smooth_ratio: float | None = None) -> CategoricalSample:
        """Draw ids (B, N) from logits (B, N, V), guided by ``null_logits`` with weight ``guidance`` (see
        :func:`cfg_mix`; 0 or no null logits: unguided), filtered (:func:`filter_logits`) and drawn
        (the options' defaults live in ``flowar.var_config.VARSampling``, which a model's sampling passes on)
        with :func:`draw_tokens`, from ``generator`` or by inverse CDF from ``uniforms`` (B, N).

        smooth_ratio: VAR's "more smooth" sampling at progress k / (K - 1): also return Gumbel-softmax weights
        of the sharpened filtered logits (noise from ``generator``), to mix code vectors with.
        """
        logits = logits.float()
        if null_logits is not None:
            logits = cfg_mix(logits, null_logits.float(), guidance)
        filtered = filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        ids = draw_tokens(filtered, greedy=temperature == 0, generator=generator, uniforms=uniforms)
        weights = None
        if smooth_ratio is not None:
            weights = gumbel_softmax(filtered * (1 + smooth_ratio), smoothing_temperature(smooth_ratio),
                                     generator=generator)
        return CategoricalSample(ids=ids, weights=weights)
