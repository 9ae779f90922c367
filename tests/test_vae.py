"""The VAE equals diffusers' AutoencoderKL on the same weights, and its names are SD's."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from reference_models import (
    REL_TOL,
    SD15_VAE_CONFIG,
    SavedTensorBytes,
    images,
    relative_error,
)

from bench.models import vae_twins
from minidream.config import TINY, VAEConfig
from minidream.io.diffusers_layout import vae_to_diffusers
from minidream.models.vae import AutoencoderKL, DiagonalGaussian


@pytest.mark.sd_shapes
def test_sd15_has_exactly_sd15_parameter_count():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_tiny_encode_decode_and_gradients_match_diffusers():
    vae, reference = vae_twins(TINY.vae, seed=0)
    img = images(2, 64, 48, seed=1)
    posterior, expected_posterior = vae.encode(img), reference.encode(img).latent_dist
    assert relative_error(posterior.mean, expected_posterior.mean) <= REL_TOL
    assert relative_error(posterior.logvar, expected_posterior.logvar) <= REL_TOL

    # Decode the same latents in both, so the decoder comparison does not inherit encoder error.
    z = expected_posterior.mean.detach()
    out, expected = vae.decode(z), reference.decode(z).sample
    assert relative_error(out, expected) <= REL_TOL

    (out.square().mean() + posterior.kl().mean()).backward()
    (expected.square().mean() + expected_posterior.kl().mean()).backward()
    grads = vae_to_diffusers({name: p.grad for name, p in vae.named_parameters()}, TINY.vae)
    largest = max(param.grad.abs().max() for param in reference.parameters())
    for name, param in reference.named_parameters():
        if name.endswith("to_k.bias"):
            # Exactly zero in exact arithmetic (softmax ignores a shift shared by all keys): both
            # hold only rounding noise, which must be negligible against the other gradients.
            assert (grads[name] - param.grad).abs().max() <= REL_TOL * largest
        else:
            assert relative_error(grads[name], param.grad) <= REL_TOL, name


def test_diagonal_gaussian_matches_diffusers():
    generator = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 5, 3, generator=generator) * 3
    moments[0, 4:, 0, 0] = torch.tensor([-100.0, 100.0, -30.5, 20.5])  # beyond the clamp of logvar
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)

    assert torch.equal(ours.logvar, theirs.logvar)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    assert torch.equal(ours.std, theirs.std)
    assert torch.equal(ours.mode(), theirs.mode())
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-6, atol=0)
    sample = ours.sample(torch.Generator().manual_seed(7))
    assert torch.equal(sample, theirs.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(sample, ours.sample(torch.Generator().manual_seed(8)))


def test_gradient_checkpointing_changes_memory_not_numbers():
    vae, _ = vae_twins(TINY.vae, seed=0)
    vae.train()
    img = images(1, 32, 32, seed=1)

    def run(checkpointing: bool):
        vae.gradient_checkpointing = checkpointing
        vae.zero_grad()
        with SavedTensorBytes() as saved:
            out = vae.decode(vae.encode(img).sample(torch.Generator().manual_seed(3)))
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}, saved.total

    out_plain, grads_plain, saved_plain = run(False)
    out_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    assert saved_ckpt < saved_plain / 4
    assert torch.equal(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item(), msg=name)


def test_channels_last_gives_the_same_output():
    vae, _ = vae_twins(TINY.vae, seed=0)
    img = images(2, 32, 16, seed=1)
    with torch.no_grad():
        expected_mean = vae.encode(img).mean
        expected = vae.decode(expected_mean)
        vae.to(memory_format=torch.channels_last)
        mean = vae.encode(img.to(memory_format=torch.channels_last)).mean
        out = vae.decode(expected_mean.to(memory_format=torch.channels_last))
    assert relative_error(mean, expected_mean) <= 1e-5
    assert relative_error(out, expected) <= 1e-5


def test_meta_build_then_assign_load_gives_a_working_model():
    source, _ = vae_twins(TINY.vae, seed=0)
    with torch.device("meta"):
        vae = AutoencoderKL(TINY.vae)
    vae.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*vae.parameters(), *vae.buffers()])
    img = images(1, 32, 32, seed=1)
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(img).mean), source.decode(source.encode(img).mean))


def test_bf16_autocast_stays_close_to_fp32():
    vae, _ = vae_twins(TINY.vae, seed=0)
    img = images(1, 32, 32, seed=1)
    with torch.no_grad():
        expected = vae.decode(vae.encode(img).mean)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vae.decode(vae.encode(img).mean)
    assert relative_error(out.float(), expected) <= 3e-2


def test_fp16_weights_stay_close_to_fp32():
    vae, _ = vae_twins(TINY.vae, seed=0)
    img = images(1, 32, 32, seed=1)
    with torch.no_grad():
        expected = vae.decode(vae.encode(img).mean)
        vae.to(torch.float16)
        out = vae.decode(vae.encode(img.to(torch.float16)).mean)
    assert out.dtype == torch.float16
    assert relative_error(out.float(), expected) <= 3e-2


@pytest.fixture(scope="module")
def sd15():
    """A random SD 1.5-sized diffusers VAE and minidream's, built once, with their outputs on a
    64 x 48 image (latent 8 x 6): every level runs, on as few pixels as possible."""
    vae, reference = vae_twins(VAEConfig(), seed=0)
    img = images(2, 64, 48, seed=1)
    with torch.no_grad():
        posterior, expected_posterior = vae.encode(img), reference.encode(img).latent_dist
        z = expected_posterior.mean
        decoded, expected_decoded = vae.decode(z), reference.decode(z).sample
    yield vae, img, z, (posterior, decoded), (expected_posterior, expected_decoded)


@pytest.mark.sd_shapes
def test_sd15_encode_decode_match_diffusers(sd15):
    _, _, _, (posterior, decoded), (expected_posterior, expected_decoded) = sd15
    assert relative_error(posterior.mean, expected_posterior.mean) <= REL_TOL
    assert relative_error(posterior.logvar, expected_posterior.logvar) <= REL_TOL
    assert relative_error(decoded, expected_decoded) <= REL_TOL


@pytest.mark.sd_shapes
def test_sd15_names_are_the_single_file_names(sd15):
    """diffusers' own converter for original SD checkpoints (which also turns the attention's
    1x1 convs into linears) reads minidream's state dict, prefixed as in an SD 1.x file."""
    vae, img, z, (posterior, decoded), _ = sd15
    checkpoint = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, SD15_VAE_CONFIG)

    with torch.device("meta"):
        converted_reference = DiffusersAutoencoderKL.from_config(SD15_VAE_CONFIG)
    converted_reference.load_state_dict(converted, strict=True, assign=True)
    with torch.no_grad():
        assert relative_error(converted_reference.encode(img).latent_dist.mean, posterior.mean) <= REL_TOL
        assert relative_error(converted_reference.decode(z).sample, decoded) <= REL_TOL
