"""Writing files and folders so that a crash or a full disk never leaves one half-written.

One mechanism for everything minidream writes: the content goes under a temporary name in the
destination's folder (same filesystem, so the final rename is atomic) and is renamed into place
only when complete; whatever is left under the temporary name, by success or failure, is removed.
What is renamed into place gets the permissions the user's umask gives a new file (writers such
as safetensors create their files 0600), and a write that fails for a reason outside the program
(a full disk, no permission, a read-only or failing device) is one `WriteError` naming the
destination, never the temporary name (`write_errors`).
"""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import safetensors


class WriteError(OSError):
    """A write that failed for a reason outside the program, in one line: `cannot write DEST: CAUSE`.

    An OSError, so `except OSError` keeps catching it: `.errno` is the cause's errno when known,
    `.strerror` the cause ("No space left on device"), `.filename` the destination."""

    def __init__(self, destination: str | Path, cause: str, code: int | None = None):
        super().__init__(code, cause, str(destination))
        self.destination, self.cause = Path(destination), cause

    def __str__(self) -> str:
        return f"cannot write {self.destination}: {self.cause}"

    def __reduce__(self):
        return type(self), (self.destination, self.cause, self.errno)


# A torch.save (PyTorch's zip writer) that cannot write raises a RuntimeError naming its own source
# line ("[enforce fail at inline_container.cc:672] . unexpected pos 388224 vs 388116"), not the cause.
TORCH_WRITER_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed")
LOW_SPACE_BYTES = 1 << 20  # less than this left where a write failed: the disk is full


@contextlib.contextmanager
def write_errors(destination: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block into one `WriteError` naming `destination`.

    Converted: any OSError (its strerror is the cause; the temporary file it may name is not
    repeated), safetensors' SafetensorError from its I/O (the "os error N" in it gives the cause),
    and torch.save's RuntimeError from its zip writer (the cause is "No space left on device" when
    the destination's filesystem has under 1 MiB left, else the writer's first line). Everything
    else (a CUDA error, a ValueError) passes unchanged, and so does a WriteError from an inner block.
    """
    try:
        yield
    except (WriteError, FolderNotEmpty):  # already one line, or a refusal rather than a failure
        raise
    except OSError as error:
        raise WriteError(destination, error.strerror or str(error), error.errno) from None
    except safetensors.SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None and "I/O error" not in str(error):
            raise
        code = int(found.group(1)) if found else None
        cause = os.strerror(code) if code else _first_line(error)
        raise WriteError(destination, cause, code) from None
    except RuntimeError as error:
        if not any(marker in str(error) for marker in TORCH_WRITER_FAILURES):
            raise
        if free_bytes(Path(destination)) < LOW_SPACE_BYTES:
            raise WriteError(destination, os.strerror(errno.ENOSPC), errno.ENOSPC) from None
        raise WriteError(destination, f"the write failed ({_first_line(error)})") from None


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
    existing parent); a very large number when that cannot be read."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 1 << 62


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
    """Yield a temporary path to write; when the block succeeds it replaces `path` whole, with the
    mode the umask gives a new file. A failed write raises WriteError naming `path` (write_errors)."""
    path = Path(path)
    with write_errors(path), temporary_sibling(path) as temporary:
        with write_errors(path):  # inside: a full disk is still full while the cause is read
            yield temporary
            give_umask_modes(temporary)
            os.replace(temporary, path)


@contextlib.contextmanager
def atomic_folder(path: Path, replace: bool = False, temporary: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; when the block succeeds it becomes `path`, every file and
    folder in it with the mode the umask gives a new one.

    An existing non-empty `path` raises FileExistsError (it could hold the user's files) unless
    `replace` is set, in which case it is removed only once the new folder is complete.
    `temporary` names the temporary folder, for callers that recognise interrupted writes by it.
    A failed write inside the block raises WriteError naming `path` (write_errors).
    """
    path = Path(path)
    if not replace:
        refuse_non_empty_folder(path)
    with write_errors(path), temporary_sibling(path, temporary) as folder:
        with write_errors(path):
            if folder.exists():  # left by a write that was killed
                shutil.rmtree(folder)
            folder.mkdir()
            try:
                yield folder
            except WriteError as error:  # from an atomic_file inside: name its place in `path`
                if not error.destination.is_relative_to(folder):
                    raise
                raise WriteError(path / error.destination.relative_to(folder), error.cause, error.errno) from None
            give_umask_modes(folder)
        if replace and path.is_dir():
            shutil.rmtree(path)
        else:
            refuse_non_empty_folder(path)
            if path.is_dir():
                path.rmdir()
        os.replace(folder, path)


def current_umask() -> int:
    """The process's umask, read at each call (a program may change it while running).

    Linux says it in /proc/self/status and reading it there changes nothing. Elsewhere the only way
    is to set it and set it back (`mask = os.umask(0); os.umask(mask)`), which leaves a moment in
    which another thread's new file would get mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_umask_modes(path: Path) -> None:
    """Give `path`, and everything under it when it is a folder, the permissions the umask gives a
    new file (0o666 & ~umask) or folder (0o777 & ~umask): what other programs write gets, so a UI
    or a colleague can read the model. Needed because some writers (safetensors, tempfile) create
    files 0600, and a rename keeps the mode. Symbolic links are left alone."""
    mask = current_umask()
    paths = [Path(path)]
    if paths[0].is_dir() and not paths[0].is_symlink():
        paths += sorted(Path(path).rglob("*"))
    for item in paths:
        mode = os.lstat(item).st_mode
        if stat.S_ISREG(mode):
            os.chmod(item, 0o666 & ~mask)
        elif stat.S_ISDIR(mode):
            os.chmod(item, 0o777 & ~mask)


def prove_writable(folder: Path) -> None:
    """Create `folder` (and its parents) and write a file there now, so a folder that cannot be
    written fails at the start, not at the first real write. Raises WriteError (an OSError)
    naming `folder`, not the probe file."""
    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with temporary_sibling(folder / "write-test") as probe:
            probe.write_bytes(b"")


class FolderNotEmpty(FileExistsError):
    """A destination that already holds something, refused: it could be the user's files."""


def refuse_non_empty_folder(path: Path) -> None:
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FolderNotEmpty(f"{path}: already exists; remove it or choose another destination")


def file_sha256(path: Path, start: int = 0) -> str:
    """sha256 of a file's bytes from offset `start`, read in 1 MiB blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
