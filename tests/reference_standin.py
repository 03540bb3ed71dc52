"""A stand-in for the authors' FlowAR model (wangqiang9/FlowAR, ``models/flowar.py``), on top of our modules.

It offers what tools/parity_flowar.py and tools/bench_reference.py call: their builder's keywords,
the training forward ``forward(imgs, labels) -> loss`` (with ``forward_mae_decoder``), and ``sample_tokens``,
and it draws its random numbers through this module's own ``torch`` the way theirs draws them: label drop,
then per scale rand (B, 1, 1) and randn_like while training; per scale randn of the doubled batch while
sampling. ``tests/conftest.py:fake_flowar_checkout`` copies this file into a folder as ``models/flowar.py``.
"""

import torch

from flowar import FlowAR as Ours, get_preset
from flowar.model import to_tokens
from vae.pyramid import area_pyramid


class FlowAR(Ours):
    def __init__(self, *, encoder_embed_dim, encoder_depth, encoder_num_heads, decoder_depth, diffloss_d,
                 diffloss_w, label_drop_prob=0.0, **ignored):
        super().__init__(get_preset("flowar-s", width=encoder_embed_dim, encoder_depth=encoder_depth,
                                    decoder_depth=decoder_depth, num_heads=encoder_num_heads, head_width=diffloss_w,
                                    head_depth=diffloss_d, attn_dropout=0.0, proj_dropout=0.0, label_drop=0.0))
        self.label_drop_prob = label_drop_prob
        with torch.no_grad():  # no zero-initialised head output: every velocity is non-trivial
            self.flownet.final_layer.linear.weight.normal_(std=0.1)

    @classmethod
    def from_config(cls, config):
        """The stand-in with ``config``'s layout (any preset's) instead of the builder's keywords."""
        model = Ours.__new__(cls)
        Ours.__init__(model, config)
        model.label_drop_prob = 0.0
        return model

    def forward_mae_decoder(self, tokens, class_embedding):
        return self.transformer(tokens, class_embedding)

    def forward(self, imgs, labels):
        batch, scales = imgs.shape[0], self.config.scales
        assert not (torch.rand(batch) < self.label_drop_prob).any()
        pyramid = area_pyramid(imgs, scales)
        class_embedding = self.class_emb(labels)
        tokens = torch.cat([class_embedding[:, None], self.z_proj(self.input_tokens(pyramid))], dim=1)
        z = self.forward_mae_decoder(tokens, class_embedding)
        loss, start = 0.0, 0
        for side, target in zip(scales, pyramid):
            x = to_tokens(target)
            t = torch.rand((batch, 1, 1))
            noise = torch.randn_like(x)
            v = self.flownet((1 - t) * x + t * noise, t.flatten(), z[:, start:start + side * side])
            loss = loss + ((v - (noise - x)) ** 2).mean() * side * side / scales[-1] ** 2
            start += side * side
        return loss

    def sample_tokens(self, num_steps, guidance, cfg, labels):
        batch = labels.shape[0]
        noise = [torch.randn([2 * batch, s * s, self.config.token_dim]) for s in self.config.scales]
        # The released sampler calls its head with the full condition at every step (the parity tool counts those
        # calls), where ours fixes the condition once per scale (head.conditioned).
        head = self.flownet
        head.conditioned = None  # heads.flow.condition_net then calls the head itself at every step
        try:
            # Their cfg is our guidance scale; their sampler runs 50 steps on the uniform grid.
            return self.sample(labels, guidance_scale=cfg, guidance_interval=(0.0, guidance), steps=num_steps,
                               schedule="uniform" if num_steps == 50 else "flowar", noise=[n[:batch] for n in noise])
        finally:
            del head.conditioned
