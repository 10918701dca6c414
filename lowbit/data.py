"""Datasets for training and evaluation, loaded from local files only.

Four datasets are known to :func:`load`:

* ``"digits"`` (default): scikit-learn's bundled 8x8 handwritten digits, 1797 images.
* ``"fashion-mnist"``: IDX files, by default from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``), or any directory of
  MNIST-format IDX files.
* ``"cifar10"``: the python-version CIFAR-10 batches in a directory you provide.
* ``"text"``: byte-level windows of local UTF-8 text for language models, by default the
  Python standard library's sources (:mod:`lowbit.text`).

Nothing is ever downloaded: a missing dataset raises :class:`FileNotFoundError` saying how
to get it. Images are returned NHWC, float32 in [0, 1]; labels are int32 class indices.
Text is a :class:`lowbit.text.TextDataset` of int32 byte ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np

from lowbit.text import TextDataset, load_text

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "Dataset",
    "batches",
    "is_text",
    "load",
    "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "cifar10", "text")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array == has no single truth value
class Dataset:
    """A train/test split of an image classification dataset.

    Attributes:
        x_train: Training images, shape (N_train, H, W, C), float32 in [0, 1].
        y_train: Training labels, shape (N_train,), int32 in [0, num_classes).
        x_test: Test images, shape (N_test, H, W, C), float32 in [0, 1].
        y_test: Test labels, shape (N_test,), int32 in [0, num_classes).
        num_classes: Number of classes.
        name: Canonical dataset name, one of :data:`DATASETS`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])


def is_text(dataset: Dataset | TextDataset) -> bool:
    """Integer inputs are token ids (a language model's data); images are floats."""
    return bool(np.issubdtype(np.asarray(dataset.x_train).dtype, np.integer))


@overload
def load(  # type: ignore[overload-overlap]  # "text" is also a str: the first match wins
    name: Literal["text"], data_dir: str | Path | None = None, *, context: int | None = None
) -> TextDataset: ...
@overload
def load(name: str = "digits", data_dir: str | Path | None = None, *, context: int | None = None) -> Dataset: ...


