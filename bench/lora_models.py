"""minidream's LoRA-adapted UNet and diffusers' UNet with PEFT adapters: one frozen base (the same
Parameter objects, in the base dtype) and adapters of equal values, set up as train.py and
diffusers' examples/dreambooth/train_dreambooth_lora.py set them up.

train_dreambooth_lora.py: `unet.requires_grad_(False)`, `unet.to(dtype=weight_dtype)`,
`unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`, then `cast_training_params(unet,
torch.float32)` (the script casts under fp16 only; under bf16 PEFT's adapters would stay bf16,
here they are fp32 in both so that the two compute the same thing). minidream (train.py):
`add_lora(unet, "attention", rank)` and `train_adapters_only(unet, amp_dtype)`.
"""

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from bench.common import Settings
from bench.models import compile_in_place, placement, unet_twins
from minidream.models.lora import (
    LowRankAdapted,
    adapted_layers,
    add_lora,
    train_adapters_only,
)
from minidream.models.unet import UNet

PEFT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_dreambooth_lora.py's, = minidream's "attention"
UP_STD = 0.1  # the up weights start at zero in both; seeded values make the adapters change the output
# (at the tiny config by ~6% and the loss by ~0.9%, well above the loss check's tolerance)


@dataclass
class LoRAPair:
    """The two adapted UNets over one frozen base, and each one's trainable adapter parameters."""

    unet: UNet
    twin: UNet2DConditionModel
    adapters: dict[str, list[torch.nn.Parameter]]  # by implementation

    def parameters(self, impl: str) -> list[torch.nn.Parameter]:
        """All of one implementation's parameters: the shared base and its own adapters."""
        return list((self.unet if impl == "minidream" else self.twin).parameters())


def peft_layers(twin: UNet2DConditionModel) -> list[LoraLayer]:
    return [module for module in twin.modules() if isinstance(module, LoraLayer)]


def adapter_parameter_count(pair: LoRAPair, impl: str) -> int:
    return sum(p.numel() for p in pair.adapters[impl])


@torch.no_grad()
def copy_adapters(unet: UNet, twin: UNet2DConditionModel, seed: int) -> None:
    """Seeded up weights for minidream's adapters, then minidream's down/up copied into PEFT's
    lora_A/lora_B, layer by layer: a PEFT layer's base weight is the very Parameter of its
    minidream twin, which is how the layers are paired."""
    generator = torch.Generator().manual_seed(seed)
    by_weight: dict[int, LowRankAdapted] = {}
    for layer in adapted_layers(unet).values():
        layer.lora_up.weight.copy_(UP_STD * torch.randn(layer.lora_up.weight.shape, generator=generator))
        by_weight[id(layer.weight)] = layer
    layers = peft_layers(twin)
    if len(layers) != len(by_weight):
        raise RuntimeError(f"PEFT adapted {len(layers)} layers, minidream {len(by_weight)}")
    for peft_layer in layers:
        ours = by_weight[id(peft_layer.get_base_layer().weight)]
        peft_layer.lora_A["default"].weight.copy_(ours.lora_down.weight)  # rank x in
        peft_layer.lora_B["default"].weight.copy_(ours.lora_up.weight)  # out x rank


def lora_pair(settings: Settings, rank: int, gradient_checkpointing: bool) -> LoRAPair:
    """The pair on the device, base frozen in --dtype, fp32 adapters of equal values, in training
    mode, compiled in place with --compile."""
    unet, twin = unet_twins(settings.model_config.unet, settings.seed, placement(settings, torch.float32), share_parameters=True)
    add_lora(unet, "attention", rank=rank, generator=settings.seed)
    ours = train_adapters_only(unet, settings.dtype)  # casts the shared base Parameters: the twin's too
    twin.requires_grad_(False)
    twin.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    cast_training_params(twin, torch.float32)
    theirs = [p for p in twin.parameters() if p.requires_grad]
    copy_adapters(unet, twin, settings.seed)
    unet.train()
    twin.train()
    if gradient_checkpointing:
        unet.gradient_checkpointing = True
        twin.enable_gradient_checkpointing()
    compile_in_place(settings, unet, twin)
    return LoRAPair(unet, twin, {"minidream": ours, "diffusers": theirs})
