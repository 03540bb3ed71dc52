"""The plumbing of tools/parity_flowar.py, checked without the authors' checkout: argument handling, the
recording of random draws, the weight transfer and the comparison tables.

The reference here is ``tests/reference_standin.py``, a stand-in that offers the released model's interface
on top of our own FlowAR, so agreement with it shows that the harness hands over weights and draws and
compares what it says; it shows nothing about parity. Parity itself is shown by running the tool against
the authors' checkout (docs/parity.md).
"""

import sys

import pytest
import torch

import reference_standin
from tools import parity_flowar as parity
from flowar import get_preset

THIS_MODULE = sys.modules[__name__]  # for the draw-recording test


@pytest.fixture
def pair():
    torch.manual_seed(0)
    config = get_preset("flowar-tiny", label_drop=0.0)
    reference = reference_standin.FlowAR.from_config(config)
    with torch.no_grad():  # no zero-initialised head output: every velocity is non-trivial
        reference.flownet.final_layer.linear.weight.normal_(std=0.1)
    ours, transfer = parity.ours_from_reference(reference, config)
    assert transfer.missing == [] and transfer.unexpected == [] and transfer.copied == len(reference.state_dict())
    latents = torch.randn(2, config.token_dim, 8, 8)
    labels = torch.tensor([3, 7])
    return reference, ours, latents, labels


def run_both(reference, ours, latents, labels):
    rows = parity.compare_training(reference, ours, latents, labels, namespaces=[reference_standin])
    sample_rows, counts = parity.compare_sampling(reference, ours, labels, cfg=2.0, guidance=0.9, steps=10,
                                                  namespaces=[reference_standin])
    return rows + sample_rows, counts


def test_reference_argument_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parity.parse_args(["--preset", "flowar-s"])
    assert exit_info.value.code == 2
    assert "--reference" in capsys.readouterr().err


def test_reference_without_models_folder_is_a_clear_error(tmp_path, capsys):
    assert parity.main(["--reference", str(tmp_path), "--preset", "flowar-s"]) == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "models/flowar.py" in err


def test_cfg_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        parity.parse_args(["--reference", ".", "--preset", "flowar-s", "--cfg", "1"])
    assert "--cfg" in capsys.readouterr().err


def test_record_draws_records_global_rng_draws_and_restores_the_namespace():
    torch.manual_seed(5)
    expected = (torch.rand(3), torch.randn(2, 2))
    torch.manual_seed(5)
    with parity.record_draws([THIS_MODULE]) as draws:
        got = (torch.rand(3), torch.randn(2, 2))
        assert torch.zeros(1).sum() == 0  # anything else passes through
    assert THIS_MODULE.__dict__["torch"] is sys.modules["torch"]  # the real module is back
    assert [name for name, _ in draws] == ["rand", "randn"]
    for (_, recorded), value, reference in zip(draws, got, expected):
        assert torch.equal(recorded, value) and torch.equal(value, reference)


def test_same_weights_and_draws_agree(pair):
    rows, counts = run_both(*pair)
    assert [r.name.split(",")[0] for r in rows][:3] == ["training loss (total)", "z", "head v"]
    assert len(rows) == 2 + 4 + 1  # loss, z, one velocity per scale of the tiny pyramid, latents
    assert all(r.ok(1e-5) for r in rows), parity.format_table(rows, 1e-5)
    # The stand-in samples with our sampler, so the hook on its head must count exactly our work.
    assert (counts.ref_nfe, counts.ref_rows) == (counts.ours_nfe, counts.ours_rows)
    # 10 steps on the released grid: 5 + 6 points, 10 intervals; the doubled batch at each of them
    assert counts.ref_rows_formula == 10 * 4 * (1 + 4 + 16 + 64)


@pytest.mark.parametrize("part", ["head", "transformer"])
def test_a_weight_difference_fails(pair, part):
    reference, ours, latents, labels = pair
    with torch.no_grad():
        if part == "head":
            ours.flownet.final_layer.linear.bias.add_(1e-2)
        else:
            ours.decoder_norm.weight.mul_(1.01)
    rows, _ = run_both(reference, ours, latents, labels)
    failed = [r.name for r in rows if not r.ok(parity.DEFAULT_TOLERANCE)]

    def fails(prefix):
        return any(name.startswith(prefix) for name in failed)

    assert fails("training loss") and fails("sampled latents")
    assert fails("head v") == (part == "head")  # the head is compared on their inputs: z plays no part
    assert fails("z,") == (part == "transformer")


def test_torchvision_stub_is_inert():
    # Built directly, not installed: the test process's imports stay untouched.
    finder = parity._StubTorchvision()
    spec = finder.find_spec("torchvision.ops.misc")
    assert spec is not None and finder.find_spec("torchaudio") is None
    module = finder.create_module(spec)
    mode = module.InterpolationMode  # class attributes (enum members) resolve at import time ...
    assert mode.BICUBIC is not None
    with pytest.raises(RuntimeError, match="stubbed"):  # ... but nothing can be built from the stub
        module.FrozenBatchNorm2d(8)
