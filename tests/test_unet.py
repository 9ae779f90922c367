"""The UNet equals diffusers' UNet2DConditionModel on the same weights, and its names are SD's."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from reference_models import (
    REL_TOL,
    SD15_UNET_CONFIG,
    SavedTensorBytes,
    relative_error,
    unet_inputs,
)

from bench.models import unet_twins
from minidream.config import TINY, UNetConfig
from minidream.io.diffusers_layout import unet_to_diffusers
from minidream.models.unet import LayerNorm32, UNet

# SD 2.x's knobs on a tiny model: a fixed head size, linear projections, two transformer
# blocks per level, a level without attention, and a context width unlike the channels.
TINY_SD2_STYLE = dataclasses.replace(
    TINY.unet, head_dim=16, use_linear_proj=True, transformer_depth=2, attention_levels=(1,), context_dim=48
)


@pytest.mark.sd_shapes
def test_sd15_has_exactly_sd15_parameter_count():
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


@pytest.mark.parametrize("cfg", [TINY.unet, TINY_SD2_STYLE], ids=["tiny", "tiny-sd2-knobs"])
def test_tiny_output_and_gradients_match_diffusers(cfg):
    unet, reference = unet_twins(cfg, seed=0)
    x, t, context = unet_inputs(cfg, [0, 1, 261.5, 999], height=16, width=8, seed=1)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    out = unet(x, t, context)
    expected = reference(x, t, context).sample
    assert relative_error(out, expected) <= REL_TOL

    # One scalar of both outputs, so every parameter gets a gradient.
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = unet_to_diffusers({name: p.grad for name, p in unet.named_parameters()}, cfg)
    for name, param in reference.named_parameters():
        assert relative_error(grads[name], param.grad) <= REL_TOL, name


def test_timestep_may_be_a_scalar_for_the_whole_batch():
    unet, _ = unet_twins(TINY.unet, seed=0)
    x, _, context = unet_inputs(TINY.unet, [500, 500], height=8, width=8, seed=1)
    with torch.no_grad():
        per_sample = unet(x, torch.tensor([500, 500]), context)
        assert torch.equal(unet(x, 500, context), per_sample)
        assert torch.equal(unet(x, torch.tensor(500), context), per_sample)
        assert not torch.allclose(unet(x, 499, context), per_sample)


def test_gradient_checkpointing_changes_memory_not_numbers():
    unet, _ = unet_twins(TINY.unet, seed=0)
    unet.train()
    x, t, context = unet_inputs(TINY.unet, [3, 700], height=16, width=16, seed=1)

    def run(checkpointing: bool):
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad()
        with SavedTensorBytes() as saved:
            out = unet(x, t, context)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}, saved.total

    out_plain, grads_plain, saved_plain = run(False)
    out_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert torch.equal(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item(), msg=name)
    assert saved_ckpt < saved_plain / 4


def test_channels_last_gives_the_same_output():
    unet, _ = unet_twins(TINY.unet, seed=0)
    x, t, context = unet_inputs(TINY.unet, [0, 999], height=16, width=8, seed=1)
    with torch.no_grad():
        expected = unet(x, t, context)
        unet.to(memory_format=torch.channels_last)
        out = unet(x.to(memory_format=torch.channels_last), t, context)
    assert relative_error(out, expected) <= 1e-5


def test_meta_build_then_assign_load_gives_a_working_model():
    source, _ = unet_twins(TINY.unet, seed=0)
    with torch.device("meta"):
        unet = UNet(TINY.unet)
    unet.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*unet.parameters(), *unet.buffers()])
    x, t, context = unet_inputs(TINY.unet, [10, 20], height=8, width=8, seed=1)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), source(x, t, context))


def test_bf16_autocast_stays_close_to_fp32():
    unet, _ = unet_twins(TINY.unet, seed=0)
    x, t, context = unet_inputs(TINY.unet, [0, 999], height=16, width=8, seed=1)
    with torch.no_grad():
        expected = unet(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, context)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), expected) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_stay_close_to_fp32(dtype):
    unet, _ = unet_twins(TINY.unet, seed=0)
    x, t, context = unet_inputs(TINY.unet, [0, 999], height=16, width=8, seed=1)
    with torch.no_grad():
        expected = unet(x, t, context)
        out = unet.to(dtype)(x.to(dtype), t, context.to(dtype))
    assert out.dtype == dtype
    assert relative_error(out.float(), expected) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_diffusers_bit_for_bit(dtype):
    """With half weights the norms run torch's own half kernels (fp32 statistics inside), as
    diffusers' do, so a sampling step in fp16/bf16 is the same as diffusers' to the bit."""
    unet, reference = unet_twins(TINY.unet, seed=0)
    x, t, context = unet_inputs(TINY.unet, [0, 999], height=16, width=16, seed=1)
    reference.to(dtype)
    with torch.no_grad():
        expected = reference(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample
        out = unet.to(dtype)(x.to(dtype), t, context.to(dtype))
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_layer_norm_statistics_are_fp32_for_half_inputs():
    norm = LayerNorm32(64).to(torch.float16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    # A large offset with a small spread: the statistics need more than half precision.
    x = (1000 + torch.randn(3, 64, generator=torch.Generator().manual_seed(0))).to(torch.float16)
    expected = torch.nn.functional.layer_norm(x.float(), (64,), norm.weight.float(), norm.bias.float())
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("cfg", [TINY.unet, TINY_SD2_STYLE], ids=["tiny", "tiny-sd2-knobs"])
@pytest.mark.parametrize("height, width", [(9, 8), (7, 13)])
def test_odd_latent_sizes_upsample_to_each_skip_as_diffusers_does(cfg, height, width):
    """A side the downsampling rounds up (9 -> 5) comes back at the skip connection's size (5 -> 9,
    not 10): diffusers' upsample_size."""
    unet, reference = unet_twins(cfg, seed=0)
    x, t, context = unet_inputs(cfg, [1, 500], height=height, width=width, seed=1)
    with torch.no_grad():
        out = unet(x, t, context)
        expected = reference(x, t, context).sample
    assert out.shape == x.shape and relative_error(out, expected) <= REL_TOL


