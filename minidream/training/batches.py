"""Training images to latents and prompts to text states, with caching where it is exact.

Latents: images are decoded when a batch needs them (memory does not grow with the data set).
Where the VAE's input for an image is known before any draw — centred crops and no flips — its
output distribution never changes, so `MomentsInMemory` keeps it and only the sample from that
distribution is drawn per step (from the sample's generator, as without the cache). With
data.latent_cache_dir a disk cache (latent_cache.LatentCache, keyed by the file's bytes, the VAE
and the transform) takes that role for any transform. Either way the draws are those of the
uncached run, so the losses are bit-identical. The distributions live on the host, where the
samples are drawn: a batch then reaches the GPU as one asynchronous copy.
Prompts: with frozen text encoders each distinct prompt is encoded once.
"""

import functools
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
from torch import nn

from minidream.diffusion.sampling import Conditioning, text_conditioning
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latents B x 4 x h x w, with `masks` their loss weights B x 1 x h x w, and each sample's
        SDXL size ids B x 6 from what was done to its image: `Placement.size_ids`)."""
        out, weights, size_ids = [], [], []
        for example, g in zip(examples, generators):
            placement = self.placement(example, size, g)
            size_ids.append(placement.size_ids(example.size))
            if self.store is None:
                mean, std = self._encode(example.path, placement)
            else:
                encode = functools.partial(self._encode_to_host, example.path, placement)
                mean, std = self.store.moments(example.path, placement.key, encode)
            noise = to_device(torch.randn(mean.shape, generator=g), mean.device)
            out.append((mean + std * noise) * self.scaling_factor)
            if masks:
                weights.append(load_mask(example.mask, placement, tuple(mean.shape[-2:])))
        return torch.cat(out), torch.cat(weights) if masks else None, torch.tensor(size_ids, dtype=torch.float32)


class PromptEncoder:
    """Prompts -> the UNet's text conditioning (diffusion.sampling.Conditioning: the states of layer
    -clip_skip, and SDXL's pooled vector), from one text encoder or SDXL's two. What is frozen is
    remembered per prompt: a run encodes each distinct prompt once.

    SDXL: the empty prompt, which caption dropout gives, conditions on zeros, states and pooled
    alike. That is the unconditional input SDXL was trained with (sgm zeroes dropped captions) and
    the one its pipeline guides from (diffusers' force_zeros_for_empty_prompt): dropout then trains
    the branch that classifier-free guidance reads at sampling time."""

    def __init__(self, tokenizers: list[CLIPTokenizer], text_encoders: list[nn.Module], trainable: bool, clip_skip: int = 1):
        self.tokenizers, self.text_encoders, self.trainable = tokenizers, text_encoders, trainable
        self.clip_skip = clip_skip
        self.zeros_for_empty = len(text_encoders) == 2
        self.cache: dict[str, Conditioning] = {}

    def __call__(self, prompts: list[str], device: torch.device) -> Conditioning:
        if self.trainable:
            return self._encode(prompts, device)
        missing = sorted(set(prompts) - self.cache.keys())
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing, device)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = Conditioning(*(part[i] if part is not None else None for part in encoded))
        rows = [self.cache[p] for p in prompts]
        return Conditioning(*(torch.stack(parts) if parts[0] is not None else None for parts in zip(*rows)))

    def _encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        ids = [to_device(tokenizer(prompts), device) for tokenizer in self.tokenizers]
        conditioning = text_conditioning(self.text_encoders, ids, self.clip_skip)
        if not (self.zeros_for_empty and "" in prompts):
            return conditioning
        kept = to_device(torch.tensor([float(p != "") for p in prompts]), device)
        return Conditioning(*(part * kept.view(-1, *[1] * (part.ndim - 1)) for part in conditioning))


class Batch(NamedTuple):
    latents: torch.Tensor  # 2B x 4 x h x w: the instance samples, then their class samples (B without classes)
    prompts: list[str]
    size_ids: torch.Tensor  # 2B x 6: SDXL's micro-conditioning of each sample (data.Placement.size_ids)
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
        latents, masks, size_ids = self.source.latents(instances, size, instance_generators, self.masks)
        prompts = [self.instance_prompt(example, g) for example, g in zip(instances, instance_generators)]
        generators = list(instance_generators)
        if plan.classes:
            class_generators = [sample_generator(self.seed, item.epoch, item.position, 1) for item in items]
            classes = [plan.classes[entry.klass] for entry in entries]
            class_latents, _, class_ids = self.source.latents(classes, size, class_generators, masks=False)
            latents, size_ids = torch.cat([latents, class_latents]), torch.cat([size_ids, class_ids])
            if masks is not None:
                masks = torch.cat([masks, torch.ones(len(items), *masks.shape[1:])])
            prompts += [example.prompt for example in classes]
            generators += class_generators
        subjects = torch.zeros(len(items), len(plan.subjects))
        subjects[torch.arange(len(items)), torch.tensor([entry.subject for entry in entries])] = 1.0
        return Batch(latents, prompts, size_ids, generators, masks, subjects, len(items))

    def instance_prompt(self, example: Example, sample: torch.Generator) -> str:
        if self.caption_dropout and bool(torch.rand((), generator=caption_generator(sample)) < self.caption_dropout):
            return ""  # trains the unconditional branch that classifier-free guidance reads
        return example.prompt
