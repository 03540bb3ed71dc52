"""The engine's per-scale callback: an application's progress bar and its way to cancel a run."""

import pytest
import torch
from conftest import gen


class Stop(Exception):
    pass


@pytest.mark.parametrize("family", ["flowar", "var"])
def test_on_scale_reports_every_scale_in_order_and_leaves_the_images_unchanged(family, flowar_pipe, var_pipe):
    pipe = flowar_pipe if family == "flowar" else var_pipe
    calls = []
    plain = pipe([1, 2], generator=gen(3), output_type="np")
    seen = pipe([1, 2], generator=gen(3), output_type="np", on_scale=lambda k, n: calls.append((k, n)))
    n = len(pipe.model.config.scales)
    assert calls == [(k, n) for k in range(n)]
    assert (plain == seen).all()


def test_an_exception_in_on_scale_stops_the_run_before_the_next_scale(flowar_pipe, monkeypatch):
    model = flowar_pipe.model
    passes = []
    original = model.stepper

    def counting_stepper(*args, **kwargs):
        stepper = original(*args, **kwargs)
        feed = stepper.feed
        stepper.feed = lambda *a, **k: (passes.append(1), feed(*a, **k))[1]
        return stepper

    monkeypatch.setattr(model, "stepper", counting_stepper)

    def stop_after_second(k, n):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        flowar_pipe([1], generator=gen(0), on_scale=stop_after_second)
    assert len(passes) == 2 < len(model.config.scales)
    # The pipeline is left usable: a later run samples every scale.
    passes.clear()
    flowar_pipe([1], generator=gen(0), output_type="latent")
    assert len(passes) == len(model.config.scales)


def test_inpainting_reports_its_scales_too(flowar_pipe):
    side = flowar_pipe.model.config.scales[-1] * flowar_pipe.autoencoder.downsample
    image = torch.rand(1, 3, side, side)
    mask = torch.ones(side, side)
    mask[: side // 2] = 0
    calls = []
    flowar_pipe.inpaint(image, mask, 1, generator=gen(0), on_scale=lambda k, n: calls.append(k))
    assert calls == list(range(len(flowar_pipe.model.config.scales)))
