"""Atomic, verified training checkpoints (orbax arrays plus a JSON metadata file).

A checkpoint is a directory ``epoch_NNNN`` holding ``state/`` (every array leaf of a
pytree, written by orbax) and ``metadata.json`` (what the run was, the name, shape
and dtype of each leaf and a SHA-256 of their bytes). It is written under a
temporary name and renamed into place, so a crash mid-write never leaves a
half-written ``epoch_NNNN``; older checkpoints are deleted only after the new one
is in place.

Restoring checks everything it can before trusting the data: the metadata parses,
the run description matches, the leaves match the expected structure, and the
restored bytes hash to the recorded digest. Any failure is a
:class:`CheckpointError` naming the path and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointError", "latest", "restore", "save"]

_PATTERN = re.compile(r"epoch_(\d+)")
_METADATA = "metadata.json"
_STATE = "state"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or belongs to a different run."""


def save(directory: str | Path, epoch: int, tree: Any, metadata: Mapping[str, Any]) -> Path:
    """Writes ``tree`` as checkpoint ``directory/epoch_NNNN`` and drops older ones.

    Args:
      directory: Where checkpoints live; created if missing.
      epoch: Number of completed epochs; names the checkpoint.
      tree: A pytree of arrays (typed PRNG keys included).
      metadata: JSON-serialisable description of the run; :func:`restore` compares
        it with what the resuming run expects.

    Returns:
      The new checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch_{epoch:04d}"
    names, arrays = _flatten(tree)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the renamed checkpoint.
    tmp = directory / f".tmp-{final.name}-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        import orbax.checkpoint as ocp  # deferred: only runs that checkpoint pay for the import

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _STATE, dict(zip(names, arrays)))
            checkpointer.wait_until_finished()
        record = dict(metadata, leaves=_leaf_specs(names, arrays), sha256=_digest(arrays))
        (tmp / _METADATA).write_text(json.dumps(record, indent=1))
        if final.exists():  # a rerun of the same epoch after restarting from scratch
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in directory.iterdir():
        if old != final and (_PATTERN.fullmatch(old.name) or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: str | Path) -> Path | None:
    """The checkpoint with the highest epoch in ``directory``, or None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _PATTERN.fullmatch(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def restore(path: str | Path, template: Any, expected: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint back into the structure of ``template``.

    Args:
      path: A checkpoint directory written by :func:`save`.
      template: A pytree with the structure, shapes and dtypes to restore into
        (e.g. a freshly initialised train state).
      expected: Metadata entries that must equal those saved (recipe, model
        config, hyperparameters...).

    Returns:
      ``(tree, metadata)``: the restored pytree and the saved metadata.

    Raises:
      CheckpointError: Missing or unreadable files, a metadata entry that differs
        from ``expected``, leaves that differ in name, shape or dtype from
        ``template``, or restored bytes that fail the checksum.
    """
    path = Path(path)
    try:
        metadata = json.loads((path / _METADATA).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {_METADATA} ({e})") from e
    for key, want in expected.items():
        if (diff := _difference(key, metadata.get(key), want)) is not None:
            name, have, want = diff
            raise CheckpointError(
                f"checkpoint {path} is incompatible: {name} is {have!r} there but {want!r} in this run"
            )
    names, arrays = _flatten(template)
    _check_leaves(path, metadata.get("leaves"), _leaf_specs(names, arrays))
    abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in zip(names, arrays)}
    try:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path / _STATE, abstract)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"checkpoint {path}: cannot read the arrays ({type(e).__name__}: {e})") from e
    values = [np.asarray(restored[n]) for n in names]
    if _digest(values) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path}: array data does not match its checksum (corrupt files)")
    leaves = jax.tree.leaves(template)
    return jax.tree.unflatten(jax.tree.structure(template), [_unraw(v, t) for v, t in zip(values, leaves)]), metadata


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
        arrays.append(np.asarray(_raw(leaf)))
    if len(set(names)) != len(names):
        raise ValueError("checkpoint: leaf paths are not unique")
    return names, arrays


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


def _check_leaves(path: Path, saved: Any, want: list[list]) -> None:
    if not isinstance(saved, list) or not all(isinstance(s, list) and len(s) == 3 for s in saved):
        raise CheckpointError(f"checkpoint {path}: {_METADATA} lists no leaves")
    by_name = {spec[0]: spec for spec in saved}
    for spec in want:
        match = by_name.pop(spec[0], None)
        if match is None:
            raise CheckpointError(f"checkpoint {path} is incompatible: it has no {spec[0]!r}")
        if match != spec:
            raise CheckpointError(
                f"checkpoint {path} is incompatible: {spec[0]!r} is {match[2]}{match[1]} there, "
                f"{spec[2]}{spec[1]} in this run"
            )
    if by_name:
        raise CheckpointError(f"checkpoint {path} is incompatible: unexpected leaves {sorted(by_name)[:5]}")


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
