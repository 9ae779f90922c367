"""LoRA adapters in the models: names kept, kohya's target sets and init, PEFT's layer math,
merge/unmerge, fp32 adapters on a half-precision base, saving and refusing adapter state."""

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from lora_helpers import remove_lora
from peft import LoraConfig, inject_adapter_in_model
from reference_models import relative_error
from test_clip import build_pair
from torch import nn
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TransformersCLIPTextModel

from minidream.config import SD15, TINY
from minidream.io.diffusers_layout import unet_config_to_diffusers
from minidream.io.lora_names import unet_layers
from minidream.models import lora
from minidream.models.clip import CLIPTextModel
from minidream.models.unet import UNet

# kohya sd-scripts networks/lora.py: the modules whose Linear / Conv2d children it adapts.
KOHYA_UNET = ["Transformer2DModel"]
KOHYA_UNET_CONV = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]  # added by conv_dim (LoCon)
KOHYA_TEXT_ENCODER = ["CLIPAttention", "CLIPMLP"]


def kohya_selection(model: nn.Module, containers: list[str], conv_3x3: bool) -> set[str]:
    """kohya's create_modules rule on a diffusers / transformers model: Linear and Conv2d children
    of the named module classes; 3x3 convs only with a conv_dim."""
    names = set()
    for outer, module in model.named_modules():
        if type(module).__name__ not in containers:
            continue
        for inner, child in module.named_modules():
            is_conv = isinstance(child, nn.Conv2d)
            if isinstance(child, nn.Linear) or (is_conv and (conv_3x3 or child.kernel_size == (1, 1))):
                names.add(f"{outer}.{inner}")
    return names


def adapted_with_random_up(model: nn.Module, targets: str, rank: int, alpha: float, seed: int) -> nn.Module:
    """`model` adapted, with the zero-initialised ups made random so the adapters change the output."""
    lora.add_lora(model, targets, rank, alpha, generator=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.adapted_layers(model).values():
            layer.lora_up.weight.copy_(0.3 * torch.randn(layer.lora_up.weight.shape, generator=generator))
    return model


def unet_inputs_tiny(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([20.0, 800.0]),
            torch.randn(2, 77, TINY.unet.context_dim, generator=generator))


@pytest.mark.parametrize("targets", ["transformer", "all"])
def test_unet_targets_are_kohyas_selection_on_diffusers_unet(targets):
    """At SD 1.5 shapes (meta device): minidream's target set, named the diffusers way, is the set
    kohya's rule picks on diffusers' own UNet2DConditionModel."""
    with torch.device("meta"):
        ours, theirs = UNet(SD15.unet), UNet2DConditionModel.from_config(unet_config_to_diffusers(SD15.unet))
    to_diffusers = {layer.minidream: layer.diffusers for layer in unet_layers(SD15.unet)}
    containers = KOHYA_UNET + (KOHYA_UNET_CONV if targets == "all" else [])
    expected = kohya_selection(theirs, containers, conv_3x3=targets == "all")
    assert {to_diffusers[name] for name in lora.target_layers(ours, targets)} == expected
    assert len(expected) == {"transformer": 192, "all": 278}[targets]


def test_attention_targets_are_the_diffusers_dreambooth_lora_recipe():
    """diffusers' train_dreambooth_lora.py adapts target_modules to_k/to_q/to_v/to_out.0 through PEFT."""
    with torch.device("meta"):
        ours, theirs = UNet(SD15.unet), UNet2DConditionModel.from_config(unet_config_to_diffusers(SD15.unet))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]), theirs)
    expected = {name.removesuffix(".lora_A") for name, _ in theirs.named_modules() if name.endswith(".lora_A")}
    to_diffusers = {layer.minidream: layer.diffusers for layer in unet_layers(SD15.unet)}
    assert {to_diffusers[name] for name in lora.target_layers(ours, "attention")} == expected
    assert len(expected) == 128


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_text_encoder_targets_are_kohyas(targets):
    with torch.device("meta"):
        ours = CLIPTextModel(SD15.text_encoder)
        theirs = TransformersCLIPTextModel(CLIPTextConfig(num_hidden_layers=12))
    containers = KOHYA_TEXT_ENCODER[: 1 if targets == "attention" else 2]
    expected = {"text_model." + name for name in kohya_selection(theirs, containers, conv_3x3=False)}
    assert set(lora.target_layers(ours, targets)) == expected
    assert len(expected) == {"attention": 48, "all": 72}[targets]


