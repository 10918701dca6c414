"""Atomic, verified training checkpoints (orbax arrays plus a JSON metadata file).

A checkpoint is a directory ``epoch_NNNN`` (``epoch_NNNN_step_MMMM`` when written
``MMMM`` steps into the epoch after ``NNNN``) holding ``state/`` (every array
leaf of a pytree, written by orbax) and ``metadata.json`` (what the run was, the
name, shape and dtype of each leaf and a SHA-256 of the metadata and the leaves'
bytes).

Crash safety: a checkpoint is written under a temporary name owned by the
writing process (``.tmp-PID-...``), every file and directory in it is fsynced,
and it is renamed into place; an old checkpoint is first renamed out of the way
(``.del-PID-...``) and only then deleted. So a process killed at any moment,
including mid-write, leaves every ``epoch_*`` directory complete, and the newest
one loadable. A writer removes only its own temporary directories and those of
processes that no longer exist, never another live process's write.

Several processes (``jax.distributed``): every process takes part in gathering
the sharded arrays, process 0 alone writes (without orbax's cross-process
barriers) while the others wait for it, and every process reads a checkpoint by
itself, so the directory must be on a filesystem all hosts share.

Restoring checks everything it can before trusting the data: the metadata parses
and passes its schema (``lowbit.trainer.metadata``), the metadata and restored
bytes hash to the recorded digest, and only then the run description matches and
the leaves match the expected structure (so an edited field is damage, not a
different run). Any failure is a :class:`CheckpointError` naming the path
and what is wrong; :class:`IncompatibleCheckpointError` (a subclass) means the
checkpoint is intact but belongs to a different run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.trainer import interrupt
from lowbit.trainer import metadata as schema
from lowbit.trainer.lock import pid_alive

__all__ = [
    "FORMAT",
    "CheckpointError",
    "IncompatibleCheckpointError",
    "checkpoints",
    "latest",
    "remove",
    "restore",
    "restore_latest",
    "save",
]

FORMAT = 2
"""Checkpoint layout version; 2 covers the metadata by the checksum and records ``step``."""

_PATTERN = re.compile(r"epoch_(\d{4,})(?:_step_(\d{4,}))?")
_PRIVATE = re.compile(r"\.(?:tmp|del)-(\d+)-[0-9a-f]{32}(?:-.*)?")
_METADATA = "metadata.json"
_STATE = "state"
_QUIET_SETTLE_S = 0.25  # a failed restore waits until tensorstore's late reports stop this long ...
_QUIET_MAX_S = 2.0  # ... or this long at most


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or belongs to a different run."""


class IncompatibleCheckpointError(CheckpointError):
    """An intact checkpoint of a different run (recipe, model, hyperparameters, structure)."""


