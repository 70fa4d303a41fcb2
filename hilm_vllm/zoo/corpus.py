"""The training corpus: the running interpreter's standard library source (PSF licence),
present on every machine, split by file into train and held-out sets."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

HELDOUT_EVERY = 10  # one file in ten is held out (by a hash of its path, not by order)

# Vendored or generated sources that would teach the models data tables, not Python.
_SKIP_PARTS = {"site-packages", "__pycache__", "idlelib", "lib2to3", "encodings", "pydoc_data"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16)


def list_files(heldout: bool, root: Path | None = None) -> list[Path]:
    """.py files of the train (heldout=False) or held-out split, in a fixed pseudo-random
    order (by path hash), so a byte budget samples the whole library, not its first letters."""
    root = root or stdlib_root()
    keyed = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        digest = _digest(rel.as_posix())
        if (digest % HELDOUT_EVERY == 0) == heldout:
            keyed.append((digest, path))
    return [path for _, path in sorted(keyed)]


def iter_texts(heldout: bool, max_bytes: int) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the split's files until max_bytes of text were yielded."""
    root = stdlib_root()
    total = 0
    for path in list_files(heldout, root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if not text.strip():
            continue
        yield path.relative_to(root).as_posix(), text
        total += len(text)
        if total >= max_bytes:
            return
