"""Fixtures and builders shared by several test modules: tiny random autoencoders, models and pipelines.

The builders are plain functions (``from conftest import tiny_vae``) for tests that need several differently
seeded or configured objects; the fixtures wrap the common ones. Everything is random and small enough for
a CPU test: FlowAR's pipeline makes 16x16 images from 8x8x4 latents, VAR's makes 8x8 images from token maps
of sides 1, 2, 3, 4 (msvq's "tiny" tokenizer, 32 codes of 8 channels).
"""

import pytest
import torch
from diffusers import AutoencoderKL

from flowar import FlowAR, FlowARPipeline, VARPipeline, get_preset, get_var_preset
from flowar.var import VAR
from vae import DiffusersVAE
from vae.msvq import MultiScaleVQVAE, get_msvq_preset


@pytest.fixture
def one_thread():
    """Run the test on one torch thread. torchrun runs each worker with OMP_NUM_THREADS=1, so tests that
    compare bits with a worker need it; tiny matmuls are also much faster on one thread when other
    processes share the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- FlowAR
def tiny_autoencoder_kl(seed: int | None = 0, **config) -> AutoencoderKL:
    """A random two-level diffusers AutoencoderKL: (B, 3, 16, 16) images <-> (B, 4, 8, 8) latents.

    seed: ``torch.manual_seed`` before building it (None: the global generator as it is). config: overrides of
    the diffusers config (e.g. ``shift_factor``, or ``block_out_channels`` with matching block types).
    """
    if seed is not None:
        torch.manual_seed(seed)
    config = {
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 4,
        "sample_size": 16,
        "scaling_factor": 0.5,
        **config,
    }
    return AutoencoderKL(**config).eval()


def tiny_vae(seed: int | None = 0) -> DiffusersVAE:
    """:func:`tiny_autoencoder_kl` behind the library's VAE protocol (downsample 2, scaling 0.5)."""
    return DiffusersVAE(tiny_autoencoder_kl(seed)).eval()


def tiny_flowar(seed: int | None = 0, **overrides) -> FlowAR:
    """A random flowar-tiny (scales 1, 2, 4, 8; 4 channels; 10 classes; guidance 2.0 and 10 steps saved),
    with ``overrides`` of its config, e.g. ``sampling={"guidance_scale": 3.0}``."""
    if seed is not None:
        torch.manual_seed(seed)
    return FlowAR(get_preset("flowar-tiny", **overrides)).eval()


def tiny_flowar_pipeline(seed: int = 0, **overrides) -> FlowARPipeline:
    """:func:`tiny_flowar` with :func:`tiny_vae`, both drawn after one ``torch.manual_seed(seed)``."""
    vae = tiny_vae(seed)
    return FlowARPipeline(tiny_flowar(None, **overrides), vae)


# ---------------------------------------------------------------------------------------------- VAR
def tiny_var_config(**overrides):
    """var-tiny shrunk to msvq's "tiny" tokenizer (scales 1..4, V 32, Cvae 8: 30 tokens), two blocks of 64."""
    fields = dict(scales=(1, 2, 3, 4), vocab_size=32, code_dim=8, depth=2, width=64, num_heads=4)
    return get_var_preset("var-tiny", **{**fields, **overrides})


def sharpened(model: VAR) -> VAR:
    """Open the AdaLN gates and sharpen the head of a random VAR in place, so that every block, the class
    and the inputs change the draws (a freshly initialised VAR is close to uniform)."""
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[1].weight.normal_(std=0.1)
                block.ada_lin[1].bias.normal_(std=0.1)
            else:  # shared AdaLN: the block's offset to the shared projection
                block.ada_gss.normal_(std=0.3)
        model.head.weight.normal_(std=0.3)
    return model.eval()


def tiny_var(seed: int | None = 0, *, sharpen: bool = True, **overrides) -> VAR:
    """A random VAR of :func:`tiny_var_config` (``overrides`` applied), :func:`sharpened` unless told not."""
    if seed is not None:
        torch.manual_seed(seed)
    model = VAR(tiny_var_config(**overrides))
    return sharpened(model) if sharpen else model.eval()


def tiny_tokenizer(seed: int | None = None, **overrides) -> MultiScaleVQVAE:
    """A random msvq "tiny" tokenizer (8x8 images, scales 1..4), with ``overrides`` of its preset."""
    if seed is not None:
        torch.manual_seed(seed)
    return MultiScaleVQVAE(get_msvq_preset("tiny", **overrides)).eval()


def tiny_var_pipeline(seed: int = 0, *, sharpen: bool = True, **overrides) -> VARPipeline:
    """:func:`tiny_var` and :func:`tiny_tokenizer`, both drawn after one ``torch.manual_seed(seed)``."""
    model = tiny_var(seed, sharpen=sharpen, **overrides)
    return VARPipeline(model, tiny_tokenizer())


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def flowar_pipe() -> FlowARPipeline:
    """:func:`tiny_flowar_pipeline` (seed 0), shared by a module's tests; sampling does not change it."""
    return tiny_flowar_pipeline()


@pytest.fixture(scope="module")
def var_pipe() -> VARPipeline:
    """:func:`tiny_var_pipeline` (seed 0, sharpened), shared by a module's tests."""
    return tiny_var_pipeline()


# ---------------------------------------------------------------------------------------------- the authors' code
def fake_flowar_checkout(root) -> str:
    """A folder standing in for a checkout of the authors' FlowAR code: ``models/flowar.py`` is a copy of
    ``tests/reference_standin.py``. Returns its path for ``--reference``."""
    from pathlib import Path

    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "flowar.py").write_text((Path(__file__).parent / "reference_standin.py").read_text())
    return str(root)


# The rest of a stand-in xAR checkout beside models/xar.py: the SDE's step noise comes from sampler.py, as theirs
# does; rope.py and flow.py only have to exist (their xar.py imports them).
XAR_STANDIN_MODULES = {
    "sampler.py": '"""Stand-in of models/sampler.py: the SDE\'s noise per step, drawn through this module\'s torch."""\n\n'
                  "import torch\n\n\ndef step_noise(x, count):\n    return [torch.randn_like(x) for _ in range(count)]\n",
    "rope.py": '"""Stand-in of models/rope.py (imported by models/xar.py)."""\n',
    "flow.py": '"""Stand-in of models/flow.py (imported by models/xar.py)."""\n',
}


def fake_xar_checkout(root) -> str:
    """A folder standing in for a checkout of OliverRensu/xAR: ``models/xar.py`` is a copy of
    ``tests/reference_standin_xar.py``, with the three modules it imports. Returns its path for ``--reference``."""
    from pathlib import Path

    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "xar.py").write_text((Path(__file__).parent / "reference_standin_xar.py").read_text())
    for name, text in XAR_STANDIN_MODULES.items():
        (models / name).write_text(text)
    return str(root)
