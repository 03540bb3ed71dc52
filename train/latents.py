"""Where training data come from: a cache on disk, or a dataset encoded online.

FlowAR trains on continuous latents: per image, the VAE posterior (mean, std) of the image and of its
mirror image, in scaled latent space; each step draws fresh posterior noise and a flip per image, as
FlowAR trains on ``posterior.sample()`` of randomly flipped images. VAR trains on the token maps of the
multi-scale VQ tokenizer (of the image or its mirror image), which are deterministic. FlexVAR trains on its
tokenizer's continuous features (a posterior of std 0), quantized at each step's own list of sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vae.msvq import MultiScaleVQVAE

CACHE_INDEX = "cache.json"


def dataset_batch(dataset, indices, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``indices`` of ``dataset`` with the augmentation of ``epoch``: images (B, 3, S, S), labels (B,)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items])


def read_cache(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The index and the concatenated shards of a cache written by ``train.cache_latents``."""
    index_file = folder / CACHE_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"latent_cache {folder} has no {CACHE_INDEX}; write one with train.cache_latents")
    index = json.loads(index_file.read_text())
    parts = [load_file(str(folder / name)) for name in index["shards"]]
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if int(tensors["labels"].shape[0]) != index["num_items"]:
        raise ValueError(f"latent_cache {folder} is incomplete: {int(tensors['labels'].shape[0])} of "
                         f"{index['num_items']} items in its shards")
    # Checked once here, on the CPU, rather than at every step: a NaN in the cache would reach a loss much later.
    for name, values in tensors.items():
        if values.is_floating_point() and not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).flatten(1).any(1).sum())
            raise ValueError(f"latent_cache {folder} holds NaN or infinite values in {name!r} ({bad} items); "
                             "write it again with train.cache_latents (a corrupt image or VAE?)")
    return index, tensors


