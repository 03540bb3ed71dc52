"""torch.compile for sampling and training: which modules compile, that every entry point passes the option
on, and (slow: inductor compiles for tens of seconds on a CPU) that compiled and eager runs agree."""

import pytest
import torch
from conftest import gen, tiny_flowar, tiny_flowar_pipeline, tiny_var, tiny_tokenizer

from flowar.cli import main as cli_main
from heads.networks import FlowTransformerHead


@pytest.fixture
def compile_calls(monkeypatch):
    """Record nn.Module.compile calls instead of compiling: (module, kwargs) pairs."""
    calls = []
    record = lambda self, **kw: calls.append((self, kw))  # noqa: E731
    monkeypatch.setattr(torch.nn.Module, "compile", record)
    monkeypatch.setattr(FlowTransformerHead, "compile", record)  # it compiles its arithmetic only, see below
    return calls


def test_flowars_head_compiles_its_arithmetic_and_keeps_the_rope_cache_eager(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)
    head = tiny_flowar().flownet
    head.compile(dynamic=None)
    (fn, kw), = compiled
    assert fn.__func__ is FlowTransformerHead._velocity and kw == {"dynamic": None}
    x, cond = torch.randn(2, 16, head.token_dim), torch.randn(2, 16, head.cond_dim)
    head(x, torch.rand(2), cond)  # the table cache is filled outside the compiled function
    assert list(head.res_blocks[0].attn.rope._tables) == [((4,), "cpu")]


def test_flowar_compiles_its_head_and_block_mlps(compile_calls):
    model = tiny_flowar()
    keys = list(model.state_dict())
    assert model.compile_for_sampling() is model
    compiled = [module for module, _ in compile_calls]
    blocks = [*model.encoder_blocks, *model.decoder_blocks]
    assert compiled == [model.flownet, *(block.mlp for block in blocks)]
    assert all(kw == {"mode": "default", "dynamic": None} for _, kw in compile_calls)  # a CPU model
    assert list(model.state_dict()) == keys


def test_var_compiles_its_feed_forwards_and_options_pass_through(compile_calls):
    model = tiny_var()
    model.compile_for_sampling(mode="max-autotune", dynamic=False)
    assert [module for module, _ in compile_calls] == [block.ffn for block in model.blocks]
    assert all(kw == {"mode": "max-autotune", "dynamic": False} for _, kw in compile_calls)


def test_pipeline_cli_and_eval_sample_compile_when_asked(compile_calls, tmp_path):
    pipe = tiny_flowar_pipeline()
    assert pipe.compile() is pipe and compile_calls[0][0] is pipe.model.flownet
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
def test_compiled_flowar_sampling_matches_eager():
    model = tiny_flowar()
    labels = [0, 3]
    eager = model.sample(labels, steps=2, guidance_scale=2.0, generator=gen(1))
    model.compile_for_sampling()
    compiled = model.sample(labels, steps=2, guidance_scale=2.0, generator=gen(1))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(compiled, model.sample(labels, steps=2, guidance_scale=2.0, generator=gen(2)))


@pytest.mark.slow
def test_compiled_var_sampling_draws_the_same_tokens():
    model, tokenizer = tiny_var(), tiny_tokenizer(0)
    eager = model.sample([1, 4], tokenizer=tokenizer, temperature=0.0, generator=gen(1))
    model.compile_for_sampling()
    compiled = model.sample([1, 4], tokenizer=tokenizer, temperature=0.0, generator=gen(1))
    assert all(torch.equal(a, b) for a, b in zip(compiled.indices, eager.indices))


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

