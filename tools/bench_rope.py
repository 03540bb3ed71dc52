"""What RoPE costs in eager sampling on this machine: ``heads.layers.apply_rope`` (one complex product over the
channel pairs) against the real form it keeps for torch.compile (x cos + rotated x sin), side by side in one
process, on the strided query view of a qkv output as the attention layers pass it; then one head evaluation of
the demo's FlowAR at its 8x8 scale (batch 100) with each form.

    python -m tools.bench_rope

Prints each one's fastest of 30 interleaved rounds in microseconds, and their ratio
(docs/benchmarks.md#rope-as-a-complex-product).
"""

from unittest import mock

import torch

import heads.networks
from eval.machine import fastest_in_turn
from flowar import FlowAR, get_preset
from heads.layers import Rope2D, apply_rope, rope_real_form

DEMO_HEAD = dict(width=128, num_heads=4, head_width=128, head_depth=4)


def fastest_us(first, second, *, rounds: int = 30) -> tuple[float, float]:
    """The fastest call of each of two functions, called in turn, in microseconds."""
    seconds = fastest_in_turn([lambda _: first(), lambda _: second()], rounds)
    return 1e6 * seconds[0], 1e6 * seconds[1]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | shape | real form (us) | complex product (us) | ratio |")
    print("|---|---|---|---|---|")
    for batch, side, num_heads in ((100, 8, 2), (2, 16, 12)):
        tokens, width = side * side, num_heads * 64
        cos, sin = Rope2D(64).tables((side,), "cpu")
        qkv = torch.randn(batch, tokens, 3 * width)
        q = qkv.view(batch, tokens, 3, num_heads, 64).permute(2, 0, 3, 1, 4)[0]
        real, cplx = fastest_us(lambda: rope_real_form(q, cos, sin), lambda: apply_rope(q, cos, sin))
        print(f"| RoPE of one query view | {tuple(q.shape)} | {real:.0f} | {cplx:.0f} | {real / cplx:.2f}x |")

    torch.manual_seed(0)
    head = FlowAR(get_preset("flowar-tiny", **DEMO_HEAD)).eval().flownet
    batch, tokens = 100, 64
    x, cond, t = torch.randn(batch, tokens, head.token_dim), torch.randn(batch, tokens, head.cond_dim), torch.ones(batch)
    with torch.no_grad():
        velocity = head.conditioned(cond)

        def with_real_form():
            with mock.patch.object(heads.networks, "apply_rope", rope_real_form):
                velocity(x, t)

        real, cplx = fastest_us(with_real_form, lambda: velocity(x, t))
    print(f"| the demo head's evaluation at 8x8 | batch {batch} | {real:.0f} | {cplx:.0f} | {real / cplx:.2f}x |")


if __name__ == "__main__":
    main()
