"""The latent cache's costs: hashing image files and the VAE's weights, and a cached read
against an encode, per image.

Photos are the DreamBooth dataset's (../shared/datasets/dreambooth by default); the VAE has
random weights of --config's shape. "encode" is what an uncached step does per image (decode
the file, resize and crop, VAE encoder); "miss" is what LatentCache.moments adds to that
encode when the entry is new (look-up, then the entry written), timed with an encode() that
returns moments computed before; "hit" is moments on the entry (file fingerprint, memoised
hash, read and verify).
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import command, machine, synchronize, versions
from minidream.config import ARCHITECTURES
from minidream.models.precision import DTYPES
from minidream.models.vae import AutoencoderKL
from minidream.training.data import IMAGE_SUFFIXES, load_image, pixels_of, place
from minidream.training.latent_cache import LatentCache, image_sha256

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"


@dataclass(frozen=True)
class Row:
    step: str
    seconds: float  # median per call
    note: str


def median_seconds(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hashing_rows(photos: list[Path], vae: AutoencoderKL, folder: Path, repeats: int, device: torch.device) -> list[Row]:
    megabytes = sum(path.stat().st_size for path in photos) / 1e6
    files = median_seconds(lambda: [image_sha256(path) for path in photos], repeats, device)
    weights = sum(t.numel() * t.element_size() for t in vae.state_dict().values()) / 1e6
    identity = median_seconds(lambda: LatentCache(folder, vae), repeats, device)
    return [
        Row("sha256 of an image file", files / len(photos),
            f"{len(photos)} photos, {megabytes / len(photos):.2f} MB each on average, {megabytes / files:.0f} MB/s"),
        Row("VAE identity (LatentCache())", identity, f"sha256 of {weights:.0f} MB of weights, once per run"),
    ]


def per_image_rows(
    photos: list[Path], vae: AutoencoderKL, folder: Path, image: int, repeats: int, device: torch.device
) -> list[Row]:
    dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def encode(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        photo = load_image(path)
        pixels = pixels_of(place(photo.size, (image, image), True, False, None).apply(photo))[None]
        posterior = vae.encode(pixels.to(device, dtype))
        return posterior.mean, posterior.std

    cache = LatentCache(folder, vae)
    encodes, misses, hits = [], [], []
    for index, path in enumerate(photos):
        encodes.append(median_seconds(lambda: encode(path), repeats, device))
        encoded = encode(path)
        keys = iter(f"bench {index} {call}" for call in range(repeats))  # a new transform_key per call: all miss
        misses.append(median_seconds(lambda: cache.moments(path, next(keys), lambda: encoded), repeats, device))
        hits.append(median_seconds(lambda: cache.moments(path, f"bench {index} 0", lambda: encoded), repeats, device))
        cached = cache.moments(path, f"bench {index} 0", lambda: encoded)
        if not all(torch.equal(a.float().cpu(), b) for a, b in zip(encoded, cached)):
            raise AssertionError(f"{path}: the cached moments differ from the encode")
    if cache.hits != len(photos) * (repeats + 1):
        raise AssertionError(f"{cache.summary()}: the timed hits were not all hits")
    shape = f"{image}x{image} px, {len(photos)} photos"
    encode_s, hit_s = statistics.median(encodes), statistics.median(hits)
    return [
        Row("encode (no cache)", encode_s, shape),
        Row("miss: look-up + write entry (encode excluded)", statistics.median(misses), shape),
        Row("hit: read + verify entry", hit_s, f"{shape}; {encode_s / hit_s:.0f}x faster than encode, bit-identical"),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    options.add_argument("--dtype", choices=DTYPES, default="fp32", help="the VAE's (default fp32)")
    options.add_argument("--config", choices=ARCHITECTURES, default="sd15", help="VAE shape (default sd15)")
    options.add_argument("--image", type=int, default=512, help="encoded height and width in pixels")
    options.add_argument("--images", type=int, default=2, help="photos encoded (all are hashed)")
    options.add_argument("--repeats", type=int, default=3, help="timed calls of each (the median is reported)")
    options.add_argument("--photos", type=Path, default=PHOTOS, help="folder searched for photos (recursively)")
    options.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = options.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise SystemExit(f"{args.photos}: no photos; pass --photos DIR")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(ARCHITECTURES[args.config].vae).to(device, DTYPES[args.dtype]).eval()

    with tempfile.TemporaryDirectory() as folder:
        rows = hashing_rows(photos, vae, Path(folder), args.repeats, device)
        rows += per_image_rows(photos[: args.images], vae, Path(folder), args.image, args.repeats, device)
    print(f"\nMachine: {machine(device)}; {versions()}")
    setup = f"{device.type} {args.dtype} {args.config} VAE; medians of {args.repeats}"
    print(f"Command: `{command(__spec__.name, argv)}` ({setup})\n")
    print("| step | ms per call | what |\n|---|---:|---|")
    for row in rows:
        print(f"| {row.step} | {1000 * row.seconds:.2f} | {row.note} |")
    return rows


if __name__ == "__main__":
    main()
