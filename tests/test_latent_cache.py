"""The latent cache on disk: hits only for the same image bytes, VAE and transform; damaged
entries found, warned about and recomputed; two processes filling it at once leave it whole."""

import multiprocessing
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from photo_sets import square_pixels
from PIL import Image

from minidream.config import TINY
from minidream.models.vae import AutoencoderKL
from minidream.training.data import DataError, load_image
from minidream.training.latent_cache import LatentCache, check_writable_folder

SIZE = 32  # pixels: 4 x 4 latents with TINY's VAE
KEYS = {False: f"{SIZE}x{SIZE} crop=center flip=0", True: f"{SIZE}x{SIZE} crop=center flip=1"}


def seeded_vae(seed: int = 0) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(TINY.vae).eval()


def write_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_images(folder: Path, count: int) -> list[Path]:
    return [write_image(folder / f"photo{i}.png", seed=i) for i in range(count)]


@torch.no_grad()
def fresh_encode(vae: AutoencoderKL, path: Path, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = vae.encode(square_pixels(load_image(path), SIZE, center_crop=True, flip=flip)[None])
    return posterior.mean, posterior.std


class CountingEncoder:
    """encode() callbacks for LatentCache.moments that record which image each call encoded."""

    def __init__(self, vae: AutoencoderKL):
        self.vae, self.calls = vae, []

    def of(self, path: Path, flip: bool = False):
        def encode():
            self.calls.append(path)
            return fresh_encode(self.vae, path, flip)

        return encode

    def fill(self, cache: LatentCache, paths: list[Path], flip: bool = False) -> list[tuple[torch.Tensor, ...]]:
        return [cache.moments(path, KEYS[flip], self.of(path, flip)) for path in paths]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path.suffix != ".safetensors"]


def assert_equal_moments(got, expected) -> None:
    for (mean, std), (expected_mean, expected_std) in zip(got, expected, strict=True):
        assert mean.dtype == std.dtype == torch.float32 and mean.device.type == "cpu"
        assert torch.equal(mean, expected_mean) and torch.equal(std, expected_std)


def test_second_pass_and_rerun_are_all_hits_with_bit_identical_moments(tmp_path):
    images = write_images(tmp_path / "images", 4)
    before = sorted((tmp_path / "images").iterdir())
    vae = seeded_vae()
    encoder = CountingEncoder(vae)
    cache = LatentCache(tmp_path / "runs" / "cache", vae)  # parents created

    first = encoder.fill(cache, images)
    assert (cache.hits, cache.misses) == (0, 4)
    assert_equal_moments(first, [fresh_encode(vae, path) for path in images])
    second = encoder.fill(cache, images)
    assert (cache.hits, cache.misses) == (4, 4) and encoder.calls == images
    assert_equal_moments(second, first)
    assert cache.summary() == "latent cache: 4 hits, 4 new"

    rerun = LatentCache(tmp_path / "runs" / "cache", seeded_vae())
    assert_equal_moments(encoder.fill(rerun, images), first)
    assert (rerun.hits, rerun.misses) == (4, 0) and encoder.calls == images
    assert len(entries(tmp_path / "runs" / "cache")) == 4 and not leftovers(tmp_path / "runs")
    assert sorted((tmp_path / "images").iterdir()) == before  # nothing written beside the images


def test_one_changed_weight_misses_everywhere(tmp_path):
    images = write_images(tmp_path / "images", 3)
    CountingEncoder(seeded_vae()).fill(LatentCache(tmp_path / "cache", seeded_vae()), images)
    changed = seeded_vae()
    with torch.no_grad():
        changed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    encoder = CountingEncoder(changed)
    cache = LatentCache(tmp_path / "cache", changed)
    got = encoder.fill(cache, images)
    assert (cache.hits, cache.misses) == (0, 3) and encoder.calls == images
    assert_equal_moments(got, [fresh_encode(changed, path) for path in images])
    assert not torch.equal(got[0][0], fresh_encode(seeded_vae(), images[0])[0])
    assert len(entries(tmp_path / "cache")) == 6
    assert LatentCache(tmp_path / "cache", seeded_vae().to(torch.bfloat16)).vae_identity != cache.vae_identity


def test_moments_encoded_on_another_kind_of_device_are_not_used(tmp_path):
    """No GPU here: the run on one is modelled by the device type its cache records."""
    images = write_images(tmp_path / "images", 2)
    vae = seeded_vae()
    on_gpu = LatentCache(tmp_path / "cache", vae)
    on_gpu.device_type = "cuda"
    CountingEncoder(vae).fill(on_gpu, images)
    encoder = CountingEncoder(vae)
    cache = LatentCache(tmp_path / "cache", vae)
    encoder.fill(cache, images)
    assert (cache.hits, cache.misses) == (0, 2) and encoder.calls == images


