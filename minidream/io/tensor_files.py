"""Tensor files in and out, safely, and the one error type for a file minidream cannot use.

Reading never runs code from the file: safetensors holds only tensors, and pickled `.ckpt`/`.pt`
files go through `torch.load(weights_only=True)`. Both are memory-mapped, so a loaded tensor
costs no RAM until it is used and the whole file at most once. Writing goes to a temporary
name in the destination's folder and is renamed into place at the end, so a failure leaves
nothing half-written. `StoredPipeline` is what the two layouts (single_file.py,
diffusers_folder.py) read a file into; weights.py checks each part once (`check_tensors`) and
builds the models from it.
"""

import functools
import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import nn

from minidream.config import ModelConfig
from minidream.files import atomic_file
from minidream.models.tokenizer import CLIPTokenizer


class WeightsError(ValueError):
    """A weights file or folder minidream cannot use; the message names the path and why."""


def unsupported(path: Path, what: str) -> WeightsError:
    return WeightsError(
        f"{path}: this is {what}; minidream supports Stable Diffusion 1.x and 2.x text-to-image models "
        "(SD 1.4, 1.5, 2.0, 2.1, 512 base and 768-v) and SDXL base 1.0, and their fine-tunes, only"
    )


class Tensors(NamedTuple):
    """One model's tensors under minidream's module names, and how the file names them (for errors)."""

    tensors: dict[str, torch.Tensor]  # keys the file has but minidream does not know stay as the file spells them
    source: str  # the file, as error messages name it
    what: str  # the model the tensors must fit, as error messages name it
    key_prefix: str = ""  # what the file puts before each name
    renamed: Mapping[str, str] = MappingProxyType({})  # minidream name -> the file's, where they differ

    def file_name(self, key: str) -> str:
        return self.key_prefix + self.renamed.get(key, key)


class StoredPipeline(NamedTuple):
    """What a weights file or folder holds, before any model is built."""

    config: ModelConfig
    tokenizer: CLIPTokenizer
    unet: Tensors
    vae: Tensors
    text_encoder: Tensors
    text_encoder_2: Tensors | None = None  # SDXL's OpenCLIP ViT-bigG, under OpenCLIP's names
    tokenizer_2: CLIPTokenizer | None = None


@functools.cache
def meta_shapes(model_class: type[nn.Module], cfg) -> Mapping[str, torch.Size]:
    """Every tensor name and shape of `model_class(cfg)`, from one build on the meta device (no
    memory, no init) per class and config: the table every key check and key map reads."""
    with torch.device("meta"):
        return MappingProxyType({key: t.shape for key, t in model_class(cfg).state_dict().items()})


def check_tensors(part: Tensors, expected: Mapping[str, torch.Size]) -> None:
    """THE key check: raise unless `part` has exactly the names and shapes of `expected`. The one
    error names the file, counts each kind of problem and gives the first keys as the file spells them."""
    found = part.tensors
    missing = [part.file_name(key) for key in expected if key not in found]
    unexpected = [part.file_name(key) for key in found if key not in expected]
    misshaped = [
        f"{part.file_name(key)} {list(found[key].shape)}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in found and found[key].shape != shape
    ]
    if missing or unexpected or misshaped:
        raise mismatch(part.source, part.what, missing, unexpected, misshaped)


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


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating-point tensors to `dtype`; integer ones (and everything when dtype is None) as they are."""
    tensor = tensor.detach()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


TEXT_MODEL_PREFIX = "text_model."
# transformers' constant 0..76 buffer, carried by many checkpoints: not a weight, so not checked.
POSITION_IDS = "text_model.embeddings.position_ids"
OUTSIDE_TEXT_MODEL = "text_projection.weight"  # CLIPTextModelWithProjection's, beside `text_model`


def with_text_model_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-encoder tensors under transformers' `text_model.` level, which some SD 1.x
    files (saved with old transformers) and transformers >= 5 folders leave out."""
    if any(key.startswith(TEXT_MODEL_PREFIX) for key in tensors):
        return tensors
    return {key if key == OUTSIDE_TEXT_MODEL else TEXT_MODEL_PREFIX + key: tensor for key, tensor in tensors.items()}


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
    # torch.save wrote a plain pickle stream before PyTorch 1.6 (and with
    # _use_new_zipfile_serialization=False): it loads, still weights-only, but cannot be memory-mapped.
    legacy = not zipfile.is_zipfile(path)
    if legacy and not _starts_like_a_pickle(path):
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle)")
    if legacy and not _starts_like_torch_save(path):
        raise WeightsError(
            f"{path}: refused: a plain Python pickle, not a PyTorch checkpoint that torch.load(weights_only=True) "
            "can read, and minidream never unpickles anything else. Convert it to .safetensors with a tool you "
            "trust, or get the .safetensors release"
        )
    what = "a legacy (pre-zip) PyTorch checkpoint" if legacy else "a PyTorch checkpoint"
    try:
        with torch.serialization.safe_globals(TRAINING_METADATA_GLOBALS), warnings.catch_warnings():
            # torch warns before it refuses a pickle protocol it does not expect; the refusal below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=not legacy)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"{path}: refused: {what} holding Python objects other than tensors ({_unpickler_reason(error)}); "
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


def _starts_like_a_pickle(path: Path) -> bool:
    """Pickle protocol 2+ streams (all torch.save has written) open with the PROTO opcode 0x80."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


# torch.save's legacy (pre-zip) format opens with its magic number pickled (LONG1 opcode, 10 bytes),
# after the protocol header (and, for protocol 4+, a frame header).
LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]


def _starts_like_torch_save(path: Path) -> bool:
    """Whether a non-zip pickle is torch.save's legacy format rather than a plain pickle.dump (which
    torch.load cannot read at all, and whose weights-only refusal would name a pickle opcode)."""
    with open(path, "rb") as f:
        return LEGACY_TORCH_MAGIC in f.read(32)


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])
    return reason.split("WeightsUnpickler error:")[-1].split(" was not an allowed")[0].strip()


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, renamed over `path` when complete."""
    with atomic_file(path) as temporary:
        safetensors.torch.save_file(tensors, temporary, metadata=metadata)