def test_unknown_targets_are_refused():
    with pytest.raises(ValueError, match="attention, transformer, all"):
        lora.target_layers(UNet(TINY.unet), "everything")


def test_adapters_keep_base_names_and_start_as_the_identity():
    torch.manual_seed(0)
    unet = UNet(TINY.unet)
    base_state = {key: value.clone() for key, value in unet.state_dict().items()}
    x, t, context = unet_inputs_tiny()
    with torch.no_grad():
        before = unet(x, t, context)
    names = lora.add_lora(unet, "all", rank=4)
    assert lora.base_state_dict(unet).keys() == base_state.keys()
    assert all(torch.equal(lora.base_state_dict(unet)[key], value) for key, value in base_state.items())
    assert set(lora.lora_state_dict(unet)) == {f"{name}.{part}" for name in names
                                               for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    # A base checkpoint still loads by its own keys; only the adapters' are left over.
    result = unet.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(lora.lora_state_dict(unet))
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), before)  # up = 0: the adapters change nothing yet


def test_init_is_kohyas_and_reproducible_from_the_seed():
    def adapters(seed):
        model = UNet(TINY.unet)
        lora.add_lora(model, "all", rank=4, generator=seed)
        return lora.lora_state_dict(model)

    first, again, other = adapters(7), adapters(7), adapters(8)
    assert all(torch.equal(first[key], again[key]) for key in first)
    downs = [key for key in first if key.endswith("lora_down.weight")]
    assert not torch.equal(first[downs[0]], other[downs[0]])
    for key in downs:
        down = first[key]
        fan_in = math.prod(down.shape[1:])
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) fan_in))
        assert down.abs().max() <= bound and down.abs().max() > 0.8 * bound, key
        assert torch.count_nonzero(first[key.replace("lora_down", "lora_up")]) == 0


def peft_twin(layer: nn.Module, rank: int, alpha: float) -> nn.Module:
    """The same base layer with PEFT's LoRA around it (as a one-layer model)."""
    holder = nn.Sequential(layer)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]), holder)
    return holder


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3-stride2"])
def test_adapted_layer_equals_peft(kind):
    torch.manual_seed(0)
    base = {
        "linear": lambda: nn.Linear(24, 40),
        "conv1x1": lambda: nn.Conv2d(24, 40, 1),
        "conv3x3": lambda: nn.Conv2d(24, 40, 3, padding=1),
        "conv3x3-stride2": lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1),
    }[kind]()
    x = torch.randn(3, 7, 24) if kind == "linear" else torch.randn(3, 24, 9, 9)
    reference = peft_twin(type(base)(*_args(base)), rank=4, alpha=6)
    with torch.no_grad():
        reference[0].base_layer.load_state_dict(base.state_dict())
    layer = (lora.LoRAConv2d if isinstance(base, nn.Conv2d) else lora.LoRALinear).around(base, 4, 6.0, 0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # a fresh adapter is zero: the identity
        layer.lora_down.weight.copy_(torch.randn(layer.lora_down.weight.shape, generator=generator))
        layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=generator))
        reference[0].lora_A["default"].weight.copy_(layer.lora_down.weight)
        reference[0].lora_B["default"].weight.copy_(layer.lora_up.weight)
        assert relative_error(layer(x), reference(x)) <= 1e-6
        assert relative_error(layer(x), base(x)) > 0.1  # the adapter matters at this scale


def _args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding
    return layer.in_features, layer.out_features


def test_merge_equals_the_adapters_and_unmerge_restores_the_base():
    """UNet with every target kind (linear, 1x1 and 3x3 convs, stride-2 Downsample), fp32:
    merged forward = unmerged forward to 1e-5 relative; unmerge gives back each base weight to
    within 1e-6 of its largest entry (two fp32 roundings: (W + d) - d), not bit for bit."""
    torch.manual_seed(0)
    unet = adapted_with_random_up(UNet(TINY.unet), "all", rank=4, alpha=2, seed=3)
    base = {key: value.clone() for key, value in lora.base_state_dict(unet).items()}
    x, t, context = unet_inputs_tiny()
    with torch.no_grad():
        unmerged = unet(x, t, context)
        lora.merge(unet)
        merged = unet(x, t, context)
        assert relative_error(merged, unmerged) <= 1e-5
        changed = [key for key, value in lora.base_state_dict(unet).items() if not torch.equal(value, base[key])]
        assert len(changed) == len(lora.adapted_layers(unet))
        lora.unmerge(unet)
        for key, value in lora.base_state_dict(unet).items():
            assert (value - base[key]).abs().max() <= 1e-6 * base[key].abs().max(), key
        assert relative_error(unet(x, t, context), unmerged) <= 1e-5


