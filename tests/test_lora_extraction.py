"""`convert --extract-lora`: a LoRA extracted from a full fine-tune by truncated SVD gives the
tuned weights back when the difference has the extracted rank (a rank-4 LoRA merged, then
extracted at rank 4: <= 1e-4 relative per layer, 3x3 convs included), leaves exactly the SVD
truncation error at a lower rank (Eckart–Young: sqrt of the discarded σ², within 1%), and the
file opens in diffusers' load_lora_weights with every adapter used.
"""

import copy

import pytest
import torch
from reference_models import relative_error
from test_lora_files import assert_opens_as_in_diffusers, pair  # noqa: F401 (a fixture)

from minidream.config import TINY, TINY_SD2
from minidream.io import convert
from minidream.io.lora_extraction import extract_lora, truncated_svd
from minidream.io.lora_files import merge_lora, read_lora_file, write_lora_file
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models.lora import layer_weight, target_layers
from minidream.models.pipeline import random_pipeline


def fine_tuned(base, rank, seed=0):
    """`base` with a random rank-`rank` change added to every `all` target (the OpenCLIP tower's
    in_proj row-blocks each their own): a full fine-tune whose every difference has rank `rank`."""
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (tuned.unet, *tuned.text_encoders):
            for name in target_layers(model, "all"):
                weight = layer_weight(model, name)
                up, down = torch.randn(weight.shape[0], rank, generator=gen), torch.randn(rank, weight[0].numel(),
                                                                                       generator=gen)
                weight += (0.05 * up @ down).reshape(weight.shape)
    return tuned


def differences(tuned, base):
    """{(part, layer): tuned - base} over every `all` target."""
    return {(part, name): (layer_weight(getattr(tuned, part), name) - layer_weight(getattr(base, part), name)).detach()
            for part in ("unet", "text_encoder") for name in target_layers(getattr(base, part), "all")}


def test_rank4_lora_merged_then_extracted_at_rank4_gives_the_tuned_weights_back(tmp_path):
    base = random_pipeline(TINY)
    tuned = fine_tuned(base, rank=4)
    base_file, tuned_file, out = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors"
    save_pipeline(base, base_file, dtype=torch.float32)
    save_pipeline(tuned, tuned_file, dtype=torch.float32)
    assert convert.main([str(tuned_file), str(out), "--extract-lora", "--base", str(base_file), "--rank", "4",
                         "--dtype", "fp32"]) == 0
    lora = read_lora_file(out, TINY)
    assert {adapter.rank for part in lora.parts().values() for adapter in part.values()} == {4}
    convs = [name for name, adapter in lora.unet.items() if adapter.down.shape[2:] == (3, 3)]
    assert len(convs) >= 10  # the ResBlocks' and down/upsamplers' 3x3 convs, kohya's LoCon layout
    back = load_pipeline(base_file, dtype=torch.float32, loras=[(out, 1.0)])
    for (part, name), delta in differences(tuned, base).items():
        assert name in lora.parts()[part], name  # every changed layer was extracted
        error = relative_error(layer_weight(getattr(back, part), name), layer_weight(getattr(tuned, part), name))
        assert error <= 1e-4, (part, name, error)


def test_at_a_lower_rank_the_error_is_the_svd_truncation_bound():
    base = random_pipeline(TINY)
    tuned = fine_tuned(base, rank=4, seed=5)
    lora, fits = extract_lora(tuned, base, rank=2, conv_rank=3)
    back = copy.deepcopy(base)
    merge_lora(back, lora)
    fit_of = {(fit.part, fit.name): fit for fit in fits}
    for (part, name), delta in differences(tuned, base).items():
        rank = 3 if delta.ndim == 4 and delta.shape[2:] == (3, 3) else 2
        sigma = torch.linalg.svdvals(delta.flatten(1).double())
        bound = sigma[rank:].square().sum().sqrt().item()  # Eckart–Young: the best rank-r error
        error = (layer_weight(getattr(back, part), name) - layer_weight(getattr(tuned, part), name)).norm().item()
        assert abs(error - bound) <= 0.01 * bound, (part, name, error, bound)
        reported = fit_of[part, name].relative_error
        assert abs(reported - bound / sigma.square().sum().sqrt().item()) <= 0.01 * reported, (part, name)


def test_a_kept_energy_fraction_picks_the_smallest_rank_that_keeps_it():
    delta = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5])) @ torch.linalg.qr(torch.randn(4, 16).T)[0].T
    # energies 16, 4, 1, 0.25 of 21.25: rank 1 keeps 75.3%, rank 2 94.1%, rank 3 98.8%
    assert [truncated_svd(delta, fraction)[0].rank for fraction in (0.7, 0.9, 0.95, 0.999)] == [1, 2, 3, 4]


def test_the_extracted_file_loads_in_diffusers_with_every_adapter_used(pair, tmp_path):
    reference, ours = pair
    tuned = fine_tuned(ours, rank=4, seed=7)
    lora, _ = extract_lora(tuned, ours, rank=4, conv_rank=4)
    path = tmp_path / "extracted.safetensors"
    write_lora_file(path, lora, TINY, "kohya", torch.float32)
    assert_opens_as_in_diffusers(path, pair)  # diffusers' model = minidream's merge of the file
    used = sum(1 for model in (reference.unet, reference.text_encoder) for module in model.modules()
               if "default_0" in getattr(module, "lora_A", {}))
    assert used == sum(len(adapters) for adapters in lora.parts().values())


def test_sd2_open_clip_in_proj_slices_are_extracted_per_slice():
    base = random_pipeline(TINY_SD2)
    tuned = fine_tuned(base, rank=2, seed=9)
    lora, fits = extract_lora(tuned, base, rank=2, conv_rank=2)
    assert any(name.endswith("in_proj_q") for name in lora.text_encoder)
    assert max(fit.relative_error for fit in fits) <= 1e-3  # rank-2 differences, extracted at rank 2


def test_extraction_needs_base_and_rank_and_refuses_other_architectures(tmp_path, capsys):
    tiny, sd2 = tmp_path / "tiny.safetensors", tmp_path / "sd2.safetensors"
    save_pipeline(random_pipeline(TINY), tiny)
    save_pipeline(random_pipeline(TINY_SD2), sd2)
    out = tmp_path / "out.safetensors"
    assert convert.main([str(tiny), str(out), "--extract-lora", "--rank", "4"]) == 2
    assert "--extract-lora needs --base" in capsys.readouterr().err
    assert convert.main([str(tiny), str(out), "--extract-lora", "--base", str(sd2), "--rank", "4"]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert convert.main([str(tiny), str(out), "--extract-lora", "--base", str(tiny), "--rank", "4"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        convert.main([str(tiny), str(out), "--extract-lora", "--base", str(tiny), "--rank", "1.5"])
