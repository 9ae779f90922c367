"""Tensor files in and out, safely, and the one error type for a file minidream cannot use.

Reading never runs code from the file: safetensors holds only tensors, and pickled `.ckpt`/`.pt`
files go through `torch.load(weights_only=True)`. Both are memory-mapped, so a loaded tensor
costs no RAM until it is used and the whole file at most once. Writing goes to a temporary
name in the destination's folder and is renamed into place at the end, so a failure leaves
nothing half-written. `Checkpoint` is what the two layouts (single_file.py,
diffusers_folder.py) read a file into; weights.py builds the models from it.
"""

import contextlib
import json
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from minidream.config import ModelConfig
from minidream.files import atomic_file, temporary_sibling
from minidream.models.tokenizer import CLIPTokenizer


class WeightsError(ValueError):
    """A weights file or folder minidream cannot use; the message names the path and why."""


def unsupported(path: Path, what: str) -> WeightsError:
    return WeightsError(
        f"{path}: this is {what}; minidream supports Stable Diffusion 1.x (SD 1.4, 1.5 and their fine-tunes) only"
    )


def check_tensors(
    source: str, what: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], key_prefix: str = ""
) -> None:
    """Raise unless `found` has exactly the names and shapes of `expected` (a meta state dict)."""
    missing = [key_prefix + key for key in expected if key not in found]
    unexpected = [key_prefix + key for key in found if key not in expected]
    misshaped = [
        f"{key_prefix}{key} {list(found[key].shape)}, expected {list(tensor.shape)}"
        for key, tensor in expected.items()
        if key in found and found[key].shape != tensor.shape
    ]
    if missing or unexpected or misshaped:
        raise mismatch(source, what, missing, unexpected, misshaped)


def mismatch(source: str, what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> WeightsError:
    """One line: the counts and the first few offending keys of each kind, as the file names them."""
    problems = [
        f"{len(keys)} {label} ({_first_few(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    return WeightsError(f"{source}: tensors do not match {what}: " + "; ".join(problems))


def _first_few(keys: list[str], limit: int = 3) -> str:
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class Tensors(NamedTuple):
    """One model's tensors under minidream's module names, and where they came from (for errors)."""

    tensors: dict[str, torch.Tensor]
    source: str  # the file, as error messages name it
    key_prefix: str = ""  # what the file puts before minidream's names


class Checkpoint(NamedTuple):
    """What a weights file or folder holds, before any model is built."""

    config: ModelConfig
    tokenizer: CLIPTokenizer
    unet: Tensors
    vae: Tensors
    text_encoder: Tensors


TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a `.safetensors` file or a pickled torch checkpoint (no metadata)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_checkpoint(path), {}
    raise WeightsError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, or .ckpt/.pt/.pth/.bin")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-mapped tensors and the header's metadata."""
    _check_safetensors_header(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except safetensors.SafetensorError as error:
        raise WeightsError(f"{path}: not a valid safetensors file ({error})") from None


def _check_safetensors_header(path: Path) -> None:
    """Tell a file that is not safetensors from a truncated one (an interrupted download) by
    reading the header: 8 bytes giving its length, then JSON giving each tensor's byte range."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_length,) = struct.unpack("<Q", length_bytes)
        if header_length > MAX_HEADER_BYTES:  # e.g. the first bytes of a zip or of text
            raise WeightsError(f"{path}: not a safetensors file (its first bytes are not a safetensors header)")
        if 8 + header_length > size:
            raise WeightsError(
                f"{path}: truncated inside its safetensors header ({size:,} bytes; an interrupted download?)"
            )
        try:
            header = json.loads(f.read(header_length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            data_end = max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise WeightsError(f"{path}: not a safetensors file (its header is not safetensors JSON)") from None
    expected = 8 + header_length + data_end
    if size < expected:
        raise WeightsError(
            f"{path}: truncated: the safetensors header describes {expected:,} bytes but the file has "
            f"{size:,} (an interrupted download or copy?)"
        )


class _Discarded:
    """Stands in for the training metadata classes named below: built from anything, holds nothing."""

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        pass


# The original SD 1.x `.ckpt` files are PyTorch Lightning checkpoints: beside `state_dict` they
# hold Lightning's ModelCheckpoint callback and numpy scalars, which weights_only refuses. These
# names (and only these) are read as inert placeholders; the weights never depend on them.
TRAINING_METADATA_GLOBALS = [
    (_Discarded, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_Discarded, "numpy.core.multiarray.scalar"),
    (_Discarded, "numpy._core.multiarray.scalar"),
    (_Discarded, "numpy.dtype"),
]


def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, unwrapping Lightning's `state_dict` key; read only
    with `weights_only=True`, so a file holding any other Python object is refused."""
    try:
        with torch.serialization.safe_globals(TRAINING_METADATA_GLOBALS):
            checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"{path}: refused: it holds Python objects other than tensors ({_unpickler_reason(error)}); "
            "minidream reads pickled checkpoints only with torch.load(weights_only=True). "
            "Convert it to .safetensors with a tool you trust, or get the .safetensors release"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a dict of tensors")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])
    return reason.split("WeightsUnpickler error:")[-1].split(" was not an allowed")[0].strip()


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, renamed over `path` when complete."""
    with atomic_file(path) as temporary:
        safetensors.torch.save_file(tensors, temporary, metadata=metadata)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds it becomes `path`.
    An existing non-empty folder is never replaced: that could destroy the user's files."""
    _refuse_non_empty_folder(path)
    with temporary_sibling(path) as temporary:
        temporary.mkdir()
        yield temporary
        _refuse_non_empty_folder(path)
        if path.is_dir():
            path.rmdir()
        os.replace(temporary, path)


def _refuse_non_empty_folder(path: Path) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise WeightsError(f"{path}: already exists; remove it or choose another destination")
