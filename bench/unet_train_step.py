"""UNet training step, minidream against diffusers: forward, MSE loss, backward, AdamW step (or,
with --workload sample, the UNet call of one guided sampling step).

fp32 master weights with the forward under autocast in --dtype, as train.py and diffusers'
train_dreambooth.py run; fused AdamW, as train.py uses. The two models hold the same parameters and
share one optimizer, so only the forward and backward differ between them. The sampling step is
the forward on the doubled (uncond + cond) batch, weights and inputs in --dtype, without autograd,
as sample.py and diffusers' pipelines run it. SDXL shapes get their vector conditioning y too.
"""

import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import (
    Row,
    Settings,
    command,
    compared,
    parser,
    report,
    settings_from,
    time_alternating,
)
from bench.models import (
    IMPLEMENTATIONS,
    UNetForward,
    VectorConditioning,
    memory_format,
    unet_forward,
    unet_pair,
    unet_tflop,
)

TrainingInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def training_inputs(settings: Settings, batch: int, latent: int) -> TrainingInputs:
    """Seeded noisy latents, timesteps, text context and target noise on the device."""
    cfg = settings.model_config
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent, generator=generator)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (batch,), generator=generator)
    context = torch.randn(batch, cfg.text_encoder.context_length, cfg.unet.context_dim, generator=generator)
    target = torch.randn(batch, cfg.unet.out_channels, latent, latent, generator=generator)
    x = x.to(settings.device, memory_format=memory_format(settings))
    return x, t.to(settings.device), context.to(settings.device), target.to(settings.device)


def vector_inputs(settings: Settings, batch: int, latent: int, dtype: torch.dtype = torch.float32) -> VectorConditioning | None:
    """SDXL's y for the batch, on the device: a seeded pooled embedding, and diffusers' default
    size ids for images of the latent's size (original size = target size, no crop). None for
    models without y."""
    pooled_encoder = settings.model_config.text_encoder_2
    if pooled_encoder is None:
        return None
    size = 8 * latent  # the VAE's factor
    size_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(batch, -1)
    pooled = torch.randn(batch, pooled_encoder.width, generator=torch.Generator().manual_seed(settings.seed + 1))
    return VectorConditioning(pooled.to(settings.device, dtype), size_ids.to(settings.device))


def make_optimizer(params: list[torch.nn.Parameter], name: str) -> torch.optim.Optimizer | None:
    if name == "none":
        return None
    return torch.optim.AdamW(params, lr=1e-6, fused=True)


def train_step(
    forward: UNetForward,
    inputs: TrainingInputs,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    settings: Settings,
) -> torch.Tensor:
    """One optimizer step. The loss is returned as a tensor, never read: no host sync in the step."""
    x, t, context, target = inputs
    with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32):
        prediction = forward(x, t, context)
    loss = F.mse_loss(prediction.float(), target)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    for param in params:  # zero_grad(set_to_none=True), with or without an optimizer
        param.grad = None
    return loss.detach()


def add_training_options(parser) -> None:
    parser.add_argument(
        "--workload", choices=["train", "sample"], default="train",
        help="sample: the UNet call of one guided sampling step, in place of the training step",
    )
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512px images)")
    parser.add_argument(
        "--optimizer", choices=["adamw", "none"], default="adamw",
        help="none: forward and backward only (SD 1.5's AdamW state needs 7 GB more)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on in both models")


SAMPLING_STEP = "UNet guided sampling step"


def step_benchmark(args) -> str:
    """The benchmark column for the workload and training options given."""
    if args.workload == "sample":
        return SAMPLING_STEP
    name = "UNet train step" if args.optimizer == "adamw" else "UNet forward+backward"
    return name + (", grad checkpointing" if args.gradient_checkpointing else "")


def training_models(settings: Settings, gradient_checkpointing: bool):
    """The UNet pair in training mode, fp32 master weights, checkpointing as asked."""
    unet, twin = unet_pair(settings, torch.float32)
    unet.train()
    twin.train()
    if gradient_checkpointing:
        unet.gradient_checkpointing = True
        twin.enable_gradient_checkpointing()
    return unet, twin


def training_runs(
    settings: Settings, unet, twin, params: list[torch.nn.Parameter], optimizer, batch: int, latent: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """One training step of each implementation at this batch, ready to call."""
    inputs = training_inputs(settings, batch, latent)
    vector = vector_inputs(settings, batch, latent)
    step = partial(train_step, inputs=inputs, params=params, optimizer=optimizer, settings=settings)
    return {impl: partial(step, unet_forward(impl, unet, twin, vector)) for impl in IMPLEMENTATIONS}


def training_row(benchmark: str, batch: int, latent: int, seconds: dict[str, float], settings: Settings) -> Row:
    tflop = unet_tflop(settings, batch, latent, backward=True)
    shape = f"batch {batch}, latent {latent}x{latent}"
    return compared(benchmark, shape, batch, "samples/s", tflop, seconds)


def sampling_step_runs(settings: Settings, unet, twin, batch: int, latent: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The UNet call of one guided denoising step of each implementation, ready to call: the
    doubled batch, inputs in --dtype (the pair's weights too: `unet_pair(settings, settings.dtype)`)."""
    x, t, context, _ = training_inputs(settings, 2 * batch, latent)
    vector = vector_inputs(settings, 2 * batch, latent, settings.dtype)
    x, context = x.to(settings.dtype), context.to(settings.dtype)
    return {
        impl: torch.no_grad()(partial(unet_forward(impl, unet, twin, vector), x, t, context))
        for impl in IMPLEMENTATIONS
    }


def sampling_step_row(batch: int, latent: int, seconds: dict[str, float], settings: Settings) -> Row:
    tflop = unet_tflop(settings, 2 * batch, latent, backward=False)
    shape = f"batch {batch} x 2 (uncond + cond), latent {latent}x{latent}"
    return compared(SAMPLING_STEP, shape, 1, "steps/s", tflop, seconds)


def training_rows(args, settings: Settings) -> list[Row]:
    unet, twin = training_models(settings, args.gradient_checkpointing)
    params = list(unet.parameters())
    optimizer = make_optimizer(params, args.optimizer)
    rows = []
    for batch in args.batches:
        seconds = time_alternating(training_runs(settings, unet, twin, params, optimizer, batch, args.latent), settings)
        rows.append(training_row(step_benchmark(args), batch, args.latent, seconds, settings))
    return rows


def sampling_step_rows(args, settings: Settings) -> list[Row]:
    unet, twin = unet_pair(settings, settings.dtype)
    rows = []
    for batch in args.batches:
        seconds = time_alternating(sampling_step_runs(settings, unet, twin, batch, args.latent), settings)
        rows.append(sampling_step_row(batch, args.latent, seconds, settings))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    add_training_options(options)
    args = options.parse_args(argv)
    settings = settings_from(args)
    rows = (sampling_step_rows if args.workload == "sample" else training_rows)(args, settings)
    report(rows, settings, command(__spec__.name, argv))
    return rows


if __name__ == "__main__":
    main()