def save(
    directory: str | Path, epoch: int, tree: Any, metadata: Mapping[str, Any], *, step: int = 0, keep: int = 1
) -> Path:
    """Writes ``tree`` as a checkpoint in ``directory``, then keeps only the newest ``keep``.

    Args:
      directory: Where checkpoints live; created if missing.
      epoch: Number of completed epochs.
      tree: A pytree of arrays (typed PRNG keys included).
      metadata: JSON-serialisable description of the run (no NaN or inf);
        :func:`restore` compares it with what the resuming run expects. The keys
        ``format``, ``epoch``, ``step``, ``leaves`` and ``sha256`` are set here.
      step: Steps completed in the epoch after ``epoch`` (0 at an epoch's end).
      keep: How many checkpoints to keep, counting the new one; older ones are
        deleted. Checkpoints ordered after the new one (an abandoned later run,
        a stray directory) are left alone.

    Returns:
      The new checkpoint's path: ``epoch_NNNN``, or ``epoch_NNNN_step_MMMM``
      when ``step`` > 0.

    Raises:
      ValueError: ``epoch``, ``step`` or ``keep`` out of range, or ``metadata``
        not JSON-serialisable.
    """
    for name, value, lo in (("epoch", epoch, 0), ("step", step, 0), ("keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"checkpoint.save: {name} must be an integer >= {lo}, got {value!r}")
    directory = Path(directory).resolve()  # orbax needs an absolute path
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / _name(epoch, step)
    names, arrays = _flatten(tree)  # collective across processes: every process gathers
    if not is_writer():
        barrier(f"checkpoint {final.name}")  # returns once process 0 has written it
        return final
    record = dict(metadata, format=FORMAT, epoch=epoch, step=step, leaves=_leaf_specs(names, arrays))
    try:
        record["sha256"] = _digest(record, arrays)
    except ValueError as e:  # allow_nan=False: a NaN would make metadata.json invalid JSON
        raise ValueError(f"checkpoint.save: metadata is not valid JSON ({e})") from None
    except TypeError as e:
        raise ValueError(f"checkpoint.save: metadata is not JSON-serialisable ({e})") from None
    _sweep(directory)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the renamed checkpoint.
    tmp = directory / f"{_private('tmp')}-{final.name}"
    # SIGINT/SIGTERM wait for the write (interrupt.deferred): a Ctrl-C inside orbax's
    # threads would print their tracebacks and leave the temporary directory behind.
    with interrupt.deferred():
        try:
            tmp.mkdir()
            import orbax.checkpoint as ocp  # deferred: only runs that checkpoint pay for the import

            with ocp.StandardCheckpointer(**_alone()) as checkpointer:
                checkpointer.save(tmp / _STATE, dict(zip(names, arrays)))
                checkpointer.wait_until_finished()
            (tmp / _METADATA).write_text(json.dumps(record, indent=1, allow_nan=False))
            _fsync_tree(tmp)
            if final.exists():  # a stray or abandoned checkpoint of the same name
                remove(final)
            os.rename(tmp, final)
            _fsync(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    key = _order(final.name)
    older = [p for p in checkpoints(directory) if _order(p.name) <= key]
    for old in older[keep:]:
        remove(old)
    barrier(f"checkpoint {final.name}")
    return final


def is_writer() -> bool:
    """Whether this process writes files: process 0 (the only one without ``jax.distributed``)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``; nothing to wait for in one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _alone() -> dict[str, Any]:
    """Orbax options for this process reading or writing by itself: no barriers with the others."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return dict(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def checkpoints(directory: str | Path) -> list[Path]:
    """Every checkpoint directory in ``directory``, newest (highest epoch, then step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _PATTERN.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: _order(p.name), reverse=True)


def latest(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory`` (not checked), or None if there is none."""
    found = checkpoints(directory)
    return found[0] if found else None


def remove(path: str | Path) -> None:
    """Deletes a checkpoint: renamed out of sight first, so no half-deleted one is ever listed."""
    path = Path(path)
    aside = path.with_name(_private("del"))
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def restore(
    path: str | Path, template: Any, expected: Mapping[str, Any], check: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint back into the structure of ``template``.

    Args:
      path: A checkpoint directory written by :func:`save`.
      template: A pytree with the structure, shapes and dtypes to restore into
        (e.g. a freshly initialised train state).
      expected: Metadata entries that must equal those saved (recipe, model
        config, hyperparameters...).
      check: Further validation of the metadata (e.g. ``metadata.check_run``);
        raises ``ValueError`` naming the bad field.

    Returns:
      ``(tree, metadata)``: the restored pytree and the saved metadata.

    Raises:
      IncompatibleCheckpointError: A metadata entry differs from ``expected``,
        or leaves differ in name, shape or dtype from ``template``.
      CheckpointError: Missing or unreadable files, metadata that fails its
        schema, or metadata or restored bytes that fail the checksum. The
        checksum is checked before compatibility, so an edited metadata field
        (a hand-changed ``recipe``) is damage, not a different run.
    """
    path = Path(path).resolve()
    try:
        meta = json.loads((path / _METADATA).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {_METADATA} ({e})") from e
    try:
        schema.check_checkpoint(meta, FORMAT)
        if check is not None:
            check(meta)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {_METADATA} is invalid: {e}") from None
    # The checksum first, compatibility second: an edited field (a recipe changed by
    # hand) is damage, to skip, not a different run, to refuse. So the arrays are read
    # in the shapes the checkpoint records, not the template's.
    saved = meta["leaves"]
    try:
        abstract = {n: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for n, shape, dtype in saved}
    except TypeError as e:
        raise CheckpointError(
            f"checkpoint {path}: {_METADATA} is invalid: leaves name an unknown dtype ({e})"
        ) from None
    if len(abstract) != len(saved):
        raise CheckpointError(f"checkpoint {path}: {_METADATA} is invalid: leaves has repeated names")
    try:
        import orbax.checkpoint as ocp

        with _quiet_failed_reads(), ocp.StandardCheckpointer(**_alone()) as checkpointer:
            restored = checkpointer.restore(path / _STATE, abstract)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"checkpoint {path}: cannot read the arrays ({type(e).__name__}: {e})") from e
    values = {n: np.asarray(restored[n]) for n in abstract}
    if _digest({k: v for k, v in meta.items() if k != "sha256"}, list(values.values())) != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {path}: metadata or array data does not match its checksum (edited or corrupt files)"
        )
    for key, want in expected.items():
        if (diff := _difference(key, meta.get(key), want)) is not None:
            name, have, want = diff
            raise IncompatibleCheckpointError(
                f"checkpoint {path} is incompatible: {name} is {have!r} there but {want!r} in this run"
            )
    names, arrays = _flatten(template)
    _check_leaves(path, saved, _leaf_specs(names, arrays))
    leaves = jax.tree.leaves(template)
    return jax.tree.unflatten(jax.tree.structure(template), [_unraw(values[n], t) for n, t in zip(names, leaves)]), meta


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Keeps tensorstore's "Event loop is closed" reports out of a failed restore's output.

    When one array of a damaged checkpoint fails to read, orbax closes its event
    loop while other reads are still in flight; each of those then reports a
    ``RuntimeError: Event loop is closed`` from tensorstore's threads through
    ``sys.unraisablehook`` (dozens of tracebacks burying the one useful
    warning), for a few milliseconds after the failure. Only those reports are
    dropped, and only until they stop arriving; anything else goes to the
    previous hook.
    """
    previous = sys.unraisablehook
    last = [time.monotonic()]

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            last[0] = time.monotonic()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        last[0] = time.monotonic()
        deadline = last[0] + _QUIET_MAX_S
        while time.monotonic() < deadline and time.monotonic() - last[0] < _QUIET_SETTLE_S:
            time.sleep(_QUIET_SETTLE_S / 5)
        raise
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def restore_latest(
    directory: str | Path,
    template: Any,
    expected: Mapping[str, Any],
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, dict[str, Any], Path] | None:
    """Restores the newest intact checkpoint in ``directory``, skipping damaged ones.

    Each damaged checkpoint skipped (unreadable, failing its schema or checksum,
    e.g. an empty stray directory) gets a warning naming it and why.

    Args:
      directory: Where :func:`save` wrote.
      template, expected, check: As for :func:`restore`.

    Returns:
      ``(tree, metadata, path)``, or None when ``directory`` holds no checkpoint.

    Raises:
      IncompatibleCheckpointError: The newest intact checkpoint belongs to a
        different run (older ones are not tried: they would be a stale run too).
      CheckpointError: Every checkpoint is damaged (the newest one's error).
    """
    found = checkpoints(directory)
    errors = []
    for path in found:
        try:
            tree, meta = restore(path, template, expected, check)
        except IncompatibleCheckpointError:
            raise
        except CheckpointError as e:
            errors.append(e)
            warnings.warn(f"skipping damaged checkpoint {path.name}: {e}", RuntimeWarning, stacklevel=2)
            continue
        return tree, meta, path
    if errors:
        raise CheckpointError(f"every checkpoint in {Path(directory).resolve()} is damaged; the newest: {errors[0]}")
    return None


def _name(epoch: int, step: int) -> str:
    return f"epoch_{epoch:04d}" + (f"_step_{step:04d}" if step else "")


def _order(name: str) -> tuple[int, int]:
    m = _PATTERN.fullmatch(name)
    return int(m.group(1)), int(m.group(2) or 0)


def _private(kind: str) -> str:
    """A name only this process uses; the pid lets others tell when its owner is gone."""
    return f".{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _sweep(directory: Path) -> None:
    """Deletes temporary directories left by processes that no longer exist."""
    for p in directory.iterdir():
        if (m := _PRIVATE.fullmatch(p.name)) and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flushes every file, then every directory, under ``root`` to disk."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for f in filenames:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _difference(name: str, have: Any, want: Any) -> tuple[str, Any, Any] | None:
    """The first (dotted name, saved, expected) that differ, descending into dicts; None if equal."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in dict.fromkeys([*want, *have]):
            if (diff := _difference(f"{name}.{key}", have.get(key), want.get(key))) is not None:
                return diff
        return None
    return None if have == want else (name, have, want)


def _flatten(tree: Any) -> tuple[list[str], list[np.ndarray]]:
    """Leaf names (key paths) and host arrays; PRNG keys become their raw key data."""
    names, arrays = [], []
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names.append(jax.tree_util.keystr(keypath, simple=True, separator="/"))
        arrays.append(_host(_raw(leaf)))
    if len(set(names)) != len(names):
        raise ValueError("checkpoint: leaf paths are not unique")
    return names, arrays


def _host(leaf: Any) -> np.ndarray:
    """The whole (global) array on this host; shards held by other processes are gathered (collective)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _raw(leaf: Any) -> Any:
    # Orbax cannot store typed PRNG keys; their uint32 data round-trips exactly.
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def _unraw(value: np.ndarray, template_leaf: Any) -> Any:
    if jax.dtypes.issubdtype(template_leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(template_leaf))
    return value


def _leaf_specs(names: list[str], arrays: list[np.ndarray]) -> list[list]:
    return [[n, list(a.shape), a.dtype.name] for n, a in zip(names, arrays)]


def _check_leaves(path: Path, saved: list[list], want: list[list]) -> None:
    by_name = {spec[0]: spec for spec in saved}
    for spec in want:
        match = by_name.pop(spec[0], None)
        if match is None:
            raise IncompatibleCheckpointError(f"checkpoint {path} is incompatible: it has no {spec[0]!r}")
        if match != spec:
            raise IncompatibleCheckpointError(
                f"checkpoint {path} is incompatible: {spec[0]!r} is {match[2]}{match[1]} there, "
                f"{spec[2]}{spec[1]} in this run"
            )
    if by_name:
        raise IncompatibleCheckpointError(f"checkpoint {path} is incompatible: unexpected leaves {sorted(by_name)[:5]}")


def _digest(meta: Mapping[str, Any], arrays: list[np.ndarray]) -> str:
    """SHA-256 of the metadata (canonical JSON, without ``sha256``) and the arrays' bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
