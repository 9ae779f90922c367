"""Training images to latents and prompts to text states, with caching where it is exact.

Latents: when crops are centred and nothing is flipped, the VAE's output distribution of an
image never changes, so each image is encoded once and only the sample from that
distribution is drawn per step (from the sample's generator, as without the cache). The
cached distributions live on the host, where the samples are drawn: a batch then reaches the
GPU as one asynchronous copy.
Prompts: with a frozen text encoder each distinct prompt is encoded once.
"""

import torch

from minidream.models.clip import CLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.vae import AutoencoderKL
from minidream.training.data import Example, image_to_tensor, load_image
from minidream.training.step import Item, sample_generator, to_device


class LatentSource:
    """Scaled VAE latents (B x 4 x h x w) of a folder's images, one generator per sample."""

    def __init__(
        self,
        examples: list[Example],
        vae: AutoencoderKL,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        cache: bool,
        scaling_factor: float,
    ):
        self.vae = vae
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.scaling_factor = scaling_factor
        self.images = [load_image(example.path) for example in examples]  # a few MB each: decode once
        self.moments = None
        if cache and center_crop and not random_flip:
            self.moments = [
                tuple(m.cpu() for m in self._encode(image, flip=False, generator=None)) for image in self.images
            ]

    @torch.no_grad()
    def _encode(self, image, flip: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = image_to_tensor(image, self.resolution, self.center_crop, flip, generator)
        param = next(self.vae.parameters())
        posterior = self.vae.encode(to_device(pixels[None], param.device).to(param.dtype))
        return posterior.mean.float(), posterior.std.float()

    def latents(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        out = []
        for index, g in zip(indices, generators):
            if self.moments is not None:
                mean, std = self.moments[index]
            else:
                flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
                mean, std = self._encode(self.images[index], flip, g)
            noise = to_device(torch.randn(mean.shape, generator=g), mean.device)
            out.append((mean + std * noise) * self.scaling_factor)
        return torch.cat(out)

    def __len__(self) -> int:
        return len(self.images)


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


class DreamBoothBatches:
    """Dataset items -> one training batch: the instance samples, then their paired class samples.

    Item k pairs instance image k % n_instance with class image k % n_class, so an epoch
    (len(self) items) shows every image of the larger folder once.
    """

    def __init__(
        self,
        instances: list[Example],
        classes: list[Example],
        instance_latents: LatentSource,
        class_latents: LatentSource | None,
        seed: int,
    ):
        self.instances, self.classes = instances, classes
        self.instance_latents, self.class_latents = instance_latents, class_latents
        self.seed = seed

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def batch(self, items: list[Item]) -> tuple[torch.Tensor, list[str], list[torch.Generator]]:
        """(latents 2B x 4 x h x w (B without classes), their prompts, their generators)."""
        parts = [(self.instances, self.instance_latents, 0)]
        if self.class_latents is not None:
            parts.append((self.classes, self.class_latents, 1))
        latents, prompts, generators = [], [], []
        for examples, source, part in parts:
            indices = [item.index % len(examples) for item in items]
            part_generators = [sample_generator(self.seed, item.epoch, item.position, part) for item in items]
            latents.append(source.latents(indices, part_generators))
            prompts += [examples[i].prompt for i in indices]
            generators += part_generators
        return torch.cat(latents), prompts, generators