@pytest.mark.parametrize("same_process", [False, True], ids=["rerun", "same-process"])
def test_changing_one_image_recomputes_only_its_entry(tmp_path, same_process):
    images = write_images(tmp_path / "images", 4)
    vae = seeded_vae()
    cache = LatentCache(tmp_path / "cache", vae)
    old = CountingEncoder(vae).fill(cache, images)
    write_image(images[2], seed=99)  # new bytes, same name
    if not same_process:
        cache = LatentCache(tmp_path / "cache", vae)
    encoder = CountingEncoder(vae)
    got = encoder.fill(cache, images)
    assert encoder.calls == [images[2]]
    assert_equal_moments(got, [*old[:2], fresh_encode(vae, images[2]), old[3]])
    assert not torch.equal(got[2][0], old[2][0])


def test_a_different_transform_is_a_different_entry(tmp_path):
    images = write_images(tmp_path / "images", 2)
    vae = seeded_vae()
    encoder = CountingEncoder(vae)
    cache = LatentCache(tmp_path / "cache", vae)
    plain = encoder.fill(cache, images, flip=False)
    flipped = encoder.fill(cache, images, flip=True)
    assert (cache.hits, cache.misses) == (0, 4) and encoder.calls == images + images
    assert_equal_moments(flipped, [fresh_encode(vae, path, flip=True) for path in images])
    assert not torch.equal(plain[0][0], flipped[0][0])
    assert len(entries(tmp_path / "cache")) == 4
    assert_equal_moments(encoder.fill(cache, images, flip=True), flipped)
    assert cache.hits == 2


def test_files_of_equal_bytes_share_one_entry(tmp_path):
    original = write_image(tmp_path / "images" / "a.png", seed=1)
    copy = tmp_path / "images" / "b.png"
    copy.write_bytes(original.read_bytes())
    vae = seeded_vae()
    encoder = CountingEncoder(vae)
    cache = LatentCache(tmp_path / "cache", vae)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equal_moments(encoder.fill(cache, [original, copy, original]), [fresh_encode(vae, original)] * 3)
    assert encoder.calls == [original] and len(entries(tmp_path / "cache")) == 1


def read_entry(entry: Path) -> tuple[dict[str, str], dict[str, list]]:
    """An entry's metadata and tensors (as lists, to compare with ==): its bytes are not enough, as
    safetensors writes the metadata in no fixed order."""
    with safetensors.safe_open(entry, framework="pt") as file:
        return file.metadata(), {name: file.get_tensor(name).tolist() for name in file.keys()}


