"""Training images to latents and prompts to text states, with caching where it is exact.

Latents: images are decoded when a batch needs them (memory does not grow with the data set).
Where the VAE's input for an image is known before any draw — centred crops and no flips — its
output distribution never changes, so `MomentsInMemory` keeps it and only the sample from that
distribution is drawn per step (from the sample's generator, as without the cache). With
data.latent_cache_dir a disk cache (latent_cache.LatentCache, keyed by the file's bytes, the VAE
and the transform) takes that role for any transform. Either way the draws are those of the
uncached run, so the losses are bit-identical. The distributions live on the host, where the
samples are drawn: a batch then reaches the GPU as one asynchronous copy.
Prompts: with a frozen text encoder each distinct prompt is encoded once.
"""

import functools
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch

from minidream.models.clip import CLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.vae import AutoencoderKL
from minidream.training.data import Example, Placement, load_image, pixels_of, place
from minidream.training.masks import load_mask
from minidream.training.plan import DataPlan
from minidream.training.order import Item, caption_generator, sample_generator
from minidream.training.step import to_device

Moments = tuple[torch.Tensor, torch.Tensor]


class MomentsStore(Protocol):
    """Where encoded images are kept: (mean, std) of `image_path` under `transform_key`, else encode()."""

    def moments(self, image_path: Path, transform_key: str, encode: Callable[[], Moments]) -> Moments: ...


class MomentsInMemory:
    """The in-memory store: a few hundred KB per image at 512 px, the moments only (never the images)."""

    def __init__(self):
        self.entries: dict[tuple[Path, str], Moments] = {}

    def moments(self, image_path: Path, transform_key: str, encode: Callable[[], Moments]) -> Moments:
        key = (image_path, transform_key)
        if key not in self.entries:
            self.entries[key] = encode()
        return self.entries[key]


class LatentSource:
    """Scaled VAE latents (B x 4 x h x w) of images placed at a size, one generator per sample."""

    def __init__(
        self, vae: AutoencoderKL, center_crop: bool, random_flip: bool, scaling_factor: float, store: MomentsStore | None,
    ):
        self.vae = vae
        self.center_crop, self.random_flip = center_crop, random_flip
        self.scaling_factor = scaling_factor
        self.store = store

    @torch.no_grad()
    def _encode(self, path: Path, placement: Placement) -> Moments:
        """(mean, std) on the VAE's device: uncached, the host never waits for them."""
        pixels = pixels_of(placement.apply(load_image(path)))
        param = next(self.vae.parameters())
        posterior = self.vae.encode(to_device(pixels[None], param.device).to(param.dtype))
        return posterior.mean.float(), posterior.std.float()

    def _encode_to_host(self, path: Path, placement: Placement) -> Moments:
        """For a store: fp32 host tensors (one wait for the GPU per entry made)."""
        return tuple(m.cpu() for m in self._encode(path, placement))

    def placement(self, example: Example, size: tuple[int, int], generator: torch.Generator) -> Placement:
        """The sample's flip, then its crop offsets, drawn from its generator in that order."""
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        return place(example.size, size, self.center_crop, flip, generator)

    def latents(
        self, examples: list[Example], size: tuple[int, int], generators: list[torch.Generator], masks: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents B x 4 x h x w, with `masks` their loss weights B x 1 x h x w)."""
        out, weights = [], []
        for example, g in zip(examples, generators):
            placement = self.placement(example, size, g)
            if self.store is None:
                mean, std = self._encode(example.path, placement)
            else:
                encode = functools.partial(self._encode_to_host, example.path, placement)
                mean, std = self.store.moments(example.path, placement.key, encode)
            noise = to_device(torch.randn(mean.shape, generator=g), mean.device)
            out.append((mean + std * noise) * self.scaling_factor)
            if masks:
                weights.append(load_mask(example.mask, placement, tuple(mean.shape[-2:])))
        return torch.cat(out), torch.cat(weights) if masks else None


class PromptEncoder:
    """Prompts -> text-encoder states (of layer -clip_skip); remembers them when the encoder is frozen."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, trainable: bool, clip_skip: int = 1):
        self.tokenizer, self.text_encoder, self.trainable = tokenizer, text_encoder, trainable
        self.clip_skip = clip_skip
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        if self.trainable:
            return self.text_encoder(to_device(self.tokenizer(prompts), device), clip_skip=self.clip_skip)
        missing = sorted(set(prompts) - self.cache.keys())
        if missing:
            with torch.no_grad():
                states = self.text_encoder(self.tokenizer(missing).to(device), clip_skip=self.clip_skip)
            self.cache.update({p: s for p, s in zip(missing, states)})
        return torch.stack([self.cache[p] for p in prompts])


class Batch(NamedTuple):
    latents: torch.Tensor  # 2B x 4 x h x w: the instance samples, then their class samples (B without classes)
    prompts: list[str]
    generators: list[torch.Generator]
    masks: torch.Tensor | None  # 2B x 1 x h x w loss weights (data.masks; class samples all ones)
    subjects: torch.Tensor  # B x S one-hot: which subject each instance sample is of
    num_instance: int  # B: the instance samples come first


class DreamBoothBatches:
    """Dataset items (plan.DataPlan) -> one training batch: the instance samples, then their paired
    class samples, all of one size (the items' bucket)."""

    def __init__(self, plan: DataPlan, latents: LatentSource, seed: int, caption_dropout: float, masks: bool):
        self.plan, self.source, self.seed = plan, latents, seed
        self.caption_dropout, self.masks = caption_dropout, masks

    def batch(self, items: list[Item]) -> Batch:
        plan = self.plan
        entries = [plan.items[item.index] for item in items]
        (size,) = {entry.bucket for entry in entries}  # the data order keeps a batch in one bucket
        instance_generators = [sample_generator(self.seed, item.epoch, item.position, 0) for item in items]
        instances = [plan.instances[entry.instance] for entry in entries]
        latents, masks = self.source.latents(instances, size, instance_generators, self.masks)
        prompts = [self.instance_prompt(example, g) for example, g in zip(instances, instance_generators)]
        generators = list(instance_generators)
        if plan.classes:
            class_generators = [sample_generator(self.seed, item.epoch, item.position, 1) for item in items]
            classes = [plan.classes[entry.klass] for entry in entries]
            class_latents, _ = self.source.latents(classes, size, class_generators, masks=False)
            latents = torch.cat([latents, class_latents])
            if masks is not None:
                masks = torch.cat([masks, torch.ones(len(items), *masks.shape[1:])])
            prompts += [example.prompt for example in classes]
            generators += class_generators
        subjects = torch.zeros(len(items), len(plan.subjects))
        subjects[torch.arange(len(items)), torch.tensor([entry.subject for entry in entries])] = 1.0
        return Batch(latents, prompts, generators, masks, subjects, len(items))

    def instance_prompt(self, example: Example, sample: torch.Generator) -> str:
        if self.caption_dropout and bool(torch.rand((), generator=caption_generator(sample)) < self.caption_dropout):
            return ""  # trains the unconditional branch that classifier-free guidance reads
        return example.prompt