@pytest.fixture(scope="module")
def sd15():
    """A random SD 1.5-sized diffusers UNet and minidream's, built once: 3.4 GB of shared weights."""
    unet, reference = unet_twins(UNetConfig(), seed=0)
    # batch 2, a non-square latent reaching every level (32 x 24 -> 4 x 3), the extreme timesteps.
    x, t, context = unet_inputs(UNetConfig(), [0, 999], height=32, width=24, seed=1)
    with torch.no_grad():
        out = unet(x, t, context)
        expected = reference(x, t, context).sample
    yield unet, (x, t, context), out, expected


@pytest.mark.sd_shapes
def test_sd15_output_matches_diffusers(sd15):
    _, _, out, expected = sd15
    assert relative_error(out, expected) <= REL_TOL


@pytest.mark.sd_shapes
def test_sd15_names_are_the_single_file_names(sd15):
    """diffusers' own converter for original SD checkpoints reads minidream's state dict, prefixed
    as in an SD 1.x file, into exactly the reference model's tensors and outputs."""
    unet, inputs, out, _ = sd15
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, SD15_UNET_CONFIG)

    with torch.device("meta"):
        converted_reference = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    converted_reference.load_state_dict(converted, strict=True, assign=True)
    with torch.no_grad():
        assert relative_error(converted_reference(*inputs).sample, out) <= REL_TOL


@pytest.mark.sd_shapes
def test_sd21_output_matches_diffusers():
    """SD 2.1's UNet (865,910,724 params: linear projections, 64-wide heads, 1024-wide context)
    against diffusers' UNet2DConditionModel in SD 2.1's config, sharing the weights."""
    from minidream.config import SD21

    unet, reference = unet_twins(SD21.unet, seed=3)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    x, t, context = unet_inputs(SD21.unet, [1, 998], height=16, width=8, seed=4)
    with torch.no_grad():
        assert relative_error(unet(x, t, context), reference(x, t, context).sample) <= REL_TOL
