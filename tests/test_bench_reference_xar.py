"""The sampling benchmark against the authors' xAR code (tools.bench_reference sample with an xar-* preset): the
preset picks the reference, its fp32 rows sample from the reference's recorded draws, and a wrong pairing of
preset and checkout is refused by name. The reference is ``tests/reference_standin_xar.py`` in a stand-in
checkout; its sampler is ours, so fp32 at the same settings matches it once the harness hands its draws over."""

import pytest
import torch

from conftest import fake_flowar_checkout, fake_xar_checkout
from tools import bench_reference


def table_of(out: str) -> list[dict]:
    lines = out.splitlines()
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("| impl")).strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines
            if line.startswith("| authors") or line.startswith("| ours")]


def test_xar_rows_sample_from_the_reference_draws(tmp_path, capsys):
    """Their row runs the first --steps entry; our SDE row at that count takes every draw of theirs (the initial
    noise and one per step of each cell), the Euler row the initial noise only."""
    checkout = fake_xar_checkout(tmp_path / "xAR")
    assert bench_reference.main(["sample", "--preset", "xar-b", "--batch", "1", "--small", "--reference", checkout,
                                 "--repeats", "1", "--steps", "3", "--solver", "sde,euler"]) == 0
    out = capsys.readouterr().out
    table = table_of(out)
    assert [(r["implementation"], r["precision"], r["solver"], r["steps"]) for r in table] == [
        ("authors", "fp32", "sde", "3"), ("ours", "fp32", "sde", "3"), ("ours", "fp32", "euler", "3")]
    assert [int(r["head NFE"]) for r in table] == [12, 12, 12]  # four cells
    assert float(table[1]["vs authors' latents"]) < 1e-4  # tools.parity_xar's sampling bound
    assert float(table[2]["vs authors' latents"]) > 1e-3  # the same start, no noise on the way
    assert table[0]["vs authors"] == "1" and all(r["vs authors"].endswith("x") for r in table[1:])
    assert "% peak" in out and "speed against the authors' fp32: fp32 sde 3 steps" in out


def test_each_row_takes_the_reference_draws_it_shares():
    """Per cell: the initial noise, then one draw per SDE step; an SDE on another grid shares none."""
    noise = [torch.randn(2, 5, 4, 3) for _ in range(4)]
    assert bench_reference.xar_shared_noise(noise, 5, {"solver": "sde", "steps": 5}) is noise
    assert bench_reference.xar_shared_noise(noise, 5, {"solver": "sde", "steps": 4}) is None
    for solver, steps in (("euler", 5), ("euler", 2), ("dopri5", None)):
        shared = bench_reference.xar_shared_noise(noise, 5, {"solver": solver, "steps": steps})
        assert all(torch.equal(s, n[:, :1]) for s, n in zip(shared, noise, strict=True))


@pytest.mark.parametrize("preset, checkout, extra, message", [
    ("xar-b", "flowar", [], "OliverRensu/xAR"),  # an xAR preset is timed against the xAR checkout
    ("flowar-s", "xar", [], "models/flowar.py"),
    ("xar-b", "xar", ["--steps", "2"], "--steps"),  # their sampler needs 3 steps
    ("xar-b", "xar", ["--steps", "40/20"], "--steps"),  # one count for every cell
    ("xar-b", "xar", ["--solver", "flow-map"], "--solver"),
    ("xar-tiny", "xar", [], "--reference"),
])
def test_bad_xar_reference_arguments_are_named(tmp_path, capsys, preset, checkout, extra, message):
    path = (fake_xar_checkout if checkout == "xar" else fake_flowar_checkout)(tmp_path / checkout)
    with pytest.raises(SystemExit):
        bench_reference.main(["sample", "--preset", preset, "--reference", path, *extra])
    err = capsys.readouterr().err
    assert message in err
    if checkout != {"xar-b": "xar", "flowar-s": "flowar"}.get(preset, checkout):
        assert "--reference" in err and preset in err
