"""torch.compile sees the UNet as ONE graph (no graph breaks, static shapes per call): the
property CUDA graphs and `train.compile` / `sample.py --compile` rely on.

Compiled with the aot_eager backend (traces through AOTAutograd, forward and backward, without
inductor's minute-long CPU code generation), so the test is about graph capture, not speed.
"""

import functools

import torch
from train_runs import losses, train_args

import train
from minidream.config import TINY
from minidream.models.unet import UNet


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 999]), torch.randn(2, 77, 32, generator=g)


def test_unet_compiles_as_one_graph_forward_and_backward_with_checkpointing():
    torch.manual_seed(0)
    unet = UNet(TINY.unet).train()
    unet.gradient_checkpointing = True
    x, t, context = inputs()
    eager = unet(x, t, context)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    out = compiled(x, t, context)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(unet.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_train_compile_trains_the_same_run(tmp_path, training_data, monkeypatch):
    common = ("train.max_steps=3", "checkpoint.every_n_steps=3", "validation.prompts=[]")
    assert train.main(train_args(tmp_path / "eager", training_data, common)) == 0
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert train.main(train_args(tmp_path / "compiled", training_data, (*common, "train.compile=true"))) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert abs(eager[step] - compiled[step]) <= 1e-5 * abs(eager[step])


def test_sample_compile_gives_the_same_images(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import sample
    from minidream import save_pipeline
    from minidream.models.pipeline import random_pipeline

    weights = tmp_path / "tiny.safetensors"
    save_pipeline(random_pipeline(TINY, seed=0), weights, dtype=torch.float32)
    args = ["--weights", str(weights), "--prompt", "a toy", "--steps", "3", "--height", "32", "--width", "32"]
    assert sample.main([*args, "--out", str(tmp_path / "eager")]) == 0
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert sample.main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    eager, compiled = (np.asarray(Image.open(tmp_path / d / "00000-0.png")).astype(int) for d in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1
