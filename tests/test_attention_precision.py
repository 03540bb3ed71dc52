"""heads.layers.attention: bf16 training on a CPU attends in float32; everything else is plain SDPA."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flowar import FlowAR, get_preset
from flowar.var import VAR
from flowar.var_config import get_var_preset
from heads.layers import attention
from vae.msvq import MultiScaleVQVAE, get_msvq_preset

# the CPU flash kernels, forward and backward, and where each takes the query
CPU_FLASH_QUERY = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: 0,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 1}


class AttentionDtypes(TorchDispatchMode):
    """Records the query dtype of every CPU flash-attention kernel call, forward and backward."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CPU_FLASH_QUERY:
            self.dtypes.append(args[CPU_FLASH_QUERY[func]].dtype)
        return func(*args, **(kwargs or {}))


def _qkv(requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 21, 16, generator=g).bfloat16().requires_grad_(requires_grad) for _ in range(3)]


def test_bf16_training_attends_in_float32_under_autocast():
    q, k, v = _qkv(True)
    with AttentionDtypes() as seen:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = attention(q, k, v)
        ours.float().square().sum().backward()
    assert seen.dtypes == [torch.float32, torch.float32]  # autocast alone would run both kernels in bf16
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, exact.bfloat16(), rtol=0, atol=0)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16().float().square().sum().backward()
    for ours_grad, exact_grad in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours_grad, exact_grad, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_sampling_and_float32_keep_plain_sdpa(grad):
    q, k, v = _qkv(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # sampling: no grad, bf16 kernels
        torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    q32, k32, v32 = (t.float().requires_grad_(grad) for t in (q, k, v))
    torch.testing.assert_close(attention(q32, k32, v32, scale=0.3),
                               F.scaled_dot_product_attention(q32, k32, v32, scale=0.3), rtol=0, atol=0)


def _flowar_step(head):
    torch.manual_seed(0)
    model = FlowAR(get_preset("flowar-tiny", scales=(1, 2, 4), head=head, head_width=64)).train()
    return lambda: model(torch.randn(2, 4, 4, 4), torch.tensor([0, 1])).loss


def _var_step():
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(get_msvq_preset("tiny")).eval()
    config = get_var_preset("var-tiny", scales=tokenizer.scales, vocab_size=tokenizer.codebook_size,
                            code_dim=tokenizer.code_dim, depth=2, width=64, num_heads=4)
    model = VAR(config).train()
    indices = [torch.randint(0, config.vocab_size, (2, s, s)) for s in config.scales]
    return lambda: model(indices, torch.tensor([0, 1]), tokenizer=tokenizer).loss


@pytest.mark.parametrize("make_step", [lambda: _flowar_step("transformer-v1"), lambda: _flowar_step("transformer-v2"),
                                       _var_step], ids=["flowar-v1-head", "flowar-v2-head", "var"])
def test_every_attention_of_a_bf16_cpu_training_step_runs_in_float32(make_step):
    step = make_step()
    with AttentionDtypes() as seen:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step()
        loss.backward()
    assert len(seen.dtypes) >= 4  # forward and backward of at least two attention layers
    assert set(seen.dtypes) == {torch.float32}
