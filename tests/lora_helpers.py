"""Adapter surgery only the tests need: adapting a model from a file's adapters (to compare live
adapters with merged ones) and putting the plain layers back (to reuse a model between checks)."""

import torch
from torch import nn

from minidream.models.lora import Adapter, adapt_layer, adapted_layers


def load_adapters(model: nn.Module, adapters: dict[str, Adapter], dropout: float = 0.0) -> None:
    """Adapt the named layers of `model` with the given weights (e.g. read from a LoRA file)."""
    for name, adapter in adapters.items():
        layer = adapt_layer(model, name, adapter.rank, adapter.alpha, dropout)
        with torch.no_grad():
            layer.lora_down.weight.copy_(adapter.down)
            layer.lora_up.weight.copy_(adapter.up)


def remove_lora(model: nn.Module, merge_first: bool = False) -> None:
    """Put plain nn.Linear / nn.Conv2d layers back, holding the same weight Parameters
    (with the adapters folded in when merge_first; otherwise any merge is undone)."""
    for name, layer in adapted_layers(model).items():
        if merge_first:
            layer.merge()
        else:
            layer.unmerge()
        with torch.device("meta"):
            if isinstance(layer, nn.Conv2d):
                plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, bias=layer.bias is not None)
            else:
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight, plain.bias = layer.weight, layer.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain.train(layer.training))