class LatentSource:
    """Base: batches of (latents, labels) for a step, from the global-batch draws of that step."""

    latent_shape: tuple[int, int, int]
    num_items: int
    kind = "latents"  # what a model trained on this source learns from (its ``training_data``)
    vae = None

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def batch_indices(self, step: int, global_batch: int, generator: torch.Generator) -> torch.Tensor:
        """Item ids of the step's global batch: epochs of a seeded permutation, the tail dropped."""
        per_epoch = self.num_items // global_batch
        if per_epoch < 1:
            raise ValueError(f"global_batch ({global_batch}) exceeds the dataset size ({self.num_items})")
        epoch, position = divmod(step, per_epoch)
        self.epoch = epoch
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return order[position * global_batch:(position + 1) * global_batch]

    def draw_randomness(self, global_batch: int, generator: torch.Generator) -> dict:
        return {
            "flip": torch.rand(global_batch, generator=generator) < 0.5,
            "eps": torch.randn((global_batch, *self.latent_shape), generator=generator),
        }

    def get(self, indices: torch.Tensor, randomness: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def autoencoder(self):
        """What decodes this source's samples (and, for tokens, makes the model's inputs); None if not loaded."""
        return self.vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Images in [-1, 1] from a sample's ``decoder_input``; None without an autoencoder."""
        if self.autoencoder is None:
            return None
        device = next(self.autoencoder.parameters()).device
        return self.autoencoder.decode(latents.to(device))

    def describe(self) -> str:
        raise NotImplementedError


class CachedLatents(LatentSource):
    """Posteriors written by ``train.cache_latents``, held in memory."""

    def __init__(self, folder, *, seed: int = 0, vae=None):
        super().__init__(seed)
        self.folder = Path(folder)
        self.index, self.tensors = read_cache(self.folder)
        self.num_items = int(self.tensors["labels"].shape[0])
        self.latent_shape = tuple(self.tensors["mean"].shape[1:])
        self.vae = vae

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    def get(self, indices, randomness):
        mean, std = self.tensors["mean"][indices], self.tensors["std"][indices]
        if "mean_flip" in self.tensors:  # caches of flip-invariant data hold the mirrored posteriors too
            flip = randomness["flip"][:, None, None, None]
            mean = torch.where(flip, self.tensors["mean_flip"][indices], mean)
            std = torch.where(flip, self.tensors["std_flip"][indices], std)
        return mean + std * randomness["eps"], self.tensors["labels"][indices]

    def describe(self) -> str:
        return f"latent cache {self.folder} ({self.num_items} images, latents {self.latent_shape})"


class TokenSource(LatentSource):
    """Base for VAR's data: (list of K token maps (B, s_k, s_k), labels); decodes token maps to images."""

    kind = "tokens"
    tokenizer = None

    @property
    def autoencoder(self):
        return self.tokenizer

    def draw_randomness(self, global_batch: int, generator: torch.Generator) -> dict:
        # Token maps are deterministic per image; only the flip is drawn (the same draw FlowAR's sources make
        # first, so both keep their streams aligned with the step's generator).
        return {"flip": torch.rand(global_batch, generator=generator) < 0.5}

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated row-major token maps -> K maps (B, s_k, s_k)."""
        maps, start = [], 0
        for side in self.scales:
            maps.append(flat[:, start:start + side * side].long().view(-1, side, side))
            start += side * side
        return maps


class CachedTokens(TokenSource):
    """Token maps written by ``train.cache_latents --tokenizer``, held in memory."""

    def __init__(self, folder, *, seed: int = 0, tokenizer=None):
        super().__init__(seed)
        self.folder = Path(folder)
        self.index, self.tensors = read_cache(self.folder)
        self.num_items = int(self.tensors["labels"].shape[0])
        self.scales = tuple(self.index["scales"])
        self.latent_shape = (sum(s * s for s in self.scales),)
        self.tokenizer = tokenizer

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    def get(self, indices, randomness):
        tokens = self.tensors["tokens"][indices]
        if "tokens_flip" in self.tensors:
            tokens = torch.where(randomness["flip"][:, None], self.tensors["tokens_flip"][indices], tokens)
        return self.split(tokens), self.tensors["labels"][indices]

    def describe(self) -> str:
        return f"token cache {self.folder} ({self.num_items} images, scales {self.scales})"


class OnlineTokens(TokenSource):
    """A dataset of (image, label) tokenized at every step; the dataset applies its own augmentation."""

    def __init__(self, dataset, tokenizer, *, seed: int = 0):
        super().__init__(seed)
        self.dataset, self.tokenizer = dataset, tokenizer
        self.scales = tuple(tokenizer.scales)
        self.latent_shape = (sum(s * s for s in self.scales),)
        self.num_items = len(dataset)

    @torch.no_grad()
    def get(self, indices, randomness):
        images, labels = dataset_batch(self.dataset, indices, self.epoch)
        maps = self.tokenizer.encode_indices(images.to(next(self.tokenizer.parameters()).device))
        return [m.cpu() for m in maps], labels

    def describe(self) -> str:
        return f"{type(self.dataset).__name__} ({self.num_items} images) tokenized online"


class OnlineLatents(LatentSource):
    """A dataset of (image, label) encoded by the VAE at every step (no cache needed).

    The dataset applies its own augmentation (random crop and flip, seeded by epoch and index).
    """

    def __init__(self, dataset, vae, *, seed: int = 0):
        super().__init__(seed)
        self.dataset, self.vae = dataset, vae
        image, _ = dataset[0]
        with torch.no_grad():
            mean, _ = vae.encode_distribution(image[None])
        self.latent_shape = tuple(mean.shape[1:])
        self.num_items = len(dataset)

    @torch.no_grad()
    def get(self, indices, randomness):
        images, labels = dataset_batch(self.dataset, indices, self.epoch)
        mean, std = self.vae.encode_distribution(images)
        latents = mean.float().cpu() + std.float().cpu() * randomness["eps"]
        return latents, labels

    def describe(self) -> str:
        return f"{type(self.dataset).__name__} ({self.num_items} images) encoded online"


def load_any_vae(path: str):
    from flowar.pipeline import load_vae  # the library's loader: a diffusers folder or MAR's kl16.ckpt

    return load_vae(path).eval()


def load_tokenizer(path: str):
    """A VQ tokenizer (VAR's multi-scale one or FlexVAR's): a folder from ``save_pretrained``, or a released
    ``.pth``."""
    from flowar.registry import load_tokenizer as load  # the library's loader

    return load(path).eval()


def encodes_token_maps(tokenizer) -> bool:
    """VAR's tokenizer feeds token maps; FlexVAR's feeds its continuous features (quantized at every step's
    own sides), through the latent sources."""
    return isinstance(tokenizer, MultiScaleVQVAE)


def build_latent_source(cfg, *, device, load_vae: bool = True) -> LatentSource:
    """The cache when ``cfg.latent_cache`` is set (latents, FlexVAR features or VAR tokens, as its index says),
    else the dataset ``cfg.data`` encoded online by ``cfg.tokenizer`` (VAR, FlexVAR) or ``cfg.vae`` (FlowAR).

    The VAE is only needed to decode sample grids, so ``load_vae=False`` skips it; a tokenizer is always
    loaded, since VAR's and FlexVAR's inputs come from it."""
    if cfg.latent_cache:
        index_file = Path(cfg.latent_cache) / CACHE_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"latent_cache {cfg.latent_cache} has no {CACHE_INDEX}; write one with "
                                    "train.cache_latents")
        index = json.loads(index_file.read_text())
        if index.get("kind") == "tokens":
            tokenizer_path = cfg.tokenizer or index.get("tokenizer", "")
            if not tokenizer_path:
                raise ValueError("tokenizer must be set: the token cache does not record one")
            return CachedTokens(cfg.latent_cache, seed=cfg.seed, tokenizer=load_tokenizer(tokenizer_path).to(device))
        tokenizer_path = cfg.tokenizer or index.get("tokenizer", "")
        if tokenizer_path:  # FlexVAR's features
            return CachedLatents(cfg.latent_cache, seed=cfg.seed, vae=load_tokenizer(tokenizer_path).to(device))
        vae_path = cfg.vae or index.get("vae", "")
        vae = load_any_vae(vae_path).to(device) if (load_vae and vae_path) else None
        return CachedLatents(cfg.latent_cache, seed=cfg.seed, vae=vae)
    if not (cfg.vae or cfg.tokenizer):
        raise ValueError("vae (FlowAR) or tokenizer (VAR, FlexVAR) must be set unless latent_cache is set")
    from .data import build_dataset

    dataset = build_dataset(cfg.data, image_size=cfg.image_size, split="train")
    if hasattr(dataset, "verify"):  # decode every file once; corrupt ones are pruned and reported, not fatal
        report = dataset.verify()
        if load_vae:  # the main process speaks
            print(report)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer).to(device)
        if encodes_token_maps(tokenizer):
            return OnlineTokens(dataset, tokenizer, seed=cfg.seed)
        return OnlineLatents(dataset, tokenizer, seed=cfg.seed)
    return OnlineLatents(dataset, load_any_vae(cfg.vae).to(device), seed=cfg.seed)
