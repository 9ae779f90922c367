"""VAE moments of training images on disk, under names that cannot go stale.

An entry's name is a sha256 of everything its content depends on: the image file's bytes, the
VAE's weights, the kind of device that encodes, and the transform (size, crop, flip) that the
caller names in `transform_key`. Change any of them and the name changes, so an outdated entry
is never looked up again. Entries are written whole (a temporary name unique to the writer, then
a rename), so reruns and ranks share one folder; and every read is verified, because a disk, a
crash or a person can still damage a file.

    <folder>/<key[:2]>/<key>.safetensors   tensors mean, std (fp32, 1 x C x h x w); metadata:
                                           the key, its parts in clear, the image's file name,
                                           and a sha256 of all of it and the tensors
"""

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

from minidream.files import atomic_file, file_sha256, prove_writable
from minidream.models.vae import AutoencoderKL
from minidream.training.data import DataError

FORMAT_VERSION = "1"  # raise when what an entry holds, or how its key is made, changes
MOMENTS = ("mean", "std")


class LatentCache:
    """(mean, std) of the VAE posterior per (image file bytes, VAE, transform), kept on disk."""

    def __init__(self, folder: Path, vae: AutoencoderKL):
        """`vae` must already be on the device and in the dtype it encodes with: its identity is
        read here, once. The VAE is frozen in training, so its weights cannot change later."""
        self.folder = Path(folder)
        check_writable_folder(self.folder)
        self.vae_identity = tensors_sha256(sorted(vae.state_dict().items()))
        # Part of the key (the weights' dtype already is): CPU and CUDA encodes of one image differ
        # in the last bits, so an entry written on one kind of device would make a run on the
        # other differ from the same run uncached.
        self.device_type = next(vae.parameters()).device.type
        self.hits = self.misses = self.corrupt = 0
        # path -> (its os.stat fingerprint, sha256 of its bytes): a step does not re-read a large
        # JPEG, and a file that changed on disk (size, times or inode) is read again.
        self._file_hashes: dict[Path, tuple[tuple[int, ...], str]] = {}

    def moments(
        self, image_path: Path, transform_key: str, encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) fp32 CPU, from disk when a verified entry for (file bytes, VAE, transform_key)
        exists, else encode() then stored atomically.

        encode() must read the image from `image_path` as the file is now: moments of an older
        decode would be stored under the new bytes' name.
        """
        image_path = Path(image_path)
        fingerprint = _fingerprint(image_path)
        parts = self._key_parts(transform_key, self._file_sha256(image_path, fingerprint))
        entry = self.entry_path(parts["key"])
        found = self._read(entry, parts)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        mean, std = (m.detach().to("cpu", torch.float32, copy=True).contiguous() for m in encode())
        problem = _moments_problem(mean, std)
        if problem:
            raise ValueError(f"encode() of {image_path}: {problem}")  # a caller's bug: no entry could verify
        # A file that changed while encode() read it may hold other bytes than the key says.
        if _fingerprint(image_path) == fingerprint:
            # The file name is for people only: files of equal bytes share one entry.
            self._write(entry, {**parts, "image": image_path.name}, {"mean": mean, "std": std})
        return mean, std

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def summary(self) -> str:
        """One line for the training log."""
        corrupt = f", {self.corrupt} corrupt replaced" if self.corrupt else ""  # counted in "new" too
        return f"latent cache: {self.hits} hits, {self.misses} new{corrupt}"

    def _file_sha256(self, path: Path, fingerprint: tuple[int, ...]) -> str:
        known = self._file_hashes.get(path)
        if known is not None and known[0] == fingerprint:
            return known[1]
        digest = image_sha256(path)
        self._file_hashes[path] = (fingerprint, digest)
        return digest

    def _key_parts(self, transform_key: str, image_sha256: str) -> dict[str, str]:
        """The key and the parts it hashes, as an entry's metadata holds them."""
        parts = {
            "version": FORMAT_VERSION,
            "image_sha256": image_sha256,
            "vae": self.vae_identity,
            "device": self.device_type,
            "transform": transform_key,
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return {**parts, "key": key}

    def _read(self, entry: Path, expected: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry's (mean, std) if it exists and verifies; None (a miss) otherwise."""
        try:
            with safetensors.safe_open(entry, framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except FileNotFoundError:
            return None
        except (safetensors.SafetensorError, OSError) as error:
            problem = f"unreadable ({error})"
        else:
            problem = _entry_problem(metadata, tensors, expected)
        if problem:
            self.corrupt += 1
            warnings.warn(f"latent cache entry {entry}: {problem}; recomputing it", stacklevel=3)
            return None
        return tensors["mean"], tensors["std"]

    def _write(self, entry: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        try:
            # Another rank may be writing the same entry: each has its own temporary name, and both hold equal moments.
            with atomic_file(entry) as path:
                save_file(tensors, path, metadata={**metadata, "checksum": entry_checksum(metadata, tensors)})
        except OSError as error:
            raise DataError(
                f"latent cache entry {entry}: cannot write it ({error.strerror or error}); "
                "free disk space or choose another data.latent_cache_dir"
            ) from None


def image_sha256(path: Path) -> str:
    """files.file_sha256 of an image, its read failure as one DataError line."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read image ({error.strerror or error})") from None


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]], prefix: bytes = b"") -> str:
    """sha256 over `prefix`, then each tensor's name, dtype, shape and bytes in the order given."""
    digest = hashlib.sha256(prefix)
    for name, tensor in named:
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        # One tensor at a time on the host (the VAE may live on a GPU); viewed as bytes, as numpy has no bf16.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def entry_checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over an entry's metadata (but the checksum) and tensors: a change to any byte shows."""
    clear = json.dumps({name: value for name, value in metadata.items() if name != "checksum"}, sort_keys=True)
    return tensors_sha256(((name, tensors[name]) for name in MOMENTS), prefix=clear.encode())


def _entry_problem(metadata: dict[str, str], tensors: dict[str, torch.Tensor], expected: dict[str, str]) -> str:
    """Why a parsed entry cannot be used, or "" when it verifies."""
    if set(tensors) != set(MOMENTS):
        return f"holds tensors {sorted(tensors)}, not {list(MOMENTS)}"
    problem = _moments_problem(tensors["mean"], tensors["std"])
    if problem:
        return problem
    if metadata.get("checksum") != entry_checksum(metadata, tensors):
        return "its metadata or tensors do not match their checksum"
    if {name: metadata.get(name) for name in expected} != expected:
        return "its metadata names another key"
    return ""


def _moments_problem(mean: torch.Tensor, std: torch.Tensor) -> str:
    """Why (mean, std) are not the moments of one image's latents, or "" when they are."""
    if mean.dtype != torch.float32 or std.dtype != torch.float32 or mean.shape != std.shape or mean.ndim != 4:
        shapes = f"mean {mean.dtype} {list(mean.shape)} and std {std.dtype} {list(std.shape)}"
        return f"{shapes} are not two equal 4-D fp32 shapes"
    return ""


def _fingerprint(path: Path) -> tuple[int, ...]:
    """What changes when a file's content may have: device, inode (a replaced file), size, times."""
    try:
        status = path.stat()
    except OSError as error:
        raise DataError(f"{path}: cannot read image ({error.strerror or error})") from None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def check_writable_folder(folder: Path) -> None:
    """Create `folder` (and its parents) and write a file there now, so a folder that cannot hold
    the cache fails at the start with its name, not on the first image. LatentCache() calls it;
    a trainer can call it before loading any model."""
    try:
        prove_writable(folder)
    except OSError as error:
        raise DataError(
            f"latent cache folder {folder}: not writable ({error.strerror or error}); "
            "choose another data.latent_cache_dir"
        ) from None
