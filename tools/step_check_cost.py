"""What an input check costs at every ODE step of the flow head: the velocity of one step with and without the
head's own input check (``heads.networks._check_inputs``), timed side by side in one process.

    python -m tools.step_check_cost

The head's public ``forward`` checks its inputs; the per-scale velocity that a solve calls at every step
(``head.conditioned(cond)``) does not, since ``heads.flow.sample_flow`` checks a solve's inputs once. This
prints, per head and batch at the 8x8 scale, the median microseconds of a step with the check, without it, and
of the check alone (docs/benchmarks.md#per-step-checks).
"""

import torch
from torch.utils.benchmark import Timer

from flowar import FlowAR, get_preset
from heads.networks import _check_inputs

HEADS = {"flowar-tiny": {}, "the demo's FlowAR": dict(width=128, num_heads=4, head_width=128, head_depth=4)}


def main() -> None:
    print("| model | batch | step with check (us) | step without (us) | check alone (us) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, overrides in HEADS.items():
        torch.manual_seed(0)
        head = FlowAR(get_preset("flowar-tiny", **overrides)).eval().flownet
        for batch in (1, 16):
            x = torch.randn(batch, 64, head.token_dim)
            cond = torch.randn(batch, 64, head.cond_dim)
            t = torch.full((batch,), 0.5)
            with torch.no_grad():
                env = dict(velocity=head.conditioned(cond), x=x, t=t, cond=cond, head=head, check=_check_inputs)
                checked = "check(x, t, cond, head.token_dim, head.cond_dim); velocity(x, t)"
                with_check = Timer(checked, globals=env).blocked_autorange(min_run_time=2).median
                without = Timer("velocity(x, t)", globals=env).blocked_autorange(min_run_time=2).median
                alone = Timer("check(x, t, cond, head.token_dim, head.cond_dim)", globals=env).blocked_autorange(
                    min_run_time=1).median
            print(f"| {name} | {batch} | {with_check * 1e6:.0f} | {without * 1e6:.0f} | {alone * 1e6:.1f} | "
                  f"{with_check / without:.3f}x |")


if __name__ == "__main__":
    main()