def damage(entry: Path, where: str) -> None:
    data = bytearray(entry.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    if where == "truncated":
        entry.write_bytes(data[:-7])
        return
    data[header_end + 5 if where == "tensor data" else header_end // 2] ^= 0x01
    entry.write_bytes(data)


@pytest.mark.parametrize("where", ["tensor data", "header", "truncated"])
def test_a_damaged_entry_is_named_in_a_warning_and_recomputed(tmp_path, where):
    image = write_image(tmp_path / "images" / "photo.png", seed=3)
    vae = seeded_vae()
    cache = LatentCache(tmp_path / "cache", vae)
    cache.moments(image, KEYS[False], CountingEncoder(vae).of(image))
    [entry] = entries(tmp_path / "cache")
    damage(entry, where)

    encoder = CountingEncoder(vae)
    with pytest.warns(UserWarning, match=re.escape(f"latent cache entry {entry}: ")):
        got = cache.moments(image, KEYS[False], encoder.of(image))
    assert encoder.calls == [image]
    assert_equal_moments([got], [fresh_encode(vae, image)])
    assert cache.summary() == "latent cache: 0 hits, 2 new, 1 corrupt replaced"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten whole: read again without complaint
        assert_equal_moments([cache.moments(image, KEYS[False], encoder.of(image))], [got])
    assert encoder.calls == [image] and not leftovers(tmp_path / "cache")


def test_every_flipped_bit_and_every_truncation_is_detected(tmp_path):
    """Exhaustive over one entry's bytes; encode() returns fixed moments, so no VAE runs."""
    image = write_image(tmp_path / "photo.png", seed=4)
    cache = LatentCache(tmp_path / "cache", seeded_vae())
    moments = (torch.randn(1, 4, 4, 4), torch.rand(1, 4, 4, 4))
    cache.moments(image, KEYS[False], lambda: moments)
    [entry] = entries(tmp_path / "cache")
    original, written = entry.read_bytes(), read_entry(entry)
    # Byte i has its bit i % 8 flipped: every bit position occurs, in every part of the file.
    damaged = [original[:i] + bytes([original[i] ^ (1 << i % 8)]) + original[i + 1 :] for i in range(len(original))]
    damaged += [original[:length] for length in range(len(original))]
    undetected = []
    for content in damaged:
        entry.write_bytes(content)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cache.moments(image, KEYS[False], lambda: moments)
        if len(caught) != 1 or str(entry) not in str(caught[0].message):
            undetected.append(content)
        assert_equal_moments([got], [moments])
        assert read_entry(entry) == written  # recomputed and written again, whole
    assert not undetected, f"{len(undetected)} of {len(damaged)} damaged versions read without a warning"
    assert cache.hits == 0 and cache.corrupt == len(damaged)


def fill_cache(folder: Path, images: list[Path], barrier) -> None:
    """One process of the concurrent test: every read must verify (no warning), so a reader
    never sees the other process's half-written entry."""
    warnings.simplefilter("error")
    torch.set_num_threads(1)
    vae = seeded_vae()
    cache = LatentCache(folder, vae)
    encoder = CountingEncoder(vae)
    barrier.wait()
    for _ in range(3):
        for flip in (False, True):
            encoder.fill(cache, images, flip)


def test_two_processes_filling_one_cache_at_once_leave_it_consistent(tmp_path):
    images = write_images(tmp_path / "images", 6)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=fill_cache, args=(tmp_path / "cache", images, barrier)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]

    assert len(entries(tmp_path / "cache")) == 12 and not leftovers(tmp_path / "cache")
    vae = seeded_vae()
    cache = LatentCache(tmp_path / "cache", vae)
    encoder = CountingEncoder(vae)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for flip in (False, True):
            assert_equal_moments(encoder.fill(cache, images, flip), [fresh_encode(vae, p, flip) for p in images])
    assert (cache.hits, cache.misses) == (12, 0) and encoder.calls == []


def test_an_image_that_changes_while_encoded_is_not_stored(tmp_path):
    image = write_image(tmp_path / "photo.png", seed=5)
    vae = seeded_vae()
    cache = LatentCache(tmp_path / "cache", vae)

    def encode_while_replaced():
        write_image(image, seed=6)  # the bytes hashed for the key are gone now
        return fresh_encode(vae, image)

    cache.moments(image, KEYS[False], encode_while_replaced)
    assert entries(tmp_path / "cache") == []
    encoder = CountingEncoder(vae)
    for _ in range(2):
        assert_equal_moments([cache.moments(image, KEYS[False], encoder.of(image))], [fresh_encode(vae, image)])
    assert encoder.calls == [image] and len(entries(tmp_path / "cache")) == 1


def test_a_folder_that_cannot_hold_the_cache_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    message = re.escape(f"latent cache folder {tmp_path / 'file' / 'cache'}: not writable")
    with pytest.raises(DataError, match=message):
        check_writable_folder(tmp_path / "file" / "cache")  # before any model loads
    with pytest.raises(DataError, match=message):
        LatentCache(tmp_path / "file" / "cache", seeded_vae())
    check_writable_folder(tmp_path / "new" / "cache")
    assert [p.name for p in (tmp_path / "new").rglob("*")] == ["cache"]  # created, the probe gone


def test_a_missing_image_and_wrong_moments_are_named(tmp_path):
    cache = LatentCache(tmp_path / "cache", seeded_vae())
    moments = (torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gone.png'}: cannot read image")):
        cache.moments(tmp_path / "gone.png", KEYS[False], lambda: moments)
    image = write_image(tmp_path / "photo.png", seed=7)
    with pytest.raises(ValueError, match=re.escape(f"encode() of {image}: ")):
        cache.moments(image, KEYS[False], lambda: (torch.zeros(4, 4, 4), torch.ones(4, 4, 4)))
    assert entries(tmp_path / "cache") == []


def test_bench_times_every_step_on_the_real_photos(capsys):
    # Imported here, not on top: the concurrency test's spawned processes import this module,
    # and bench imports diffusers (seconds each).
    from bench import latent_cache as latent_cache_bench

    tiniest = ["--device", "cpu", "--config", "tiny", "--image", "32", "--images", "1", "--repeats", "1"]
    rows = latent_cache_bench.main(tiniest)
    assert [row.step for row in rows] == [
        "sha256 of an image file", "VAE identity (LatentCache())",
        "encode (no cache)", "miss: look-up + write entry (encode excluded)", "hit: read + verify entry",
    ]
    assert all(row.seconds > 0 for row in rows) and "21 photos" in rows[0].note
    printed = capsys.readouterr().out
    assert "Command: `python -m bench.latent_cache --device cpu" in printed
    assert len([line for line in printed.splitlines() if line.startswith("| ")]) == 1 + len(rows)
