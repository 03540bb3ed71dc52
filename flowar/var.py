"""VAR, the discrete baseline: next-scale prediction of multi-scale VQ token maps (Tian et al., 2024).

Module and parameter names follow the released ``var_d{16,20,24,30}.pth`` (``word_embed``, ``class_emb``,
``pos_start``, ``pos_1LC``, ``lvl_embed``, ``blocks.{i}.attn.mat_qkv``, ``blocks.{i}.ada_lin.1``,
``head_nm``, ``head``), so those state dicts load after dropping three constant buffers (see
:func:`convert_released_var_state_dict`).

The tokenizer (``vae.msvq.MultiScaleVQVAE`` or anything with its interface) is never part of the model:
it is passed to :meth:`VAR.forward` for the teacher-forcing inputs and to :meth:`VAR.sample` to turn
sampled ids into the next scale's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads.categorical import CategoricalHead, CategoricalSample
from heads.layers import attention
from vae.files import load_state_strict, read_torch_state_dict

from .attention import KVCache, scale_segments
from .sampling import CachedStepper, Known, generate, guidance_excess
from .scalewise import ScaleWiseModel
from .var_config import VARConfig, VARSampling, get_var_preset

MODEL_TYPE = "var"

# Constant buffers of the released state dicts that we do not keep: the dense additive block-causal
# mask, the level id of each token, and each block's all-zero key bias. They are checked, then dropped.
RELEASED_ONLY_KEYS = ("attn_bias_for_masking", "lvl_1L", "blocks.{i}.attn.zero_k_bias")
MAX_SCALE_MUL = 100.0  # cap of the learned attention scale (their clamp of the log at log(100))
INIT_SCALE_MUL = 4.0


@dataclass
class VAROutput:
    """Training loss: cross entropy averaged over all tokens (weight 1/L each), and per scale."""

    loss: torch.Tensor
    loss_per_scale: torch.Tensor  # (K,), detached: mean cross entropy of each scale's tokens


@dataclass
class VARSampleOutput:
    """Sampled token maps and the tokenizer feature map they add up to."""

    indices: list[torch.Tensor]  # K LongTensors (B, s_k, s_k)
    f_hat: torch.Tensor  # (B, Cvae, S, S): decode with tokenizer.decode_f_hat

    @property
    def decoder_input(self) -> torch.Tensor:
        """What the tokenizer decodes (its ``decode`` takes f_hat)."""
        return self.f_hat

    @property
    def latent_output(self) -> list[torch.Tensor]:
        """What a pipeline returns for ``output_type="latent"``: the token maps."""
        return self.indices


# ---------------------------------------------------------------------------------------- layers
class SelfAttention(nn.Module):
    """Multi-head attention with q and v biases (no k bias), optionally cosine (L2-normalised q, k)."""

    def __init__(self, dim: int, num_heads: int, *, l2_norm: bool, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.l2_norm = l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if l2_norm:
            # log of the per-head logit scale; the dot products of unit vectors lie in [-1, 1].
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(INIT_SCALE_MUL)))
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, *, segments=None, cache: KVCache | None = None, layer: int = 0):
        """x (B, n, D). Without a cache, ``segments`` lays out whole scales and attention is block-causal:
        each scale's queries see the key prefix ending with that scale. With a cache, ``x`` is one scale
        and sees everything cached plus itself."""
        batch, length, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, d) each
        if self.l2_norm:
            gain = self.scale_mul_1H11.clamp(max=math.log(MAX_SCALE_MUL)).exp()
            q = F.normalize(q, dim=-1) * gain
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(layer, k, v)
            out = attention(q, k.type_as(q), v.type_as(q), scale=self.scale)
        else:
            drop = self.attn_drop if self.training else 0.0
            out = torch.cat([
                attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], dropout_p=drop, scale=self.scale)
                for start, end in segments
            ], dim=2)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out))


class FFN(nn.Module):
    """fc2(GELU_tanh(fc1 x)), with dropout after."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class VARBlock(nn.Module):
    """Pre-norm transformer block; LayerNorm without affine, scaled, shifted and gated per image by AdaLN."""

    def __init__(self, config: VARConfig, drop_path: float):
        super().__init__()
        c = config
        self.dim = c.width
        self.drop_path = drop_path
        self.attn = SelfAttention(c.width, c.num_heads, l2_norm=c.attn_l2_norm,
                                  attn_drop=c.attn_dropout, proj_drop=c.dropout)
        self.ffn = FFN(c.width, round(c.width * c.mlp_ratio), drop=c.dropout)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps, elementwise_affine=False)
        self.shared_adaln = c.shared_adaln
        if c.shared_adaln:
            # This block's offset to the shared projection of the class embedding.
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c.width) / math.sqrt(c.width))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 6 * c.width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, D) gates, scales and shifts from the class embedding (B, D), or from the shared
        projection (B, 1, 6, D) when AdaLN is shared. Depends on the class only, so sampling makes it once."""
        if self.shared_adaln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.dim)

    def forward(self, x, modulation, *, segments=None, cache=None, layer=0, keep=None):
        """x (B, n, D), modulation (B, 1, 6, D); keep: (2, B) residual-branch multipliers (drop path) or None."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)
        branch = self.attn(torch.addcmul(shift1, self.norm(x), scale1 + 1), segments=segments, cache=cache,
                           layer=layer) * gamma1
        x = x + (branch if keep is None else branch * keep[0].view(-1, 1, 1))
        branch = self.ffn(torch.addcmul(shift2, self.norm(x), scale2 + 1)) * gamma2
        return x + (branch if keep is None else branch * keep[1].view(-1, 1, 1))


