"""A file at SD 2.1's full shapes as stabilityai releases it (no minidream metadata, fp16):
loaded by shape detection and ComfyUI's prediction-type rule, from .safetensors and from .ckpt
(weights only), written back bit for bit, and read by diffusers' own converters as minidream's
modules. ~2.6 GB of fp16 tensors, files and memory maps; the file is removed when the module ends.
"""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_sd2_single_file import assert_converters_give_our_modules

from minidream.config import SD21, SD21_BASE
from minidream.io.single_file import V_PREDICTION_PROBE, single_file_tensors
from minidream.io.tensor_files import read_tensor_file
from minidream.io.weights import load_pipeline, save_pipeline
from minidream.models.pipeline import random_pipeline

pytestmark = pytest.mark.sd_shapes  # full SD 2.1 shapes


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """SD 2.1 768-v's layout and shapes with random fp16 weights; the probe spread as in 768-v files."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in fp16: one copy of 1.3B parameters, not an fp32 one
    try:
        pipe = random_pipeline(SD21_BASE, seed=0)
    finally:
        torch.set_default_dtype(default)
    tensors = single_file_tensors(pipe, None)
    tensors[V_PREDICTION_PROBE].normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    del pipe
    path = tmp_path_factory.mktemp("sd21") / "v2-1_768-ema-pruned.safetensors"
    save_file(tensors, path)  # no metadata, as the release
    del tensors
    yield path
    shutil.rmtree(path.parent)  # 2.6 GB: gone before the next module's files are made


def test_full_sd21_loads_round_trips_and_converts(release, tmp_path):
    with pytest.warns(UserWarning, match="as v_prediction by ComfyUI's rule"):
        pipe = load_pipeline(release)
    assert pipe.config == SD21 and pipe.dtype == torch.float16
    assert load_pipeline(release, prediction_type="epsilon").config == SD21_BASE

    written = tmp_path / "again.safetensors"
    save_pipeline(pipe, written, dtype=None)
    original, again = read_tensor_file(release)[0], read_tensor_file(written)[0]  # memory-mapped
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    del again
    assert load_pipeline(written).config == SD21  # the metadata now records it, no rule runs

    _, text = assert_converters_give_our_modules(original, pipe)
    assert len(text) == 4 + 16 * 23  # 23 layers of 16 tensors, as SD 2.1's text_encoder/ holds


def test_full_sd21_ckpt_reads_weights_only(release, tmp_path):
    ckpt = tmp_path / "v2-1_768-ema-pruned.ckpt"
    tensors = read_tensor_file(release)[0]
    torch.save({"state_dict": tensors, "global_step": 110000}, ckpt)  # LDM's checkpoint dict
    with pytest.warns(UserWarning, match="ComfyUI's rule"):
        pipe = load_pipeline(ckpt)
    assert pipe.config == SD21
    ours = single_file_tensors(pipe, None)
    assert ours.keys() == tensors.keys() and all(torch.equal(ours[k], tensors[k]) for k in ours)
