"""CUDA checks, run by tools/gpu_check.sh on a GPU machine (every test here is skipped without CUDA; the CPU
suite covers the same code paths on the CPU): sampling on the GPU matches the CPU, bf16 autocast stays finite,
CUDA-graph compiled sampling matches eager, and a training step runs."""

import pytest
import torch
from conftest import gen, tiny_flowar, tiny_var, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_flowar_sampling_on_cuda_matches_the_cpu(monkeypatch):
    model = tiny_flowar()
    noise = model.noise_from_seeds([0, 1])
    cpu = model.sample([2, 5], noise=noise, steps=4, guidance_scale=2.0)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 against fp32, for this test only
    gpu = model.cuda().sample([2, 5], noise=[n.cuda() for n in noise], steps=4, guidance_scale=2.0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_sampling_is_finite_and_close():
    model = tiny_flowar().cuda()
    noise = [n.cuda() for n in model.noise_from_seeds([0, 1])]
    fp32 = model.sample([2, 5], noise=noise, steps=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model.sample([2, 5], noise=noise, steps=4)
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.slow
def test_cuda_graph_compiled_sampling_matches_eager():
    model = tiny_flowar().cuda()
    noise = [n.cuda() for n in model.noise_from_seeds([0, 1])]
    eager = model.sample([2, 5], noise=noise, steps=4, guidance_scale=2.0)
    model.compile_for_sampling()  # mode "reduce-overhead" on CUDA
    for _ in range(2):  # the second call replays the recorded graphs
        compiled = model.sample([2, 5], noise=noise, steps=4, guidance_scale=2.0)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_var_sampling_on_cuda_draws_the_cpu_tokens():
    model, tokenizer = tiny_var(), tiny_tokenizer(0)
    cpu = model.sample([1, 4], tokenizer=tokenizer, temperature=0.0, generator=gen(1))
    gpu = model.cuda().sample([1, 4], tokenizer=tokenizer.cuda(), temperature=0.0,
                              generator=torch.Generator("cuda").manual_seed(1))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu.indices, cpu.indices))


def test_training_step_on_cuda():
    model = tiny_flowar(attn_dropout=0.0, proj_dropout=0.0).cuda().train()
    latents = torch.randn(4, 4, 8, 8, device="cuda")
    loss = model(latents, torch.tensor([0, 1, 2, 3], device="cuda")).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.flownet.parameters())
