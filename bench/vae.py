"""VAE encode (with a latent sample) and decode, minidream against diffusers.

Weights are cast to --dtype for both, as for inference. The latent sample draws its noise
from a CPU generator in both, as training does.
"""

import sys
from collections.abc import Callable

import torch

from bench.common import (
    SD15_TFLOP,
    Row,
    Settings,
    command,
    compared,
    parser,
    report,
    settings_from,
    time_alternating,
)
from bench.models import memory_format, vae_pair


def vae_runs(settings: Settings, vae, twin, batch: int, image: int) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """{"encode": {impl: call}, "decode": {impl: call}} on seeded images and latents."""
    cfg = settings.model_config.vae
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(batch, cfg.in_channels, image, image, generator=generator) * 2 - 1
    latents = torch.randn(batch, cfg.latent_channels, image // 8, image // 8, generator=generator)
    images, latents = (
        tensor.to(settings.device, settings.dtype, memory_format=memory_format(settings))
        for tensor in (images, latents)
    )

    def sample_generator() -> torch.Generator:
        return torch.Generator().manual_seed(settings.seed)

    return {
        "encode": {
            "minidream": lambda: vae.encode(images).sample(sample_generator()),
            "diffusers": lambda: twin.encode(images).latent_dist.sample(generator=sample_generator()),
        },
        "decode": {
            "minidream": lambda: vae.decode(latents),
            "diffusers": lambda: twin.decode(latents, return_dict=False)[0],
        },
    }


def vae_row(job: str, batch: int, image: int, seconds: dict[str, float], settings: Settings) -> Row:
    tflop = SD15_TFLOP[f"vae_{job}"] * batch * (image / 512) ** 2 if settings.config_name == "sd15" else None
    shape = f"batch {batch}, {image}x{image} px"
    return compared(f"VAE {job}", shape, batch, "images/s", tflop, seconds)


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batch", type=int, default=1)
    options.add_argument("--image", type=int, default=512, help="image height and width in pixels")
    args = options.parse_args(argv)
    settings = settings_from(args)

    vae, twin = vae_pair(settings, settings.dtype)
    rows = []
    with torch.no_grad():
        for job, runs in vae_runs(settings, vae, twin, args.batch, args.image).items():
            seconds = time_alternating(runs, settings)
            rows.append(vae_row(job, args.batch, args.image, seconds, settings))
    report(rows, settings, command(__spec__.name, argv))
    return rows


if __name__ == "__main__":
    main()
