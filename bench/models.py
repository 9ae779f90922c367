"""minidream models and their diffusers twins, built from one config and holding the very same
parameter storage: identical weights by construction, and one copy in memory. With --compile
both sides are compiled in place, the same way."""

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from torch import nn

from bench.common import Settings
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL

IMPLEMENTATIONS = ("minidream", "diffusers")
UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _placed(model: nn.Module, settings: Settings, dtype: torch.dtype) -> nn.Module:
    """The model on the benchmark's device, in `dtype`, channels_last if asked."""
    model.to(device=settings.device, dtype=dtype)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _twin(model: nn.Module, diffusers_class, config: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers model whose parameters are `model`'s tensors, renamed (1x1 convs seen as linears)."""
    with torch.device("meta"):
        twin = diffusers_class.from_config(config)
    twin.load_state_dict(state_dict, strict=True, assign=True)
    if {p.data_ptr() for p in twin.parameters()} != {p.data_ptr() for p in model.parameters()}:
        raise RuntimeError("the diffusers twin does not share every parameter's storage with the minidream model")
    return twin


def _compile_if_asked(settings: Settings, *modules: nn.Module) -> None:
    """Compile in place with --compile. Static shapes: each batch size gets its own graph,
    compiled during its warm-up calls."""
    if settings.compile:
        for module in modules:
            module.compile(dynamic=False)


def unet_pair(settings: Settings, dtype: torch.dtype) -> tuple[UNet, UNet2DConditionModel]:
    """The UNets share their Parameter objects too (SD 1.x has no 1x1 convs to see as linears),
    so one optimizer's step serves either model."""
    cfg = settings.model_config.unet
    torch.manual_seed(settings.seed)
    unet = _placed(UNet(cfg), settings, dtype)
    renamed = unet_to_diffusers(unet.state_dict(keep_vars=True), cfg)
    twin = _twin(unet, UNet2DConditionModel, unet_config_to_diffusers(cfg), renamed)
    if {id(p) for p in twin.parameters()} != {id(p) for p in unet.parameters()}:
        raise RuntimeError("the UNets do not share their Parameter objects: one optimizer would not serve both")
    _compile_if_asked(settings, unet, twin)
    return unet, twin


def vae_pair(settings: Settings, dtype: torch.dtype) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    cfg = settings.model_config.vae
    torch.manual_seed(settings.seed)
    vae = _placed(AutoencoderKL(cfg), settings, dtype)
    renamed = vae_to_diffusers(vae.state_dict(keep_vars=True), cfg)
    twin = _twin(vae, DiffusersAutoencoderKL, vae_config_to_diffusers(cfg), renamed)
    # encode / decode are methods, not forward: compile the encoder and decoder they call.
    _compile_if_asked(settings, vae.encoder, vae.decoder, twin.encoder, twin.decoder)
    return vae, twin


def unet_forward(impl: str, unet: UNet, twin: UNet2DConditionModel) -> UNetForward:
    """eps = forward(x, t, context) of one implementation of the pair."""
    if impl == "minidream":
        return unet

    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return twin(x, t, encoder_hidden_states=context, return_dict=False)[0]

    return forward


def memory_format(settings: Settings) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format
