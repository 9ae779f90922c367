"""minidream models and their diffusers twins, built from one config and holding the very same
parameter storage: identical weights by construction, and one copy in memory.

The one place both the benchmarks and the parity tests (tests/test_unet.py, test_vae.py) get
their twins from. It lives here rather than in tests/ because the benchmarks run where the
tests are not on the path (the GPU machine gets `python -m bench.gpu_suite`), while the tests
already import `bench` (pytest's `pythonpath = .`).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.common import SD15_TFLOP, Settings, latent_scale
from minidream.config import UNetConfig, VAEConfig
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from minidream.models.unet import UNet, size_conditioning
from minidream.models.vae import AutoencoderKL

IMPLEMENTATIONS = ("minidream", "diffusers")
UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def perturb_vectors(model: nn.Module, seed: int) -> nn.Module:
    """Norm weights start at exactly 1 and biases at 0, where a swapped or dropped tensor would
    go unnoticed: add seeded noise to every 1-D parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@dataclass(frozen=True)
class Placement:
    """Where the twins live: the parity tests' default, or a benchmark's device and dtype."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    memory_format: torch.memory_format = torch.contiguous_format


def _seeded(build: Callable[[], nn.Module], seed: int, placement: Placement) -> nn.Module:
    """A model with torch's default initialisation drawn from `seed` (the global RNG left as it
    was), its 1-D parameters perturbed, placed, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model = perturb_vectors(model, seed)
    return model.to(device=placement.device, dtype=placement.dtype, memory_format=placement.memory_format).eval()


def _twin(model: nn.Module, diffusers_class, config: dict, rename, share_parameters: bool) -> nn.Module:
    """A diffusers model whose parameters are `model`'s tensors, renamed (1x1 convs seen as linears).

    share_parameters: the twin holds `model`'s very Parameter objects, so one optimizer serves
    both (benchmarks); otherwise its own Parameters over the same storage, so each model gets
    its own gradients (gradient parity tests).
    """
    with torch.device("meta"):
        twin = diffusers_class.from_config(config)
    twin.load_state_dict(rename(model.state_dict(keep_vars=share_parameters)), strict=True, assign=True)
    if {p.data_ptr() for p in twin.parameters()} != {p.data_ptr() for p in model.parameters()}:
        raise RuntimeError("the diffusers twin does not share every parameter's storage with the minidream model")
    return twin.eval()


def unet_twins(
    cfg: UNetConfig, seed: int, placement: Placement = Placement(), share_parameters: bool = False
) -> tuple[UNet, UNet2DConditionModel]:
    """A seeded random minidream UNet, and diffusers' UNet over its storage. SD 1.x has no 1x1
    convs seen as linears, so with share_parameters every Parameter is shared."""
    unet = _seeded(lambda: UNet(cfg), seed, placement)
    twin = _twin(unet, UNet2DConditionModel, unet_config_to_diffusers(cfg), lambda sd: unet_to_diffusers(sd, cfg), share_parameters)
    if share_parameters and {id(p) for p in twin.parameters()} != {id(p) for p in unet.parameters()}:
        raise RuntimeError("the UNets do not share their Parameter objects: one optimizer would not serve both")
    return unet, twin


def vae_twins(cfg: VAEConfig, seed: int, placement: Placement = Placement()) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    """A seeded random minidream VAE, and diffusers' VAE over its storage (its attention linears
    are views of minidream's 1x1 convs: Parameters of their own)."""
    vae = _seeded(lambda: AutoencoderKL(cfg), seed, placement)
    twin = _twin(vae, DiffusersAutoencoderKL, vae_config_to_diffusers(cfg), lambda sd: vae_to_diffusers(sd, cfg), False)
    return vae, twin


def memory_format(settings: Settings) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format


def compile_in_place(settings: Settings, *modules: nn.Module) -> None:
    """Compile in place with --compile. Static shapes: each batch size gets its own graph,
    compiled during its warm-up calls."""
    if settings.compile:
        for module in modules:
            module.compile(dynamic=False, backend=settings.compile_backend)


def placement(settings: Settings, dtype: torch.dtype) -> Placement:
    return Placement(settings.device, dtype, memory_format(settings))


def unet_pair(settings: Settings, dtype: torch.dtype) -> tuple[UNet, UNet2DConditionModel]:
    """The benchmark's UNets: on its device, sharing their Parameter objects (one optimizer's
    step serves either model), compiled in place with --compile."""
    unet, twin = unet_twins(settings.model_config.unet, settings.seed, placement(settings, dtype), share_parameters=True)
    compile_in_place(settings, unet, twin)
    return unet, twin


def vae_pair(settings: Settings, dtype: torch.dtype) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    vae, twin = vae_twins(settings.model_config.vae, settings.seed, placement(settings, dtype))
    # encode / decode are methods, not forward: compile the encoder and decoder they call.
    compile_in_place(settings, vae.encoder, vae.decoder, twin.encoder, twin.decoder)
    return vae, twin


@dataclass(frozen=True)
class VectorConditioning:
    """SDXL's vector conditioning of a batch, as each implementation takes it: minidream as
    y = `size_conditioning(pooled, size_ids)`, diffusers as `added_cond_kwargs`, each building
    the Fourier features of the ids inside its call."""

    pooled: torch.Tensor  # B x 1280: bigG's pooled projection
    size_ids: torch.Tensor  # B x 6: original height, width, crop top, left, target height, width


def unet_forward(
    impl: str, unet: UNet, twin: UNet2DConditionModel, vector: VectorConditioning | None = None
) -> UNetForward:
    """eps = forward(x, t, context) of one implementation of the pair; `vector`: SDXL's y for
    the batch (None for models without it)."""
    if impl == "minidream" and vector is None:
        return unet
    if impl == "minidream":

        def forward_with_y(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return unet(x, t, context, size_conditioning(vector.pooled, vector.size_ids, unet.config.size_embed_dim))

        return forward_with_y
    added = None if vector is None else {"text_embeds": vector.pooled, "time_ids": vector.size_ids}

    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return twin(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    return forward


def unet_tflop(settings: Settings, batch: int, latent: int, backward: bool) -> float:
    """Model FLOPs of one UNet call, forward or forward and backward, at batch x latent x latent, in
    TFLOP: DESIGN.md's figures for SD 1.5 (scaled by the latent's area), counted for other shapes."""
    if settings.config_name == "sd15":
        return SD15_TFLOP["unet_train" if backward else "unet_forward"] * batch * latent_scale(latent, latent)
    cfg = settings.model_config
    return counted_unet_tflop(cfg.unet, batch, latent, cfg.text_encoder.context_length, backward)


@functools.cache
def counted_unet_tflop(cfg: UNetConfig, batch: int, latent: int, tokens: int, backward: bool) -> float:
    """torch's FlopCounterMode over one call of a meta-device UNet (matmuls, convolutions and
    attention; shapes only: no memory, no kernels). At SD 1.5's 512 px it counts 0.803 / 2.407
    TFLOP per sample, DESIGN.md's 0.80 / 2.41."""
    with torch.device("meta"):
        unet = UNet(cfg).requires_grad_(backward)
        x = torch.empty(batch, cfg.in_channels, latent, latent)
        context = torch.empty(batch, tokens, cfg.context_dim)
        y = None if cfg.adm_in_channels is None else torch.empty(batch, cfg.adm_in_channels)
        t = torch.zeros(batch)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = unet(x, t, context, y)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 1e12
