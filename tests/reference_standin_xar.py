"""A stand-in for the authors' xAR model (OliverRensu/xAR, ``models/xar.py``), on top of our XAR.

It offers what tools/bench_reference.py calls through tools/parity_xar.py: their builders' keywords (``xAR``,
``xar_base``, ``xar_large``, ``xar_huge``), the released parameter names (ours are those), and
``sample_tokens(num_steps, cfg, label)``, which draws its random numbers through the name ``torch`` of this module
and of ``models.sampler`` in the order theirs does: per cell, ``randn`` of the initial noise, then one
``randn_like`` of the float64 state per SDE step. ``tests/conftest.py:fake_xar_checkout`` copies this file into a
folder as ``models/xar.py``, beside the small ``sampler.py``, ``rope.py`` and ``flow.py`` it writes.
"""

import importlib

import torch

from flowar import XAR, get_xar_preset
from models import sampler

for _name in ("rope", "flow"):  # their xar.py imports these too; tools.parity_xar looks every one of them up
    importlib.import_module(f"models.{_name}")


class xAR(XAR):
    def __init__(self, *, encoder_embed_dim, encoder_depth, encoder_num_heads, decoder_embed_dim, decoder_depth,
                 decoder_num_heads, mlp_ratio=4.0, img_size=256, vae_stride=16, vae_embed_dim=16, label_drop_prob=0.1,
                 class_num=1000, attn_dropout=0.1, proj_dropout=0.1, **ignored):
        if (decoder_embed_dim, decoder_num_heads) != (encoder_embed_dim, encoder_num_heads):
            raise ValueError("the stand-in has one width and head count for both stacks")
        super().__init__(get_xar_preset(
            "xar-b", latent_side=img_size // vae_stride, token_dim=vae_embed_dim, num_classes=class_num,
            width=encoder_embed_dim, encoder_depth=encoder_depth, decoder_depth=decoder_depth,
            num_heads=encoder_num_heads, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
            label_drop=label_drop_prob))
        self.label_drop_prob = label_drop_prob

    def sample_tokens(self, num_steps, cfg=1.0, label=None):
        c = self.config
        noise = []
        for _ in range(c.num_cells):
            first = torch.randn([label.shape[0], c.cell_tokens, c.token_dim])
            steps = sampler.step_noise(first.to(torch.float64), num_steps - 1)
            noise.append(torch.stack([first, *(n.float() for n in steps)], dim=1))
        return self.sample(label, solver="sde", guidance_scale=cfg, steps=num_steps, noise=noise)


def _builder(width, depth, heads):
    def build(**kwargs):
        return xAR(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width,
                   decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=4, **kwargs)

    return build


xar_base = _builder(768, 8, 12)
xar_large = _builder(1024, 16, 16)
xar_huge = _builder(1280, 20, 16)
