"""Tests for lowbit.data on small IDX and CIFAR files written here, plus bundled digits."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from lowbit import data, text
from lowbit.text import TextDataset

_FASHION_STEMS = {
    "train-images-idx3-ubyte": "x_train",
    "train-labels-idx1-ubyte": "y_train",
    "t10k-images-idx3-ubyte": "x_test",
    "t10k-labels-idx1-ubyte": "y_test",
}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, _IDX_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def _fashion_arrays(rng, n_train=7, n_test=3, h=5, w=4):
    return {
        "x_train": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _write_fashion(directory: Path, arrays, gz=(True, False, True, False), sep="-"):
    directory.mkdir(parents=True, exist_ok=True)
    for (stem, key), compress in zip(_FASHION_STEMS.items(), gz):
        name = stem if sep == "-" else stem.replace("-idx", ".idx")
        _write(directory / (name + (".gz" if compress else "")), _idx_bytes(arrays[key]))
    return directory


# --- IDX reader ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-300, 0, 1, 32767], dtype=np.int16),  # multi-byte: catches byte-order bugs
        np.array([[1.5, -2.25], [0.0, 1e-3]], dtype=np.float32),
    ],
)
def test_read_idx_round_trip(tmp_path, array, suffix):
    out = data.read_idx(_write(tmp_path / f"a-idx{suffix}", _idx_bytes(array)))
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
        (lambda b: b[:9], "truncated IDX header"),
        (lambda b: b[:-1], "needs 24 data bytes, file has 23"),
        (lambda b: b + b"\x00", "needs 24 data bytes, file has 25"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path, mangle, match):
    path = _write(tmp_path / "bad-idx3-ubyte", mangle(_idx_bytes(np.zeros((2, 3, 4), np.uint8))))
    with pytest.raises(ValueError, match=match) as info:
        data.read_idx(path)
    assert "bad-idx3-ubyte" in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((8, 8, 8), np.uint8)))[:-12])
    with pytest.raises(ValueError, match="corrupt gzip") as info:
        data.read_idx(path)
    assert "cut-idx3-ubyte.gz" in str(info.value)


# --- Fashion-MNIST ------------------------------------------------------------------


@pytest.mark.parametrize("sep", ["-", "."])
def test_fashion_mnist_loads_mixed_plain_and_gz(tmp_path, sep):
    arrays = _fashion_arrays(np.random.default_rng(0))
    arrays["x_train"][0, 0, 0] = 255
    ds = data.load("Fashion_MNIST", _write_fashion(tmp_path, arrays, sep=sep))

    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.image_shape == (5, 4, 1)
    assert ds.x_train.shape == (7, 5, 4, 1) and ds.x_test.shape == (3, 5, 4, 1)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.x_train[0, 0, 0, 0] == 1.0
    for key in ("x_train", "x_test"):
        np.testing.assert_allclose(getattr(ds, key)[..., 0] * 255, arrays[key], atol=1e-4)
    for key in ("y_train", "y_test"):
        np.testing.assert_array_equal(getattr(ds, key), arrays[key])


def test_fashion_mnist_count_mismatch(tmp_path):
    arrays = _fashion_arrays(np.random.default_rng(1))
    arrays["y_test"] = arrays["y_test"][:2]
    with pytest.raises(ValueError, match="3 images but .*t10k-labels.* 2 labels"):
        data.load("fashion-mnist", _write_fashion(tmp_path, arrays))


def test_fashion_mnist_label_out_of_range(tmp_path):
    arrays = _fashion_arrays(np.random.default_rng(2))
    arrays["y_train"][3] = 10
    with pytest.raises(ValueError, match="train-labels.*label 10"):
        data.load("fashion-mnist", _write_fashion(tmp_path, arrays))


def test_fashion_mnist_wrong_rank(tmp_path):
    arrays = _fashion_arrays(np.random.default_rng(3))
    arrays["x_test"] = arrays["x_test"].reshape(3, -1)
    with pytest.raises(ValueError, match=r"t10k-images.*\(N, H, W\)"):
        data.load("fashion-mnist", _write_fashion(tmp_path, arrays))


def test_fashion_mnist_missing_default_dir_says_apt_get(tmp_path, monkeypatch):
    absent = tmp_path / "nowhere"
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", str(absent))
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--data-dir" in message and str(absent) in message


def test_fashion_mnist_missing_file_named(tmp_path):
    directory = _write_fashion(tmp_path, _fashion_arrays(np.random.default_rng(4)))
    (directory / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*apt-get"):
        data.load("fashion-mnist", directory)


def test_real_fashion_mnist():
    if not Path(data.DEFAULT_FASHION_MNIST_DIR).is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    ds = data.load("fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)


# --- CIFAR-10 -----------------------------------------------------------------------


def _cifar_batch(rng, n, str_keys=False):
    batch = {
        b"batch_label": b"synthetic",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
    }
    return {k.decode(): v for k, v in batch.items()} if str_keys else batch


def _write_cifar(directory: Path, rng, str_keys=False):
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(rng, 2 + i, str_keys)
        (directory / name).write_bytes(pickle.dumps(batches[name]))
    return batches


@pytest.mark.parametrize("layout", ["flat", "nested", "str-keys"])
def test_cifar10_loads(tmp_path, layout):
    target = tmp_path / "cifar-10-batches-py" if layout == "nested" else tmp_path
    batches = _write_cifar(target, np.random.default_rng(5), str_keys=layout == "str-keys")
    ds = data.load("cifar10", tmp_path)

    key = "data" if layout == "str-keys" else b"data"
    label_key = "labels" if layout == "str-keys" else b"labels"
    train = [batches[f"data_batch_{j}"] for j in range(1, 6)]
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    assert ds.x_train.shape == (2 + 3 + 4 + 5 + 6, 32, 32, 3) and ds.x_test.shape == (7, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, np.concatenate([b[label_key] for b in train]))
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][label_key])
    # Row layout: 1024 red, then green, then blue, each plane row-major.
    row = batches["test_batch"][key][4]
    row_idx, col_idx = 7, 19
    for channel in range(3):
        expected = row[channel * 1024 + row_idx * 32 + col_idx] / 255.0
        assert ds.x_test[4, row_idx, col_idx, channel] == pytest.approx(expected)


def test_cifar10_without_data_dir_says_how_to_get_it():
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        data.load("cifar10")


def test_cifar10_missing_batch_named(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(6))
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="no data_batch_4"):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"not a pickle", "not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "expected a pickled dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'labels' entry"),
        (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), r"\(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "outside the 10"),
    ],
)
def test_cifar10_rejects_malformed_batch(tmp_path, payload, match):
    _write_cifar(tmp_path, np.random.default_rng(7))
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=match) as info:
        data.load("cifar10", tmp_path)
    assert "test_batch" in str(info.value)


class _Exploit:
    """Pickles as a call to os.system: unpickling it with pickle.load would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "inside-dict", "inside-array"])
