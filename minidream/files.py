"""Writing files and folders so that a crash or a full disk never leaves one half-written.

One mechanism for everything minidream writes: the content goes under a temporary name in the
destination's folder (same filesystem, so the final rename is atomic) and is renamed into place
only when complete; whatever is left under the temporary name, by success or failure, is removed.
"""

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_sibling(path: Path, temporary: Path | None = None) -> Iterator[Path]:
    """A fresh name in `path`'s folder, removed when the block ends, whatever is under it.

    The default `.NAME.PID.RANDOM.tmp` is unique per writer: the PID alone is not, when ranks on
    different machines share a folder (each container numbers its own processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary or path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary)
        else:
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; when the block succeeds it replaces `path` whole."""
    with temporary_sibling(path) as temporary:
        yield temporary
        os.replace(temporary, path)


@contextlib.contextmanager
def atomic_folder(path: Path, replace: bool = False, temporary: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; when the block succeeds it becomes `path`.

    An existing non-empty `path` raises FileExistsError (it could hold the user's files) unless
    `replace` is set, in which case it is removed only once the new folder is complete.
    `temporary` names the temporary folder, for callers that recognise interrupted writes by it.
    """
    path = Path(path)
    if not replace:
        refuse_non_empty_folder(path)
    with temporary_sibling(path, temporary) as folder:
        if folder.exists():  # left by a write that was killed
            shutil.rmtree(folder)
        folder.mkdir()
        yield folder
        if replace and path.is_dir():
            shutil.rmtree(path)
        else:
            refuse_non_empty_folder(path)
            if path.is_dir():
                path.rmdir()
        os.replace(folder, path)


def prove_writable(folder: Path) -> None:
    """Create `folder` (and its parents) and write a file there now, so a folder that cannot be
    written fails at the start, not at the first real write. Raises OSError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with temporary_sibling(folder / "write-test") as probe:
        probe.write_bytes(b"")


def refuse_non_empty_folder(path: Path) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists; remove it or choose another destination")


def file_sha256(path: Path, start: int = 0) -> str:
    """sha256 of a file's bytes from offset `start`, read in 1 MiB blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
