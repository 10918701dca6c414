"""Byte-level text data for language models, read from local files only.

The tokens are the files' UTF-8 bytes (vocabulary 256), concatenated in sorted path
order. The last ``held_out`` fraction of the bytes is the test split, fixed: it
depends on nothing but the files. Each split is cut into non-overlapping windows of
``context + 1`` bytes (stride ``context``, so every byte but the first is a target
exactly once); a window gives the input ``x = w[:-1]`` and the target ``y = w[1:]``.

Without a directory the corpus is one every Python installation has: the standard
library's own public top-level ``.py`` modules (``sysconfig.get_paths()["stdlib"]``),
in sorted order, up to :data:`DEFAULT_MAX_BYTES`. Nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "VOCAB_SIZE", "TextDataset", "load_text", "read_corpus", "stdlib_files"]

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 512 * 1024
"""Bytes of the default (standard library) corpus: two epochs train in a minute or two on 2 CPU cores."""


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array == has no single truth value
class TextDataset:
    """A train/test split of byte windows for next-token prediction.

    Attributes:
        x_train: Training inputs, shape (N_train, context), int32 byte ids in [0, 256).
        y_train: Training targets, ``x_train`` shifted by one byte: shape (N_train, context), int32.
        x_test: Held-out inputs, shape (N_test, context), int32.
        y_test: Held-out targets, shape (N_test, context), int32.
        num_classes: Target classes at each position: the vocabulary, 256 bytes.
        name: ``"text"``.
        sources: The files read, in order (paths as given or found).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    sources: tuple[str, ...] = ()

    @property
    def context(self) -> int:
        """Tokens per example (the model's sequence length)."""
        return int(self.x_train.shape[1])


def stdlib_files() -> list[Path]:
    """The default corpus: the standard library's public top-level ``.py`` modules, sorted by name.

    Top level only: below it are ``site-packages`` (whatever is installed) and test
    data that is not all UTF-8. Public only (no leading ``_``): private modules
    include ``_sysconfigdata_*.py``, generated per build (a dict of compiler flags,
    neither ordinary Python nor the same on every machine).
    """
    return sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if not p.name.startswith("_"))


def read_corpus(files: list[Path], *, max_bytes: int | None = None, what: str = "data_dir") -> tuple[bytes, list[Path]]:
    """The files' bytes, concatenated in the given order, stopping at ``max_bytes``; and the files read.

    Raises:
        ValueError: A file that is not UTF-8 text (naming it and the offset of the first
            bad byte), or no bytes at all; ``what`` names the argument in the message.
    """
    chunks, used, total = [], [], 0
    for path in files:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{what}: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "text data must be UTF-8"
            ) from None
        # Cut at a file boundary or exactly at max_bytes: either way the same bytes every run.
        used.append(path)
        if max_bytes is not None and total + len(raw) >= max_bytes:
            chunks.append(raw[: max_bytes - total])
            break
        chunks.append(raw)
        total += len(raw)
    corpus = b"".join(chunks)
    if not corpus:
        raise ValueError(f"{what}: the text files are empty ({len(files)} file(s), 0 bytes)")
    return corpus, used


def load_text(
    data_dir: str | Path | None = None,
    *,
    context: int = 64,
    held_out: float = 0.1,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> TextDataset:
    """Loads byte windows for next-token prediction from local text files.

    Args:
        data_dir: A directory whose files (every regular file below it, hidden ones
            excepted, in sorted path order) are UTF-8 text; or a single file. None:
            the standard library's sources (:func:`stdlib_files`).
        context: Tokens per example, >= 1.
        held_out: Fraction of the bytes at the end of the corpus kept for the test
            split, in (0, 1).
        max_bytes: Read at most this many bytes (None: all). Applies to the default
            corpus only: a ``data_dir`` is read whole.

    Returns:
        The dataset; ``x`` and ``y`` windows of shape (N, context), int32.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist, or holds no files.
        ValueError: A non-UTF-8 or all-empty corpus, a split shorter than one window
            of ``context + 1`` bytes, or a bad ``context`` / ``held_out``.
    """
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1:
        raise ValueError(f"context must be an integer >= 1, got {context!r}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out!r}")
    if data_dir is None:
        files, what = stdlib_files(), "the standard library corpus"
        if not files:
            raise FileNotFoundError(
                f"text: no public .py modules in {sysconfig.get_paths()['stdlib']}; pass --data-dir (data_dir=) "
                "a directory of UTF-8 text files"
            )
        corpus, files = read_corpus(files, max_bytes=max_bytes, what=what)
    else:
        root = Path(data_dir)
        if not root.exists():
            raise FileNotFoundError(
                f"text data not found: {root} does not exist. Pass --data-dir (data_dir=) a directory "
                "of UTF-8 text files, or omit it to use the Python standard library's sources."
            )
        files = [root] if root.is_file() else _files_below(root)
        if not files:
            raise FileNotFoundError(f"text data not found: {root} holds no files (data_dir, --data-dir)")
        corpus, files = read_corpus(files, what="data_dir (--data-dir)")
    tokens = np.frombuffer(corpus, np.uint8).astype(np.int32)
    split = len(tokens) - round(held_out * len(tokens))
    parts = {}
    for name, part in (("train", tokens[:split]), ("test", tokens[split:])):
        if len(part) < context + 1:
            raise ValueError(
                f"text: the {name} split has {len(part)} bytes ({len(tokens)} in the corpus, held_out={held_out}), "
                f"fewer than one window of context + 1 = {context + 1}; use more text or a smaller context"
            )
        parts[f"x_{name}"], parts[f"y_{name}"] = _windows(part, context)
    return TextDataset(**parts, num_classes=VOCAB_SIZE, name="text", sources=tuple(map(str, files)))


def _files_below(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by path; hidden files and directories (``.git``...) left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y), each (N, context): windows starting every ``context`` tokens, y one token ahead of x."""
    n = (len(tokens) - 1) // context
    starts = np.arange(n)[:, None] * context
    x = tokens[starts + np.arange(context)]
    return x, tokens[starts + np.arange(1, context + 1)]