def test_cifar10_malicious_pickle_runs_no_code(tmp_path, where):
    _write_cifar(tmp_path, np.random.default_rng(8))
    marker = tmp_path / "pwned"
    exploit = _Exploit(marker)
    payload = {
        "top": exploit,
        "inside-dict": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": exploit},
        "inside-array": {b"data": np.array([exploit], dtype=object), b"labels": [0]},
    }[where]
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=2))
    pickle.loads(pickle.dumps(exploit))  # the oracle: plain pickle does run it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(
        ValueError,
        match=r"data_batch_3: not a CIFAR-10 python batch.*refusing to load global "
        r"(posix|os|nt)\.system",
    ):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_every_pickle_protocol(tmp_path, protocol):
    batches = _write_cifar(tmp_path, np.random.default_rng(9))
    for name, batch in batches.items():
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = data.load("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    np.testing.assert_array_equal(
        (ds.x_test * 255).round().astype(np.uint8).transpose(0, 3, 1, 2).reshape(7, -1), batches["test_batch"][b"data"]
    )


# --- digits and dispatch ------------------------------------------------------------


def test_digits_shapes_range_and_stratified_split():
    ds = data.load()
    assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    per_class = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), per_class // 5)


def test_digits_are_scikit_learns_load_digits():
    """lowbit reads scikit-learn's file itself (no scikit-learn import); the oracle is load_digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = (bunch.images / 16.0).astype(np.float32)[..., None], bunch.target.astype(np.int32)
    ds = data.load("digits")
    test = np.zeros(len(y), bool)  # every fifth example of each class, in file order
    for c in range(10):
        test[np.flatnonzero(y == c)[4::5]] = True
    for got, want in ((ds.x_train, x[~test]), (ds.y_train, y[~test]), (ds.x_test, x[test]), (ds.y_test, y[test])):
        np.testing.assert_array_equal(got, want)


def test_digits_split_is_deterministic():
    a, b = data.load("digits"), data.load("digits")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_digits_rejects_data_dir(tmp_path):
    with pytest.raises(ValueError, match="bundled"):
        data.load("digits", tmp_path)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="digits, fashion-mnist, cifar10, text"):
        data.load("imagenet")


# --- text --------------------------------------------------------------------------


def _write_text(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(payload)
    return directory


def test_text_windows_split_and_order(tmp_path):
    corpus = bytes(32 + i % 95 for i in range(1024))  # printable ASCII, so neighbouring bytes differ
    _write_text(tmp_path, {"b.txt": corpus[512:], "a/x.txt": corpus[:512], ".hidden": b"\xff", "a/.git/c": b"\xff"})
    ds = data.load("text", tmp_path, context=16)
    assert isinstance(ds, TextDataset) and ds.name == "text" and ds.num_classes == 256 and ds.context == 16
    assert ds.sources == (str(tmp_path / "a" / "x.txt"), str(tmp_path / "b.txt"))  # sorted; hidden left out
    split = 1024 - round(0.1 * 1024)  # the last 10 % of the bytes are held out
    train, test = np.frombuffer(corpus[:split], np.uint8), np.frombuffer(corpus[split:], np.uint8)
    for x, y, part in ((ds.x_train, ds.y_train, train), (ds.x_test, ds.y_test, test)):
        assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == ((len(part) - 1) // 16, 16)
        np.testing.assert_array_equal(x.reshape(-1), part[: x.size])  # stride = context: no byte twice
        np.testing.assert_array_equal(y.reshape(-1), part[1 : x.size + 1])  # y is x one byte ahead


def test_text_split_is_deterministic(tmp_path):
    _write_text(tmp_path, {f"{i}.py": f"print({i})\n".encode() * 20 for i in range(5)})
    a, b = data.load("text", tmp_path, context=8), data.load("text", tmp_path, context=8)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_text_default_corpus_is_the_standard_library(monkeypatch):
    ds = data.load("text")
    assert ds.context == 64 and all(Path(p).suffix == ".py" and Path(p).name[0] != "_" for p in ds.sources)
    assert list(ds.sources) == sorted(ds.sources)
    n = ds.x_train.size + ds.x_test.size + 2  # each split loses at most context bytes to its last window
    assert text.DEFAULT_MAX_BYTES - 2 * 64 <= n <= text.DEFAULT_MAX_BYTES
    assert b"import " in bytes(ds.x_train[:200].astype(np.uint8).reshape(-1))
    monkeypatch.setattr(text, "stdlib_files", lambda: [])
    with pytest.raises(FileNotFoundError, match="no public .py modules"):
        data.load("text")


def test_text_single_file_and_utf8(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("Grüße, 世界!\n" * 10, encoding="utf-8")
    ds = data.load("text", path, context=4)
    assert ds.sources == (str(path),) and ds.x_train.max() > 127  # multi-byte UTF-8 as bytes


@pytest.mark.parametrize(
    ("files", "error", "match"),
    [
        ({"empty.txt": b""}, ValueError, r"the text files are empty \(1 file\(s\), 0 bytes\)"),
        ({"a.txt": b"", "b.txt": b""}, ValueError, "the text files are empty"),
        (
            {"ok.txt": b"fine\n" * 50, "img.bin": b"\x89PNG\r\n\x1a\n\xff"},
            ValueError,
            r"img.bin is not UTF-8 text \(byte 0x89",
        ),
        (
            {"tiny.txt": b"0123456789"},
            ValueError,
            r"the train split has 9 bytes .* fewer than one window of context \+ 1 = 17",
        ),
        ({"small.txt": b"x" * 100}, ValueError, r"the test split has 10 bytes"),
        ({}, FileNotFoundError, "holds no files"),
    ],
)
def test_text_bad_input_names_the_argument(tmp_path, files, error, match):
    directory = _write_text(tmp_path / "corpus", files)
    with pytest.raises(error, match=match) as info:
        data.load("text", directory, context=16)
    assert "\n" not in str(info.value)


def test_text_empty_files_among_others_are_skipped(tmp_path):
    _write_text(tmp_path, {"a.txt": b"", "b.txt": b"hello world\n" * 30})
    assert data.load("text", tmp_path, context=8).sources[-1].endswith("b.txt")


def test_text_missing_dir_is_one_line_like_the_image_datasets(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load("text", absent)
    message = str(info.value)
    assert message.startswith(f"text data not found: {absent} does not exist.") and "--data-dir" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(context=0), "context must be an integer >= 1, got 0"),
        (dict(held_out=1.0), r"held_out must be in \(0, 1\)"),
    ],
)
def test_text_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        text.load_text(**kwargs)


def test_context_is_for_text_only():
    with pytest.raises(ValueError, match="context=8 applies to the text dataset, not to digits"):
        data.load("digits", context=8)


# --- batches ------------------------------------------------------------------------


def _toy(n=10):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return x, np.arange(n, dtype=np.int32)


def test_batches_deterministic_and_seed_dependent():
    x, y = _toy(32)
    first = [yb for _, yb in data.batches(x, y, 8, seed=(3, 0))]
    again = [yb for _, yb in data.batches(x, y, 8, seed=(3, 0))]
    other = [yb for _, yb in data.batches(x, y, 8, seed=(3, 1))]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))


def test_batches_cover_every_example_once_and_keep_pairs():
    x, y = _toy(12)
    got = list(data.batches(x, y, 4, seed=1))
    assert len(got) == 3 and all(xb.shape == (4, 2) for xb, _ in got)
    ys = np.concatenate([yb for _, yb in got])
    np.testing.assert_array_equal(np.sort(ys), y)
    for xb, yb in got:
        np.testing.assert_array_equal(xb, x[yb])


@pytest.mark.parametrize("drop_last, sizes", [(True, [3, 3, 3]), (False, [3, 3, 3, 1])])
def test_batches_drop_last(drop_last, sizes):
    x, y = _toy(10)
    got = list(data.batches(x, y, 3, shuffle=False, drop_last=drop_last))
    assert [len(yb) for _, yb in got] == sizes
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in got]), y[: sum(sizes)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), ">= 1"),
        (dict(batch_size=11), "exceeds the 10 examples"),
        (dict(batch_size=2, y_len=9), "differ in length"),
    ],
)
def test_batches_rejects_bad_arguments(kwargs, match):
    x, y = _toy(10)
    y = y[: kwargs.pop("y_len", 10)]
    # Raised at the call, not on the first next(), so the mistake points at the caller.
    with pytest.raises(ValueError, match=match):
        data.batches(x, y, **kwargs)