class AdaLNBeforeHead(nn.Module):
    """LayerNorm without affine, then a per-image scale and shift from the class embedding."""

    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond):
        """x (B, n, D), cond (B, D)."""
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.norm(x) * (scale + 1) + shift


# ---------------------------------------------------------------------------------------- the models
class TokenScaleModel(ScaleWiseModel):
    """What VAR and FlexVAR share: code vectors and a class token in, VAR's AdaLN blocks attending
    block-causally over scales, logits over the codebook out. A family adds its position embeddings
    (:meth:`_add_positions`, :meth:`_initialize_positions`) and its inputs, loss and sampling."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        width = c.width
        self.word_embed = nn.Linear(c.code_dim, width)
        self.class_emb = nn.Embedding(c.num_classes + 1, width)  # last id is the null class
        self._add_positions()
        if c.shared_adaln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        rates = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()  # stochastic depth rising from 0
        self.blocks = nn.ModuleList(VARBlock(c, rate) for rate in rates)
        self.head_nm = AdaLNBeforeHead(width, eps=c.norm_eps)
        self.head = CategoricalHead(width, c.vocab_size)
        self.initialize_weights()

    def _add_positions(self) -> None:
        """Register the family's position parameters (called before the blocks, so that the random init
        draws in the released module order)."""
        raise NotImplementedError

    def _initialize_positions(self, std: float) -> None:
        raise NotImplementedError

    def initialize_weights(self):
        """The authors' init for training from scratch (VAR's and FlexVAR's init_weights with the builder's
        arguments)."""
        c = self.config
        std = math.sqrt(1 / c.width / 3)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        self._initialize_positions(std)
        with torch.no_grad():
            self.head.weight.mul_(0.02)  # near-uniform logits at the start
            self.head_nm.ada_lin[1].weight.mul_(0.5)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * c.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * c.depth))
                # rows [0, 2D) are the gates: almost closed, so every block starts close to the identity
                if c.shared_adaln:
                    block.ada_gss[:, :, 2:].mul_(0.5)
                    block.ada_gss[:, :, :2].mul_(c.init_adaln_gamma)
                else:
                    block.ada_lin[1].weight[2 * c.width:].mul_(0.5)
                    block.ada_lin[1].weight[:2 * c.width].mul_(c.init_adaln_gamma)

    @property
    def num_layers(self) -> int:
        return self.config.depth

    # ------------------------------------------------------------------ pieces
    def block_modulation(self, class_embedding: torch.Tensor) -> list[torch.Tensor]:
        """Each block's (B, 1, 6, D) AdaLN parameters for the class embeddings (B, D)."""
        cond = class_embedding
        if self.config.shared_adaln:
            cond = self.shared_ada_lin(class_embedding).view(-1, 1, 6, self.config.width)
        return [block.modulation(cond) for block in self.blocks]

    def transformer(self, x, modulation, *, sides=None, cache=None, keep=None) -> torch.Tensor:
        """Hidden states (B, n, D) of input tokens (B, n, D) (embeddings and positions already added).

        Without a cache, ``x`` holds the scales ``sides`` (default: the config's), from the first on, attended
        block-causally. With a cache, ``x`` is the one next scale. keep: (depth, 2, B) drop-path multipliers.
        """
        sides = tuple(self.config.scales if sides is None else sides)
        segments = scale_segments(sides)
        for i, block in enumerate(self.blocks):
            x = block(x, modulation[i], segments=segments, cache=cache, layer=i,
                      keep=None if keep is None else keep[i])
        if cache is not None:
            cache.length += x.shape[1]
        return x

    def head_logits(self, hidden, class_embedding) -> torch.Tensor:
        """Logits (B, n, V) from hidden states (B, n, D)."""
        return self.head(self.head_nm(hidden, class_embedding))

    def class_embedding(self, class_labels, batch: int, *, drop_mask=None) -> torch.Tensor:
        """(B, D) embeddings of validated labels, those in ``drop_mask`` (B,) bool replaced by the null class."""
        labels = self.check_labels(class_labels, batch)
        if drop_mask is not None:
            labels = torch.where(drop_mask.to(labels.device), torch.full_like(labels, self.null_class), labels)
        return self.class_emb(labels)

    def drop_path_multipliers(self, keep, dtype) -> torch.Tensor | None:
        """(depth, 2, B) residual multipliers from the boolean (B, depth, 2) drop-path draws ``keep`` (kept /
        (1 - rate), as stochastic depth scales them); None outside training or without drop path."""
        if not self.training or keep is None or self.config.drop_path <= 0:
            return None
        rates = torch.tensor([b.drop_path for b in self.blocks], device=keep.device).view(-1, 1, 1)
        return (keep.permute(1, 2, 0).float() / (1 - rates).float()).to(dtype)

    def draw_randomness(self, batch_size: int, *, generator=None, device=None) -> dict:
        """Every random draw of one training forward, per image (leading or last dim ``batch_size``):
        ``drop_mask`` (B,) labels replaced by the null class, ``keep`` (B, depth, 2) residual branches
        kept by drop path (attention, then MLP, of each block). Batch-first, so a trainer can hand each
        process its rows of a global batch's draws."""
        c = self.config
        device = self.class_emb.weight.device if device is None else device
        drop = torch.rand(batch_size, generator=generator, device=device) < c.cond_drop_rate
        if c.unconditional:
            drop = torch.zeros_like(drop)
        rates = torch.tensor([b.drop_path for b in self.blocks], device=device).view(-1, 1, 1)
        keep = torch.rand(c.depth, 2, batch_size, generator=generator, device=device) >= rates
        return {"drop_mask": drop, "keep": keep.permute(2, 0, 1)}

    def sampling_hot_modules(self) -> list[nn.Module]:
        # Sampling is the transformer: each block's feed-forward is about two thirds of a block's FLOPs.
        return [block.ffn for block in self.blocks]

    # ------------------------------------------------------------------ sampling hooks
    def input_positions(self, sides) -> torch.Tensor:
        """(1, L, D): what is added to the input tokens of the scales ``sides``."""
        raise NotImplementedError

    def check_noise(self, noise: list[torch.Tensor], batch: int, options=None) -> None:
        sides = self.config.scales if options is None else self.sampled_scales(options)
        shapes = [(batch, side * side) for side in sides]
        if (not isinstance(noise, (list, tuple)) or len(noise) != len(shapes)
                or any(not torch.is_tensor(u) or tuple(u.shape) != e for u, e in zip(noise, shapes))):
            raise ValueError(f"noise (one uniform per token) must be a list of tensors of shapes {shapes}")
        if not all(bool(((u >= 0) & (u < 1)).all()) for u in noise):
            raise ValueError("noise (one uniform per token) must lie in [0, 1): it holds NaN or values outside")

    def noise_from_seeds(self, seeds: list[int], options=None) -> list[torch.Tensor]:
        """The token uniforms, one (B, s*s) float64 CPU tensor per sampled side, row b drawn from seeds[b]."""
        sides = self.config.scales if options is None else self.sampled_scales(options)
        per_sample = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            per_sample.append([torch.rand(side * side, generator=g, dtype=torch.float64) for side in sides])
        return [torch.stack([u[k] for u in per_sample]) for k in range(len(sides))]


