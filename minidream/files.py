"""Writing files so that a crash or a full disk never leaves one half-written."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_sibling(path: Path) -> Iterator[Path]:
    """A fresh name in `path`'s folder (same filesystem, so the final rename is atomic); whatever
    is left under it when the block ends, by success or failure, is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