def load(
    name: str = "digits", data_dir: str | Path | None = None, *, context: int | None = None
) -> Dataset | TextDataset:
    """Loads a dataset from local files.

    Args:
        name: One of :data:`DATASETS`, ignoring case and ``_`` versus ``-``.
        data_dir: Directory holding the dataset files. Not accepted for ``"digits"``
            (bundled with scikit-learn); optional for ``"fashion-mnist"`` (defaults to
            :data:`DEFAULT_FASHION_MNIST_DIR`) and ``"text"`` (defaults to the standard
            library's sources); required for ``"cifar10"``.
        context: Tokens per example, ``"text"`` only (None: 64).

    Returns:
        The dataset with NHWC float32 images in [0, 1] and int32 labels, or, for
        ``"text"``, a :class:`lowbit.text.TextDataset` of (N, context) int32 windows.

    Raises:
        ValueError: Unknown name, ``data_dir`` given for digits, ``context`` given for
            an image dataset, or malformed files.
        FileNotFoundError: The dataset is not on disk; the message says how to get it.
    """
    key = name.strip().lower().replace("_", "-")
    if key == "text":
        return load_text(data_dir) if context is None else load_text(data_dir, context=context)
    if context is not None and key in DATASETS:
        raise ValueError(f"context={context!r} applies to the text dataset, not to {key}")
    if key == "digits":
        if data_dir is not None:
            # Silently ignoring it would train on digits when the user meant other data.
            raise ValueError("digits is bundled with scikit-learn and takes no data_dir (--data-dir)")
        return _load_digits()
    if key == "fashion-mnist":
        return _load_fashion_mnist(Path(DEFAULT_FASHION_MNIST_DIR if data_dir is None else data_dir))
    if key == "cifar10":
        return _load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | Sequence[int] = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterates over one epoch of (x, y) minibatches.

    The order depends only on ``seed``; pass ``seed=(run_seed, epoch)`` to get a fresh,
    reproducible order each epoch.

    Args:
        x: Inputs, shape (N, ...).
        y: Labels, shape (N, ...).
        batch_size: Examples per batch, > 0.
        seed: Seed for :func:`numpy.random.default_rng` (an int or a sequence of ints).
        shuffle: Whether to permute the examples; if False they come in stored order.
        drop_last: Whether to drop the final partial batch, so every batch has exactly
            ``batch_size`` examples (one compiled shape under ``jax.jit``).

    Returns:
        An iterator of ``(x_batch, y_batch)`` numpy arrays, shapes (B, ...) and (B, ...).

    Raises:
        ValueError: ``batch_size`` < 1, ``x`` and ``y`` differ in length, or
            ``drop_last`` with fewer than ``batch_size`` examples (an empty epoch).
    """
    n = len(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {n} vs {len(y)}")
    if drop_last and n < batch_size:
        # An empty epoch would make training silently do nothing.
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples and drop_last=True")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return ((x[idx], y[idx]) for idx in (order[i : i + batch_size] for i in range(0, stop, batch_size)))


# IDX type codes (http://yann.lecun.com/exdb/mnist/); all multi-byte values are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format), plain or gzip-compressed (``.gz`` suffix).

    Args:
        path: The file.

    Returns:
        The array with the shape and element type from the header, native byte order.

    Raises:
        ValueError: Bad magic number, unknown type code, corrupt gzip stream, or a data
            section whose size does not match the header; the message names the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip data ({e})") from e

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_size})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_size
    if actual != expected:
        raise ValueError(f"{path}: header shape {shape} needs {expected} data bytes, file has {actual}")
    return np.frombuffer(raw, dtype, offset=header_size).astype(dtype.newbyteorder("=")).reshape(shape)


def _load_digits() -> Dataset:
    # scikit-learn's own file, read as its load_digits reads it (np.loadtxt of the gzipped CSV: 64 pixel
    # columns then the label), without importing scikit-learn: that import costs ~2 s per process.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("digits ships with scikit-learn, which is not installed (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    x = (data[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[..., None]
    y = data[:, -1].astype(np.int32)
    # Every fifth example of each class is a test example: a stratified 80/20 split that
    # depends on no RNG, so it is identical across numpy versions and platforms.
    rank_in_class = np.empty_like(y)
    for c in range(10):
        members = np.flatnonzero(y == c)
        rank_in_class[members] = np.arange(len(members))
    test = rank_in_class % 5 == 4
    return Dataset(x[~test], y[~test], x[test], y[test], num_classes=10, name="digits")


_FASHION_FILES = {
    "x_train": ("train-images", "idx3-ubyte"),
    "y_train": ("train-labels", "idx1-ubyte"),
    "x_test": ("t10k-images", "idx3-ubyte"),
    "y_test": ("t10k-labels", "idx1-ubyte"),
}
_FASHION_HOWTO = (
    "Install it with `apt-get install -y dataset-fashion-mnist` (files go to "
    f"{DEFAULT_FASHION_MNIST_DIR}/) or pass --data-dir (data_dir=) a directory with the four "
    "IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each may be .gz)."
)


def _find_idx(directory: Path, stem: str, kind: str) -> Path:
    # Mirrors spell the names both "train-images-idx3-ubyte" (LeCun, Zalando, Debian)
    # and "train-images.idx3-ubyte"; either may be gzipped.
    for name in (f"{stem}-{kind}", f"{stem}.{kind}"):
        for suffix in ("", ".gz"):
            if (candidate := directory / (name + suffix)).is_file():
                return candidate
    raise FileNotFoundError(f"Fashion-MNIST: {directory} has no {stem}-{kind}[.gz]. {_FASHION_HOWTO}")


def _load_fashion_mnist(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found: {directory} does not exist. {_FASHION_HOWTO}")
    paths = {key: _find_idx(directory, stem, kind) for key, (stem, kind) in _FASHION_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        xp, yp = paths[f"x_{split}"], paths[f"y_{split}"]
        images, labels = read_idx(xp), read_idx(yp)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"{xp}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"{yp}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{xp} has {len(images)} images but {yp} has {len(labels)} labels")
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{yp}: label {labels.max()} outside the 10 classes")
        arrays[f"x_{split}"] = (images.astype(np.float32) / np.float32(255))[..., None]
        arrays[f"y_{split}"] = labels.astype(np.int32)
    return Dataset(**arrays, num_classes=10, name="fashion-mnist")


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_HOWTO = (
    "CIFAR-10 is not packaged and is never downloaded at run time: fetch the python version "
    "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), extract it, "
    "and pass --data-dir (data_dir=) the directory holding data_batch_1..data_batch_5 and "
    "test_batch (or its parent containing cifar-10-batches-py/)."
)


def _load_cifar10(data_dir: str | Path | None) -> Dataset:
    if data_dir is None:
        raise FileNotFoundError(f"CIFAR-10 needs a data directory. {_CIFAR_HOWTO}")
    directory = Path(data_dir)
    if not (directory / "data_batch_1").is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    for name in (*_CIFAR_TRAIN, "test_batch"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"CIFAR-10: {directory} has no {name}. {_CIFAR_HOWTO}")
    train = [_read_cifar_batch(directory / name) for name in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(directory / "test_batch")
    return Dataset(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        name="cifar10",
    )


# The only globals a CIFAR-10 batch refers to: numpy's array and dtype reconstructors
# (protocol 2-4 pickles use _reconstruct, protocol 5 uses _frombuffer; the module is
# numpy.core under numpy 1, numpy._core under numpy 2), and, in batches re-pickled by
# Python 3 at protocol 2, _codecs.encode for bytes. Each maps to a function chosen
# here (numpy's own, taken from its __reduce__), never imported by the name the file gives.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What Python 3 protocol-2 pickles call as ``_codecs.encode`` to rebuild ``bytes``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only for latin1 text, got {encoding!r}")
    return text.encode("latin1")


_PICKLE_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, and nothing that could run code.

    Every callable a pickle invokes (REDUCE, NEWOBJ, INST, OBJ, BUILD of a class
    instance) is first looked up through :meth:`find_class`, extension codes
    included; admitting only numpy's array reconstruction and latin1 bytes means a
    crafted file can build arrays, dicts, lists, strings and numbers, and nothing else.
    """

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only arrays, lists and strings"
            ) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch into (N, 32, 32, 3) float32 images and (N,) int32 labels.

    The batches are pickles; they are read with :class:`_ArrayUnpickler`, so a crafted
    file cannot run code: it fails with a ``ValueError`` instead.
    """
    try:
        with path.open("rb") as f:
            # The official batches were pickled by Python 2; "bytes" keeps their str keys
            # as bytes instead of guessing a text encoding.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
    ) as e:  # what a malformed opcode stream raises
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")

    def field(key: str) -> np.ndarray:
        # Re-pickled copies made under Python 3 have str keys rather than bytes.
        for k in (key.encode(), key):
            if k in batch:
                return np.asarray(batch[k])
        raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(map(str, batch))})")

    data, labels = field("data"), field("labels")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels have shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"{path}: labels outside the 10 classes")
    # Each row is stored channel-major (1024 red, 1024 green, 1024 blue, each row-major).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) / np.float32(255), labels.astype(np.int32)
