"""Dead-code revival for the multi-scale VQ tokenizer: track which codes each scale picks, re-initialise the rest.

All re-initialisations draw from vectors quantised in the current batch:

- a code that no scale has picked in the last ``dead_after`` steps is re-initialised: a scale is drawn uniformly,
  then one of that scale's (pooled residual) vectors. Drawing the scale first matters: scale 1 has one vector per
  image against 64 at scale 8, so drawing among all vectors would hand nearly every dead code to the finest scale.
- the per-scale floor (``min_scale_use``): one codebook serves every scale and the finest scale keeps every
  code busy, so after the first steps no code is dead anywhere while the coarse scales collapse onto a few codes
  (measured on MNIST, V 64, VAR's beta 0.25, no floor: 2 codes used at scale 1, 6 at scale 2, 0 resets in 600
  steps). So when fewer than that share of the codes (capped by the tokens the scale sees, see
  ``DeadCodeTracker``) were picked at a scale in the window, the least used codes move to that scale. Revived
  codes count as picked during their grace window and some drift back to the finer scales, so the floor is set
  above the use we ask of the held-out set.
- vectors are drawn with probability proportional to their squared distance to the nearest code (k-means++
  seeding); the Adam moments of a re-initialised row are zeroed.
"""

from __future__ import annotations

import math

import torch

from vae.msvq import MultiScaleVQVAE


class DeadCodeTracker:
    """Which codes each scale has picked lately, and which codes to re-initialise.

    ``idle[k, c]``: steps since scale k last picked code c. A code is *live at scale k* while that is below
    ``dead_after``. Two kinds of re-initialisation, both from vectors quantised in the current batch:

    - dead codes: live at no scale; each goes to a uniformly drawn scale.
    - the per-scale floor (``min_scale_use`` > 0): when fewer than ``min_scale_use * min(V, T_k / 4)`` codes are live
      at scale k, T_k being the tokens scale k saw in the last ``dead_after`` steps, the missing number of codes not
      live at k go to scale k, the least used ones first (by their largest recent share of any scale's tokens). The
      T_k / 4 cap keeps the floor reachable where a scale sees few tokens (scale 1 of a batch of 16 over 50 steps:
      800 tokens, so at most 0.9 x 200 codes are asked for, not 0.9 x 4096). One codebook serves every scale and
      the finest one, with 4x to 64x more tokens than the others, keeps every code busy: without the floor no code
      ever dies and the coarse scales stay collapsed onto a few codes. Codes moved to a coarse scale mostly stay in
      use at the finer ones too (their vectors spread over the same region).
    """

    def __init__(self, num_scales: int, codebook_size: int, dead_after: int, *, min_scale_use: float = 0.0):
        if isinstance(dead_after, bool) or not isinstance(dead_after, int) or dead_after < 1:
            raise ValueError(f"dead_after must be an int >= 1, got {dead_after!r}")
        if not 0.0 <= min_scale_use <= 1.0:
            raise ValueError(f"min_scale_use must be in [0, 1], got {min_scale_use}")
        self.dead_after, self.min_scale_use = dead_after, min_scale_use
        self.idle = torch.zeros(num_scales, codebook_size, dtype=torch.long)
        self.share = torch.zeros(num_scales, codebook_size)  # EMA of each code's share of a scale's tokens
        self.tokens = torch.zeros(num_scales, dtype=torch.long)  # tokens per step at each scale

    def update(self, counts: torch.Tensor) -> None:
        """Record one step's hits ``counts`` (K, V)."""
        counts = counts.detach().cpu()
        self.idle = torch.where(counts > 0, torch.zeros_like(self.idle), self.idle + 1)
        self.tokens = counts.sum(1)
        self.share.mul_(0.9).add_(0.1 * counts / self.tokens[:, None].clamp_min(1))

    def live(self) -> torch.Tensor:
        """(K, V) bool: picked by scale k within the last ``dead_after`` steps."""
        return self.idle < self.dead_after

    def plan(self, generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
        """[(scale k, codes to re-initialise from scale k's vectors)]; dead codes first, then the floors."""
        live = self.live()
        num_scales, vocab = live.shape
        dead = torch.nonzero(~live.any(0)).flatten()
        target = torch.randint(num_scales, (dead.numel(),), generator=generator)
        plan = [(k, dead[target == k]) for k in range(num_scales)]
        taken = torch.zeros(vocab, dtype=torch.bool)
        taken[dead] = True
        if self.min_scale_use > 0:
            value = self.share.max(0).values  # how much a code matters to the scale that uses it most
            for k in range(num_scales):
                usable = min(vocab, self.dead_after * int(self.tokens[k]) / 4)
                need = math.ceil(self.min_scale_use * usable) - int(live[k].sum()) - int((target == k).sum())
                if need <= 0:
                    continue
                candidates = torch.nonzero(~live[k] & ~taken).flatten()
                chosen = candidates[value[candidates].argsort()[:need]]
                taken[chosen] = True
                plan.append((k, chosen))
        return [(k, codes) for k, codes in plan if codes.numel()]

    def revived(self, scale: int, codes: torch.Tensor) -> None:
        """A code just set to a vector of ``scale`` gets ``dead_after`` steps there before it counts as unused."""
        self.idle[scale, codes] = 0


@torch.no_grad()
def reinit_codes(
    model: MultiScaleVQVAE,
    codes: torch.Tensor,
    vectors: torch.Tensor,
    *,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Set ``codes`` (N,) to rows of ``vectors`` (M, C) and zero those codes' Adam moments in ``optimizer``.

    Rows are drawn without replacement (with, if M < N) with probability proportional to their squared distance to
    the nearest current code (k-means++ seeding): a new code lands where the codebook serves the vectors worst, so it
    wins vectors of its own instead of sitting in an existing code's cell. Returns N.
    """
    if codes.numel() == 0:
        return 0
    codebook = model.quantize.embedding.weight
    distance = torch.cdist(vectors.float(), codebook.float()).min(1).values.square().cpu()
    weights = distance + 1e-12 * distance.max().clamp_min(1e-12)  # every row stays possible
    rows = torch.multinomial(weights, codes.numel(), replacement=vectors.shape[0] < codes.numel(), generator=generator)
    model.reset_codes(codes, vectors[rows.to(vectors.device)])
    if optimizer is not None:
        state = optimizer.state.get(codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][codes.to(state[key].device)] = 0
    return int(codes.numel())


def revive_codes(
    model: MultiScaleVQVAE,
    tracker: DeadCodeTracker,
    residuals: list[torch.Tensor],
    *,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[int]:
    """Carry out ``tracker.plan``: codes to scale k become random rows of ``residuals[k]`` (the vectors quantised
    at scale k this step). Returns how many codes went to each scale."""
    moved = [0] * len(residuals)
    for k, codes in tracker.plan(generator):
        moved[k] += reinit_codes(model, codes, residuals[k], generator=generator, optimizer=optimizer)
        tracker.revived(k, codes)
    return moved
