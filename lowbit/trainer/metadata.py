"""The schema of a checkpoint's ``metadata.json``: every field checked before it is trusted.

A metadata file is read from disk, so it may be damaged, stale or hand-edited.
:func:`check_checkpoint` validates the fields every checkpoint has (written by
``checkpoint.save``); :func:`check_run` the fields the train loop adds. Each
raises ``ValueError`` naming the field, the value found and what is allowed;
``checkpoint.restore`` turns that into a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["check_checkpoint", "check_run"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HISTORY_KEYS = {"epoch", "loss", "train_acc", "test_accuracy", "time_s", "skipped"}
_TEXT_KEYS = {"test_loss", "perplexity", "bits_per_byte"}  # a language model's history has these too
_PARTIAL_KEYS = {"losses", "correct", "skipped", "time_s"}


def check_checkpoint(meta: Any, format_version: int) -> None:
    """The fields ``checkpoint.save`` writes: format, epoch, step, leaves, sha256."""
    if not isinstance(meta, dict):
        raise ValueError(f"the file holds a {type(meta).__name__}, not a JSON object")
    if meta.get("format") != format_version:
        raise ValueError(
            f"format is {meta.get('format')!r}; this lowbit reads checkpoint format {format_version} "
            "(a checkpoint written by another lowbit version)"
        )
    _int(meta, "epoch", 0)
    _int(meta, "step", 0)
    leaves = _field(meta, "leaves")
    if not isinstance(leaves, list):
        raise ValueError(f"leaves is {leaves!r}; allowed: a list of [name, shape, dtype]")
    for i, leaf in enumerate(leaves):
        if not (
            isinstance(leaf, list)
            and len(leaf) == 3
            and isinstance(leaf[0], str)
            and isinstance(leaf[2], str)
            and isinstance(leaf[1], list)
            and all(_is_int(d) and d >= 0 for d in leaf[1])
        ):
            raise ValueError(f"leaves[{i}] is {leaf!r}; allowed: [name, list of sizes >= 0, dtype name]")
    if not (isinstance(sha := _field(meta, "sha256"), str) and _SHA256.fullmatch(sha)):
        raise ValueError(f"sha256 is {sha!r}; allowed: 64 lowercase hex digits")


def check_run(meta: Mapping[str, Any]) -> None:
    """The fields the train loop writes, consistent with each other.

    ``epoch`` (completed epochs) is at most ``hparams.epochs``; ``step`` (steps
    into the next epoch) is below ``steps_per_epoch`` and 0 once all epochs are
    done; ``history`` has one entry per completed epoch; ``partial`` (the
    interrupted epoch's running sums) is present exactly when ``step`` > 0.
    A run on token windows records ``tokens_per_example`` (predictions per
    example, which bounds the correct counts) and the held-out loss, perplexity
    and bits per byte in each history entry.
    """
    for key in ("recipe", "dataset", "lowbit_version"):
        _str(meta, key)
    hparams = _field(meta, "hparams")
    if not isinstance(hparams, dict):
        raise ValueError(f"hparams is {hparams!r}; allowed: an object")
    epochs = _int(hparams, "epochs", 1, where="hparams.")
    batch_size = _int(hparams, "batch_size", 1, where="hparams.")
    _int(hparams, "seed", 0, where="hparams.")
    for key in ("learning_rate", "weight_decay", "warmup"):
        _number(hparams, key, 0.0, where="hparams.")
    model = _field(meta, "model")
    if not (isinstance(model, dict) and isinstance(model.get("type"), str)):
        raise ValueError(f"model is {model!r}; allowed: an object with a string 'type'")
    steps_per_epoch = _int(meta, "steps_per_epoch", 1)
    text = "tokens_per_example" in meta
    positions = _int(meta, "tokens_per_example", 1) if text else 1
    keys = _HISTORY_KEYS | _TEXT_KEYS if text else _HISTORY_KEYS
    epoch = _int(meta, "epoch", 0, epochs)
    step = _int(meta, "step", 0, steps_per_epoch - 1 if epoch < epochs else 0)
    history = _field(meta, "history")
    if not (isinstance(history, list) and len(history) == epoch):
        raise ValueError(f"history is {_short(history)}; allowed: a list of {epoch} entries (one per completed epoch)")
    for i, entry in enumerate(history):
        where = f"history[{i}]."
        if not (isinstance(entry, dict) and set(entry) == keys):
            raise ValueError(f"history[{i}] is {_short(entry)}; allowed: an object with keys {sorted(keys)}")
        _int(entry, "epoch", i + 1, i + 1, where=where)
        if entry["loss"] is not None:  # None: every step of the epoch was skipped
            _number(entry, "loss", 0.0, where=where)
        _number(entry, "train_acc", 0.0, 1.0, where=where)
        _number(entry, "test_accuracy", 0.0, 1.0, where=where)
        for key in sorted(_TEXT_KEYS & set(entry)):
            if entry[key] is not None:  # None: a non-finite held-out loss (JSON has no NaN)
                _number(entry, key, 0.0, where=where)
        _number(entry, "time_s", 0.0, where=where)
        _int(entry, "skipped", 0, steps_per_epoch, where=where)
    partial = meta.get("partial")
    if step == 0:
        if partial is not None:
            raise ValueError(f"partial is {_short(partial)} at step 0; allowed: null")
    else:
        if not (isinstance(partial, dict) and set(partial) == _PARTIAL_KEYS):
            raise ValueError(f"partial is {_short(partial)}; allowed: an object with keys {sorted(_PARTIAL_KEYS)}")
        losses = partial["losses"]
        if not (
            isinstance(losses, list)
            and len(losses) <= step
            and all(_is_number(v) and math.isfinite(v) and v >= 0 for v in losses)
        ):
            raise ValueError(f"partial.losses is {_short(losses)}; allowed: at most {step} finite numbers >= 0")
        _int(partial, "correct", 0, step * batch_size * positions, where="partial.")
        _int(partial, "skipped", 0, step, where="partial.")
        _number(partial, "time_s", 0.0, where="partial.")
    times = _field(meta, "step_times_ms")
    if not (isinstance(times, list) and all(_is_number(t) and math.isfinite(t) and t >= 0 for t in times)):
        raise ValueError(f"step_times_ms is {_short(times)}; allowed: a list of finite numbers >= 0")
    _number(meta, "train_time_s", 0.0)


def _field(meta: Mapping[str, Any], key: str, where: str = "") -> Any:
    if key not in meta:
        raise ValueError(f"{where}{key} is missing")
    return meta[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(meta: Mapping[str, Any], key: str, lo: int, hi: int | None = None, *, where: str = "") -> int:
    v = _field(meta, key, where)
    if not (_is_int(v) and v >= lo and (hi is None or v <= hi)):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{where}{key} is {v!r}; allowed: {allowed}")
    return v


def _number(meta: Mapping[str, Any], key: str, lo: float, hi: float | None = None, *, where: str = "") -> float:
    v = _field(meta, key, where)
    if not (_is_number(v) and math.isfinite(v) and v >= lo and (hi is None or v <= hi)):
        allowed = f"a finite number >= {lo}" if hi is None else f"a number in [{lo}, {hi}]"
        raise ValueError(f"{where}{key} is {v!r}; allowed: {allowed}")
    return v


def _str(meta: Mapping[str, Any], key: str) -> str:
    v = _field(meta, key)
    if not (isinstance(v, str) and v):
        raise ValueError(f"{key} is {v!r}; allowed: a non-empty string")
    return v


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