def test_remove_lora_merged_leaves_plain_layers_with_the_merged_weights():
    torch.manual_seed(0)
    unet = adapted_with_random_up(UNet(TINY.unet), "transformer", rank=2, alpha=4, seed=1)
    x, t, context = unet_inputs_tiny()
    with torch.no_grad():
        expected = unet(x, t, context)
        remove_lora(unet, merge_first=True)
        assert not lora.adapted_layers(unet)
        assert unet.state_dict().keys() == UNet(TINY.unet).state_dict().keys()
        assert relative_error(unet(x, t, context), expected) <= 1e-5


def test_adapters_stay_fp32_on_a_bf16_base_and_only_they_train():
    torch.manual_seed(0)
    reference = adapted_with_random_up(UNet(TINY.unet), "all", rank=4, alpha=4, seed=2)
    unet = adapted_with_random_up(UNet(TINY.unet), "all", rank=4, alpha=4, seed=2)
    unet.load_state_dict(reference.state_dict())
    trainable = lora.train_adapters_only(unet, torch.bfloat16)
    assert {id(p) for p in trainable} == {id(p) for n, p in unet.named_parameters() if lora.is_adapter_key(n)}
    for name, param in unet.named_parameters():
        assert param.dtype == (torch.float32 if lora.is_adapter_key(name) else torch.bfloat16), name
        assert param.requires_grad == lora.is_adapter_key(name), name
    x, t, context = unet_inputs_tiny()
    out = unet(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = reference(x, t, context)
    assert relative_error(out.float(), expected) <= 0.05  # bf16 base weights and activations
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None for n, p in unet.named_parameters() if not lora.is_adapter_key(n))


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = lora.LoRALinear.around(base, 4, 4.0, dropout=1.0)  # p = 1 drops the whole adapter input
    nn.init.normal_(layer.lora_down.weight)
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(layer.train()(x), base(x))
        assert relative_error(layer.eval()(x), base(x)) > 0.1


def test_text_encoder_adapters_change_it_and_merge_exactly():
    ours, _ = build_pair(TINY.text_encoder, seed=0)
    adapted_with_random_up(ours, "all", rank=2, alpha=1, seed=4)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = ours(ids)
        lora.merge(ours)
        assert relative_error(ours(ids), unmerged) <= 1e-5
        remove_lora(ours)
        assert relative_error(ours(ids), unmerged) > 1e-3  # the adapters were real


def test_adapter_state_round_trips_and_other_settings_are_refused():
    torch.manual_seed(0)
    trained = adapted_with_random_up(UNet(TINY.unet), "transformer", rank=4, alpha=4, seed=5)
    state = lora.lora_state_dict(trained)
    fresh = UNet(TINY.unet)
    fresh.load_state_dict(lora.base_state_dict(trained), strict=False)
    lora.add_lora(fresh, "transformer", rank=4, alpha=4)
    lora.load_lora_state_dict(fresh, state)
    x, t, context = unet_inputs_tiny()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context), trained(x, t, context))
    for targets, rank, alpha, fragment in [
        ("transformer", 8, 8, "different"), ("transformer", 4, 8, "alpha = 4, expected = 8"),
        ("attention", 4, 4, "unexpected"), ("all", 4, 4, "missing"),
    ]:
        other = UNet(TINY.unet)
        lora.add_lora(other, targets, rank, alpha)
        with pytest.raises(lora.AdapterMismatch) as error:
            lora.load_lora_state_dict(other, state)
        assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)


def test_adding_twice_is_refused():
    unet = UNet(TINY.unet)
    lora.add_lora(unet, "attention", rank=2)
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        lora.add_lora(unet, "transformer", rank=2)
