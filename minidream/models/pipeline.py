"""The parts of a Stable Diffusion model, held together with their config: the UNet, the VAE, the
text encoder and its tokenizer, and SDXL's second text encoder and tokenizer."""

from dataclasses import dataclass

import torch

from minidream.config import ModelConfig, TextEncoderConfig
from minidream.models.clip import CLIPTextModel
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.precision import vae_dtype
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL


@dataclass
class Pipeline:
    """What `load_pipeline` returns: the models, the tokenizers, and the config they were built
    from (its `schedule` part is the scheduler setting of the checkpoint). `text_encoder_2` and
    `tokenizer_2` are SDXL's OpenCLIP ViT-bigG/14 and its tokenizer, None for SD 1.x and 2.x."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | OpenCLIPTextModel
    tokenizer: CLIPTokenizer
    config: ModelConfig
    text_encoder_2: OpenCLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def text_encoders_by_name(self) -> dict[str, CLIPTextModel | OpenCLIPTextModel]:
        """The text encoders by attribute (= checkpoint) name: "text_encoder", and SDXL's "text_encoder_2"."""
        second = {"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {"text_encoder": self.text_encoder} | second

    @property
    def text_encoders(self) -> list[CLIPTextModel | OpenCLIPTextModel]:
        return list(self.text_encoders_by_name.values())

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """One per text encoder, in the same order."""
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the models in place; fp16 keeps the VAE in fp32 (see `vae_dtype`)."""
        for module in (self.unet, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=vae_dtype(dtype))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def random_pipeline(config: ModelConfig, seed: int = 0) -> Pipeline:
    """A pipeline with freshly initialised weights, reproducible from `seed` (tests, tiny runs)."""
    second = config.text_encoder_2
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        return Pipeline(
            unet=UNet(config.unet),
            vae=AutoencoderKL(config.vae),
            text_encoder=text_encoder_class(config.text_encoder)(config.text_encoder),
            tokenizer=default_tokenizer(config.text_encoder),
            config=config,
            text_encoder_2=None if second is None else OpenCLIPTextModel(second),
            tokenizer_2=None if second is None else default_tokenizer(second),
        )


def text_encoder_class(cfg: TextEncoderConfig) -> type[CLIPTextModel | OpenCLIPTextModel]:
    """The module layout of the text encoder: OpenCLIP's names (SD 2.x single files) or transformers'."""
    return OpenCLIPTextModel if cfg.open_clip else CLIPTextModel


def default_tokenizer(cfg: TextEncoderConfig) -> CLIPTokenizer:
    """The bundled CLIP vocabulary, padded as the text encoder was trained: SD 1.x pads with EOS,
    SD 2.x and SDXL's bigG with id 0 ("!"), as open_clip.tokenize zero-fills (a "!" typed in a
    prompt stays the ordinary "!</w>", id 256, as in open_clip, sgm and ComfyUI; diffusers'
    SDXL tokenizer_2, whose pad token is "!", turns it into id 0)."""
    return CLIPTokenizer(context_length=cfg.context_length, pad_token_id=0 if cfg.open_clip else None)
