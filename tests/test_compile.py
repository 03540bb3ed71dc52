"""torch.compile for sampling and training: compiled sampling gives eager's samples and runs most of its
arithmetic in compiled graphs, every entry point passes the option on, and (slow: inductor compiles for tens
of seconds on a CPU) inductor's kernels agree with eager."""

import functools

import pytest
import torch
from conftest import gen, tiny_flowar, tiny_flowar_pipeline, tiny_tokenizer, tiny_var
from torch.utils.flop_counter import FlopCounterMode

from flowar.cli import main as cli_main


def flowar_sample(model):
    return model.sample([0, 3], steps=2, guidance_scale=2.0, generator=gen(1))


def var_sample(model):
    return model.sample([1, 4], tokenizer=tiny_tokenizer(0), temperature=0.0, generator=gen(1))


FAMILIES = {"flowar": (tiny_flowar, flowar_sample), "var": (tiny_var, var_sample)}


def tensors(sample) -> list[torch.Tensor]:
    """The tensors a sampling call returns (FlowAR's latents; VAR's token maps and feature map)."""
    if isinstance(sample, torch.Tensor):
        return [sample]
    return [*sample.indices, sample.f_hat] if hasattr(sample, "indices") else [sample.latents]


@pytest.fixture
def clean_dynamo():
    torch._dynamo.reset()  # graphs cached by an earlier test would hide this test's compiles
    yield
    torch._dynamo.reset()


@pytest.fixture
def compile_calls(monkeypatch):
    """Record torch.compile's options instead of compiling (the function runs as it is)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_sampling_matches_eager_and_runs_most_of_its_arithmetic_compiled(family, monkeypatch, clean_dynamo,
                                                                                  one_thread):
    build, sample = FAMILIES[family]
    model = build()
    with FlopCounterMode(display=False) as counter:
        eager = tensors(sample(model))
    total = counter.get_total_flops()

    # Dynamo's capture, with each captured graph run as it is and its FLOPs counted: what sampling actually
    # sends through compiled code, not a list of modules. Inductor's kernels are the slow test's business.
    compiled_flops = []

    def counting_backend(graph, example_inputs):
        def run(*args):
            with FlopCounterMode(display=False) as inside:
                out = graph(*args)
            compiled_flops.append(inside.get_total_flops())
            return out
        return run

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    keys = list(model.state_dict())
    assert model.compile_for_sampling() is model
    assert list(model.state_dict()) == keys  # checkpoints save and load as before
    # A static graph, then one per dimension that varies (tokens per scale, the batch in and out of the
    # guidance interval). A compiled function that recompiled at every one of the four scales would pass
    # this limit and fall back to eager, which the FLOP share below would show.
    with torch._dynamo.config.patch(recompile_limit=3):
        compiled = tensors(sample(model))

    # The captured graphs run the same kernels in the same order as eager code, so the samples are
    # bit-identical.
    assert len(compiled) == len(eager) and all(map(torch.equal, compiled, eager))
    # At least three fifths of the arithmetic: what may stay eager is attention around the KV cache, whose
    # Python-side bookkeeping would break graphs (about a third of VAR's FLOPs, a fifth of FlowAR's).
    share = sum(compiled_flops) / total
    assert share >= 0.6, f"{share:.0%} of sampling's FLOPs ran compiled ({len(compiled_flops)} graph calls)"


def test_sampling_compiles_with_the_devices_mode_and_passes_options_on(compile_calls):
    model = tiny_var()
    model.compile_for_sampling()
    assert compile_calls and all(kw == {"mode": "default", "dynamic": None} for kw in compile_calls)  # on a CPU
    compile_calls.clear()
    model.compile_for_sampling(mode="max-autotune", dynamic=False)
    assert compile_calls and all(kw == {"mode": "max-autotune", "dynamic": False} for kw in compile_calls)


def test_pipeline_cli_and_eval_sample_compile_when_asked(compile_calls, tmp_path):
    pipe = tiny_flowar_pipeline()
    assert pipe.compile() is pipe and compile_calls
    pipe.save_pretrained(tmp_path / "flowar")
    compile_calls.clear()
    args = [str(tmp_path / "flowar"), "--labels", "1", "--steps", "2", "--out", str(tmp_path / "g.png"),
            "--device", "cpu"]
    assert cli_main(args) == 0 and not compile_calls
    assert cli_main([*args, "--compile"]) == 0 and compile_calls

    from eval.sample import main as sample_main

    compile_calls.clear()
    assert sample_main([str(tmp_path / "flowar"), "--out", str(tmp_path / "s"), "--per-class", "1", "--num-classes",
                        "2", "--steps", "2", "--compile", "--no-progress", "--device", "cpu"]) == 0
    assert compile_calls


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_sampling_agrees_with_eager(family, clean_dynamo):
    build, sample = FAMILIES[family]
    model = build()
    eager = tensors(sample(model))
    model.compile_for_sampling()
    compiled = tensors(sample(model))
    # Fused kernels sum in another order: float32 rounding of about 1e-6 per operation, carried through the
    # ODE steps and the scales (FlowAR's tiny model lands near 1e-5 relative). VAR samples greedily from a
    # sharpened head, whose margins rounding does not overturn; on its integer token maps these tolerances
    # mean equality.
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager, compiled = (tiny_flowar(attn_dropout=0.0, proj_dropout=0.0) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    latents = torch.randn(4, 4, 8, 8, generator=gen(0))
    labels = torch.tensor([0, 1, 2, 3])
    for model in (eager, compiled):
        model.train()
        model(latents, labels, generator=gen(3)).loss.backward()
    torch.testing.assert_close(compiled(latents, labels, generator=gen(3)).loss,
                               eager(latents, labels, generator=gen(3)).loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):  # fused kernels round differently
        scale = float(a.grad.abs().max())
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