class VAR(TokenScaleModel):
    """Class-conditional next-scale prediction over the token maps of a multi-scale VQ tokenizer."""

    model_type = MODEL_TYPE
    config_class = VARConfig
    sampling_class = VARSampling
    interchangeable_fields = ("scales", "vocab_size", "code_dim", "num_classes")
    training_data = "tokens"

    def _add_positions(self) -> None:
        c = self.config
        self.pos_start = nn.Parameter(torch.empty(1, c.first_len, c.width))
        self.pos_1LC = nn.Parameter(torch.empty(1, c.seq_len, c.width))  # absolute position of every token
        self.lvl_embed = nn.Embedding(len(c.scales), c.width)  # which scale a token belongs to

    def _initialize_positions(self, std: float) -> None:
        for param in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(param, std=std)

    def level_positions(self) -> torch.Tensor:
        """(1, L, D): level embedding of each token's scale plus its absolute position embedding."""
        sizes = torch.tensor([s * s for s in self.config.scales], device=self.lvl_embed.weight.device)
        return self.lvl_embed.weight.repeat_interleave(sizes, dim=0)[None] + self.pos_1LC

    def input_positions(self, sides) -> torch.Tensor:
        return self.level_positions()  # VAR samples its own scales only

    # ------------------------------------------------------------------ inputs and labels
    def _check_indices(self, indices) -> int:
        """Validate K token maps (B, s_k, s_k) of ids in [0, V); returns B."""
        c = self.config
        count = len(c.scales)
        if not isinstance(indices, (list, tuple)) or len(indices) != count or not all(map(torch.is_tensor, indices)):
            raise ValueError(f"indices must be a list of {count} LongTensors (B, s, s), one per scale {c.scales}")
        batch = indices[0].shape[0] if indices[0].ndim == 3 else 0
        for side, idx in zip(c.scales, indices):
            if idx.dtype != torch.long or tuple(idx.shape) != (batch, side, side):
                raise ValueError(f"indices must be LongTensors of shapes (B, s, s) for scales {c.scales}; got "
                                 f"{[(tuple(i.shape), str(i.dtype)) for i in indices]}")
        if batch < 1:
            raise ValueError("indices must hold at least one image")
        low = min(int(i.min()) for i in indices)
        high = max(int(i.max()) for i in indices)
        if low < 0 or high >= c.vocab_size:
            raise ValueError(f"indices must lie in [0, {c.vocab_size - 1}] (vocab_size), got values in [{low}, {high}]")
        return batch

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if ``tokenizer``'s scales, codebook size or code dimension differ from this model's."""
        c = self.config
        if tokenizer is None:
            raise ValueError("tokenizer is required (a vae.msvq.MultiScaleVQVAE matching the model)")
        theirs = (tuple(getattr(tokenizer, "scales", ())), getattr(tokenizer, "codebook_size", None),
                  getattr(tokenizer, "code_dim", None))
        if theirs != (c.scales, c.vocab_size, c.code_dim):
            raise ValueError(
                f"tokenizer does not match the model: scales/codebook_size/code_dim are {theirs}, "
                f"the model needs {(c.scales, c.vocab_size, c.code_dim)}"
            )

    def embed_inputs(self, class_embedding, inputs=None, *, sides=None) -> torch.Tensor:
        """Input tokens (B, n, D): the class token at each first-scale position, then the embedded inputs
        (B, n - first_len, Cvae) of the following scales, with level and position embeddings added (``sides``:
        VAR's are always its own scales)."""
        c = self.config
        batch = class_embedding.shape[0]
        start = class_embedding[:, None].expand(batch, c.first_len, -1) + self.pos_start
        tokens = start if inputs is None else torch.cat([start, self.word_embed(inputs.to(start.dtype))], dim=1)
        return tokens + self.level_positions()[:, : tokens.shape[1]]

    # ------------------------------------------------------------------ training
    def logits(self, inputs, class_labels=None, *, drop_mask=None, keep=None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V).

        inputs: (B, L - first_len, Cvae), the tokenizer's ``teacher_forcing_inputs`` (next-scale inputs of
        scales 2..K). drop_mask (B,) bool: labels to replace by the null class (applied whenever given).
        keep (B, depth, 2) bool: drop-path draws, used in training mode only.
        """
        c = self.config
        expected = (c.seq_len - c.first_len, c.code_dim)
        if inputs.ndim != 3 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"inputs must be (B, {expected[0]}, {expected[1]}) for scales {c.scales} and "
                             f"code_dim {c.code_dim}, got {tuple(inputs.shape)}")
        class_embedding = self.class_embedding(class_labels, inputs.shape[0], drop_mask=drop_mask)  # (B, D)
        tokens = self.embed_inputs(class_embedding, inputs)  # (B, L, D)
        multipliers = self.drop_path_multipliers(None if keep is None else keep.to(tokens.device), tokens.dtype)
        hidden = self.transformer(tokens, self.block_modulation(class_embedding), keep=multipliers)
        return self.head_logits(hidden, class_embedding)

    def forward(self, indices, class_labels=None, *, tokenizer, drop_mask=None, keep=None,
                generator=None) -> VAROutput:
        """Cross-entropy loss of the token maps ``indices`` (K LongTensors (B, s_k, s_k)).

        In training mode a share ``cond_drop_rate`` of the labels becomes the null class and drop path
        applies, both drawn from ``generator`` (see :meth:`draw_randomness`) unless ``drop_mask`` (B,) /
        ``keep`` (B, depth, 2) are given. The teacher-forcing inputs come from ``tokenizer``, which is
        never trained here.
        """
        batch = self._check_indices(indices)
        self.check_tokenizer(tokenizer)
        if self.training and (drop_mask is None or keep is None):
            draws = self.draw_randomness(batch, generator=generator, device=indices[0].device)
            drop_mask = draws["drop_mask"] if drop_mask is None else drop_mask
            keep = draws["keep"] if keep is None else keep
        with torch.no_grad():
            inputs = tokenizer.teacher_forcing_inputs(list(indices))
        logits = self.logits(inputs.to(self.word_embed.weight.device), class_labels, drop_mask=drop_mask, keep=keep)
        targets = torch.cat([idx.flatten(1) for idx in indices], dim=1).to(logits.device)  # (B, L)
        per_token = self.head.loss(logits, targets)  # (B, L)
        per_scale = torch.stack([per_token[:, start:end].mean() for start, end in scale_segments(self.config.scales)])
        return VAROutput(loss=per_token.mean(), loss_per_scale=per_scale.detach())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, class_labels=None, *, tokenizer, batch_size: int | None = None,
               sampling: VARSampling | None = None, generator: torch.Generator | None = None,
               noise: list[torch.Tensor] | None = None, progress: bool = False, **options) -> VARSampleOutput:
        """Generate token maps scale by scale: one cached transformer pass per scale.

        sampling: a :class:`~flowar.var_config.VARSampling` (None: the config's saved defaults, VAR's FID
        settings for the released presets), updated by ``options``: guidance_scale (1 = unguided) or var_cfg
        (VAR's own cfg, 0 = unguided), cfg_schedule, top_k, top_p, temperature, more_smooth. The null-class
        half of the batch runs only when guided. With more_smooth, ``indices`` holds the ids that were drawn
        but ``f_hat`` is built from the mixed code vectors (the tokenizer must expose ``codebook``).
        noise: one (B, s*s) tensor of uniforms in [0, 1) per scale, to draw each token by inverse CDF from its
        own uniform instead of from ``generator``: an image then depends on its own uniforms alone, whatever
        batch it is drawn in (``eval.sample`` draws them per sample; see :meth:`noise_from_seeds`).
        """
        return generate(self, class_labels, autoencoder=tokenizer, batch_size=batch_size, sampling=sampling,
                        generator=generator, noise=noise, progress=progress, **options)

    def stepper(self, labels: torch.Tensor, options: VARSampling, *, timed: bool = False) -> "VARStepper":
        return VARStepper(self, labels, options, timed=timed)

    def canvas(self, batch: int, autoencoder=None, options=None) -> "VARCanvas":
        self.check_tokenizer(autoencoder)
        return VARCanvas(self.config, autoencoder)

    def known_regions(self, autoencoder, images: torch.Tensor, keep: list[torch.Tensor]) -> list[Known]:
        """Each scale's known ids: the image's ground-truth token maps from the tokenizer."""
        self.check_tokenizer(autoencoder)
        indices = autoencoder.encode_indices(images)
        return [(m.to(self.device), idx.to(self.device)) for m, idx in zip(keep, indices)]

    # ------------------------------------------------------------------ training data
    def check_training_source(self, source) -> None:
        self.check_tokenizer(source.autoencoder)

    def training_inputs(self, autoencoder) -> dict:
        return {"tokenizer": autoencoder}  # the teacher-forcing inputs come from the frozen tokenizer

    # ------------------------------------------------------------------ files
    @classmethod
    def from_released(cls, path, preset: str | VARConfig, *, map_location="cpu") -> "VAR":
        """Load ``var_d{16,20,24,30}.pth`` (a bare state dict with the authors' key names) into ``preset``, a
        preset name or a :class:`VARConfig` for checkpoints of other sizes. The file is read with
        ``weights_only=True``; a checkpoint of another size fails listing missing, unexpected and mis-shaped
        keys."""
        config = preset if isinstance(preset, VARConfig) else get_var_preset(preset)
        state = convert_released_var_state_dict(read_torch_state_dict(path, map_location=map_location), config)
        model = cls(config)
        load_state_strict(model, state, source=f"checkpoint {path} (preset {preset!r})")
        return model.eval()


@dataclass
class VARDraw:
    """One scale drawn by VAR: the ids, and the Gumbel-softmax code weights when sampling "more smoothly"."""

    ids: torch.Tensor  # (B, s, s) long
    weights: torch.Tensor | None  # (B, s*s, V) or None


class VARStepper(CachedStepper):
    """VAR's per-scale step (``flowar.sampling.Stepper``): a cached transformer pass, then the categorical draw;
    FlexVAR's too, with its own guidance and filter per scale (:meth:`guidance_at`, :meth:`top_k_at`).
    Unguided, the mix is exactly the conditional logits, so the null rows are not run."""

    logits = None  # (rows, s*s, V) float32 of the last scale fed

    def release(self) -> None:
        self.cache = self.logits = None

    def _first_pass(self, prefill: bool) -> None:
        model = self.model
        self.class_embedding = model.class_emb(self.labels)
        self.modulation = model.block_modulation(self.class_embedding)  # per class, once for all scales
        self.positions = model.input_positions(self.sides)
        self.segments = scale_segments(self.sides)
        self._run(model.embed_inputs(self.class_embedding, sides=self.sides), 0, prefill)

    def _pass(self, scale_input: torch.Tensor, k: int, prefill: bool) -> None:
        """scale_input: the canvas's input of this scale, (B, s*s, Cvae) (VAR: the tokenizer's accumulated f_hat
        pooled to this scale; FlexVAR: the previous scale's codes resized)."""
        model = self.model
        begin, end = self.segments[k]
        tokens = model.word_embed(scale_input.to(self.device, model.word_embed.weight.dtype)) + self.positions[:, begin:end]
        self._run(torch.cat([tokens, tokens]) if self.guided else tokens, k, prefill)

    def _run(self, tokens: torch.Tensor, k: int, prefill: bool) -> None:
        model = self.model
        hidden = model.transformer(tokens, self.modulation, sides=(self.sides[k],), cache=self.cache)
        # Over another model's scales only the KV cache matters: no logits.
        self.logits = None if prefill else model.head_logits(hidden, self.class_embedding).float()

    @torch.no_grad()
    def draw(self, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             known: Known | None = None) -> VARDraw:
        """Ids (B, s, s) of the scale fed last, guided (:meth:`guidance_at`), filtered and drawn from ``generator``
        or by inverse CDF from ``noise`` (B, s*s) uniforms; ``known`` (keep (B, s, s), ids) overwrites the kept
        ids."""
        o, c, k = self.options, self.model.config, self.scales_seen - 1
        num_scales, side = len(self.sides), self.sides[k]
        if noise is not None and o.more_smooth:
            raise ValueError("noise (uniforms) replaces the token draws; more_smooth draws Gumbel noise from "
                             "generator, so they cannot be combined")
        with self.timer:
            logits = self.logits
            drawn: CategoricalSample = self.model.head.sample(
                logits[:self.batch], logits[self.batch:] if self.guided else None,
                guidance=self.guidance_at(k), top_k=self.top_k_at(k), top_p=o.top_p, temperature=o.temperature,
                generator=generator,
                uniforms=None if noise is None else noise.to(self.device),
                smooth_ratio=k / max(num_scales - 1, 1) if o.more_smooth else None)
            ids, weights = drawn.ids.view(self.batch, side, side), drawn.weights
            if known is not None:
                keep, target = known[0].to(ids.device), known[1].to(ids.device)
                ids = torch.where(keep, target, ids)
                if weights is not None:  # the kept positions mix exactly their own code
                    one_hot = F.one_hot(target.flatten(1), c.vocab_size).to(weights)
                    weights = torch.where(keep.flatten(1)[..., None], one_hot, weights)
        return VARDraw(ids=ids, weights=weights)

    def guidance_at(self, k: int) -> float:
        """Scale k's guidance weight minus one (VAR's t): VAR's linear ramp."""
        o = self.options
        return guidance_excess(o.guidance_scale, k, len(self.sides), o.cfg_schedule)

    def top_k_at(self, k: int) -> int:
        return self.options.top_k


class VARCanvas:
    """A VAR run's result (``flowar.sampling.Canvas``): the token maps, and f_hat accumulated by the tokenizer,
    which also makes each next scale's input."""

    def __init__(self, config: VARConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.f_hat, self.indices = None, []

    def add(self, k: int, drawn: VARDraw) -> torch.Tensor | None:
        c = self.config
        self.indices.append(drawn.ids)
        if drawn.weights is None:
            self.f_hat, next_input = self.tokenizer.accumulate(k, self.f_hat, drawn.ids)
            return next_input
        codebook = getattr(self.tokenizer, "codebook", None)
        if not torch.is_tensor(codebook) or tuple(codebook.shape) != (c.vocab_size, c.code_dim):
            raise ValueError(f"more_smooth needs tokenizer.codebook, a ({c.vocab_size}, {c.code_dim}) tensor")
        side = c.scales[k]
        weights = drawn.weights
        codes = (weights @ codebook.to(weights)).transpose(1, 2).reshape(weights.shape[0], c.code_dim, side, side)
        self.f_hat, next_input = self.tokenizer.accumulate(k, self.f_hat, codes)
        return next_input

    def output(self) -> VARSampleOutput:
        return VARSampleOutput(indices=self.indices, f_hat=self.f_hat)


# ---------------------------------------------------------------------------------------- released files
def block_causal_bias(scales) -> torch.Tensor:
    """(L, L) additive mask as the release stores it: 0 where scale i's token may see the key, else -inf."""
    level = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])
    allowed = level[:, None] >= level[None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)


def convert_released_var_state_dict(state: dict, config: VARConfig) -> dict:
    """Authors' key layout -> ours. Names are shared; three constant buffers are checked, then dropped:
    ``attn_bias_for_masking`` (our block-causal attention needs no mask), ``lvl_1L`` (the level of each
    token, implied by the scales) and every block's ``attn.zero_k_bias`` (a bias that is always zero)."""
    state = dict(state)
    length = config.seq_len
    bias = state.pop("attn_bias_for_masking", None)
    # A mask or level table of another size goes with mis-shaped position embeddings, which the key
    # check reports; only same-sized ones are compared here.
    if bias is not None and bias.numel() == length * length:
        if not torch.equal(bias.reshape(length, length).float(), block_causal_bias(config.scales)):
            raise ValueError(f"checkpoint attn_bias_for_masking {tuple(bias.shape)} is not the block-causal "
                             f"mask of scales {config.scales}")
    levels = state.pop("lvl_1L", None)
    if levels is not None and levels.numel() == length:
        expected = torch.cat([torch.full((s * s,), i) for i, s in enumerate(config.scales)])
        if not torch.equal(levels.reshape(-1).long(), expected):
            raise ValueError(f"checkpoint lvl_1L does not hold the scale index of each token for scales {config.scales}")
    for key in [k for k in state if k.startswith("blocks.") and k.endswith(".attn.zero_k_bias")]:
        if torch.count_nonzero(state.pop(key)):
            raise ValueError(f"checkpoint {key} is not all zeros; this model has no key bias")
    return state
