"""Mutation testing of lowbit's core modules: every mutant must make some test fail.

Each mutant is one exact text replacement (``old -> new``) in one source file
that changes what the code computes: a flipped rounding, a dropped block axis,
a skipped state update. The script checks out HEAD in a temporary ``git
worktree`` (the checkout it lives in is never touched, so people may keep
editing it), overlays this checkout's ``tests/test_mutation_guards.py`` (the
tests written for mutants that once survived, which may not be committed yet),
and for every mutant: applies it, runs the tests of the mutated module there
(``pytest -x -n 0``, ``CI=true`` for the fast Hypothesis profile, the
worktree's ``lowbit`` first on ``sys.path``), records whether a test failed and
which one first, and reverts it. ``old`` must occur exactly once in its file:
a mutant whose text the code no longer holds is an error, not a silent pass.

Before the mutants, two sanity checks: ``import lowbit`` in the test
environment must resolve to the worktree, and a mutant that raises at import
must be caught. Each test selection then runs once unmutated and must pass, or
a "caught" would mean nothing.

Usage: ``python benchmarks/mutation.py [MUTANT_ID ...] [--list] [--report]
[--skip-baseline] [--no-guards]``; no ids runs every mutant. ``--no-guards``
runs the other tests alone (the guards file removed from the worktree): how a
mutant fared before its guard was written. Appends one JSON line per mutant
to ``results/mutation.jsonl`` and rewrites ``results/mutation.md`` from the
latest record of every mutant in the table (and, in its own column, the latest
record without the guards).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GUARDS = "tests/test_mutation_guards.py"
TIMEOUT_S = 1200  # per pytest run; a mutant that hangs the tests counts as caught (CI would time out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mutant:
    """One behaviour-changing edit of one source file.

    Attributes:
      id: short stable name, used on the command line and in the records.
      path: the file, relative to the repository root.
      old: text that must occur exactly once in ``path``.
      new: what replaces it.
      what: the mutation in words (the table's "mutation" column).
      tests: test files to run, in order (the guards file is appended).
    """

    id: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]


FORMATS = ("tests/test_formats.py",)
BLOCK = ("tests/test_block_formats.py", "tests/test_scale_modes.py")
QUANT = ("tests/test_quant.py", "tests/test_quant_calibration.py")
STE = ("tests/test_ste.py",)
QDOT = ("tests/test_qdot.py", "tests/test_gemm_axes.py")
DELAYED = ("tests/test_delayed_scaling.py",)
LOSS_SCALE = ("tests/test_loss_scale.py",)
HADAMARD = ("tests/test_hadamard.py",)
ACCUMULATE = ("tests/test_accumulate.py",)

MUTANTS = [
    # ----- lowbit/formats/minifloat.py
    Mutant(
        id="minifloat-ties-away",
        path="lowbit/formats/minifloat.py",
        old="bump = lax.shift_right_logical(low, u32(1)) + jnp.where(shift > 0, odd, u32(0))",
        new="bump = lax.shift_right_logical(low, u32(1)) + jnp.where(shift > 0, u32(1), u32(0))",
        what="bit-level round to nearest: ties go away from zero instead of to even",
        tests=FORMATS,
    ),
    Mutant(
        id="minifloat-pow-tie-parity",
        path="lowbit/formats/minifloat.py",
        old="        if (fmt.bias + radix2) % 2:\n            parity = parity + u32(1)",
        new="        if (fmt.bias + radix2) % 2 == 0:\n            parity = parity + u32(1)",
        what="power-of-two grids (E8M0, radix-4 FP4): ties go to the odd code",
        tests=FORMATS,
    ),
    Mutant(
        id="minifloat-saturate-ignored",
        path="lowbit/formats/minifloat.py",
        old="bound = self.max_value if saturate or not self.has_nan else self._over_bound",
        new="bound = self.max_value if not self.has_nan else self._over_bound",
        what="`saturate=True` ignored: magnitudes are clamped to the overflow bound, not to max_value",
        tests=FORMATS,
    ),
    Mutant(
        id="minifloat-stochastic-half",
        path="lowbit/formats/minifloat.py",
        old="abits = abits + (_words(rbits) & low)",
        new="abits = abits + lax.shift_right_logical(low + u32(1), u32(1))",
        what="stochastic rounding on the bits: the random word replaced by one half step",
        tests=FORMATS,
    ),
    # ----- lowbit/formats/integer.py
    Mutant(
        id="integer-ties-away",
        path="lowbit/formats/integer.py",
        old="q = lax.round(xf, lax.RoundingMethod.TO_NEAREST_EVEN)",
        new="q = lax.round(xf, lax.RoundingMethod.AWAY_FROM_ZERO)",
        what="integer round to nearest: ties away from zero instead of to even",
        tests=FORMATS,
    ),
    Mutant(
        id="integer-narrow-ignored",
        path="lowbit/formats/integer.py",
        old="return -(1 << (self.bits - 1)) + int(self.narrow)",
        new="return -(1 << (self.bits - 1))",
        what="`narrow=True` ignored: the most negative code stays on the grid",
        tests=FORMATS,
    ),
    # ----- lowbit/formats/block.py
    Mutant(
        id="block-floor-rceil-swapped",
        path="lowbit/formats/block.py",
        old='carries = {"floor": 0, "ceil": full, "rceil": full - max_fraction,',
        new='carries = {"floor": full - max_fraction, "ceil": full, "rceil": 0,',
        what="E8M0 scale modes `floor` and `rceil` swapped",
        tests=BLOCK,
    ),
    Mutant(
        id="block-axis-dropped",
        path="lowbit/formats/block.py",
        old="amax_bits = jnp.max(jnp.where(finite, abits, u32(0)), axis=axis, keepdims=True)",
        new="amax_bits = jnp.max(jnp.where(finite, abits, u32(0)), axis=(axis - 1, axis), keepdims=True)",
        what="block amax over the whole row (block axis dropped): one scale per row, not per block",
        tests=BLOCK,
    ),
    Mutant(
        id="block-size-off-by-one",
        path="lowbit/formats/block.py",
        old="        xb, n = _blocks(x, self.block_size, a)\n        factors: tuple[jax.Array, ...]\n",
        new="        xb, n = _blocks(x, self.block_size - 1, a)\n        factors: tuple[jax.Array, ...]\n",
        what="`quantize` groups `block_size - 1` elements per block (`encode`/`decode` keep the right size)",
        tests=BLOCK,
    ),
    Mutant(
        id="block-in-place-reduces-the-last-axis",
        path="lowbit/formats/block.py",
        old="            code, _ = self._mx_scale(xb, a + 1)\n",
        new="            code, _ = self._mx_scale(xb)\n",
        what="MX blocks cut in place along another axis than the last take their maxima along the last",
        tests=BLOCK,
    ),
    Mutant(
        id="block-short-axis-one-block-per-element",
        path="lowbit/formats/block.py",
        old="            xb, n = x.reshape(*x.shape[:a], 1, *x.shape[a:]), x.shape[a]\n",
        new="            xb, n = x.reshape(*x.shape[:a], x.shape[a], 1, *x.shape[a + 1 :]), x.shape[a]\n",
        what="an axis shorter than a block is cut into blocks of one element instead of one block",
        tests=BLOCK,
    ),
    Mutant(
        id="nvfp4-tensor-scale-ignored",
        path="lowbit/formats/block.py",
        old="        bsf = _div(lax.optimization_barrier(",
        new="        s = jnp.float32(1)\n        bsf = _div(lax.optimization_barrier(",
        what="NVFP4 FP32 tensor scale ignored (1): block scales are E4M3(amax_block / 6) alone",
        tests=BLOCK,
    ),
    # ----- lowbit/quant
    Mutant(
        id="quant-absmax-from-min",
        path="lowbit/quant/scales.py",
        old="hi = _finite_extreme(jnp.max, x, reduce, magnitude=True)",
        new="hi = _finite_extreme(jnp.min, x, reduce, magnitude=True)",
        what="symmetric clip from min |x| instead of max |x|",
        tests=QUANT,
    ),
    Mutant(
        id="quant-channel-axis-ignored",
        path="lowbit/quant/granularity.py",
        old="return Layout(shape, shape, tuple(i for i in range(len(shape)) if i != a), a)",
        new="return Layout(shape, shape, tuple(range(len(shape))), a)",
        what="`Channel`: the channel axis is reduced too (one scale per tensor)",
        tests=QUANT,
    ),
    Mutant(
        id="quant-zero-point-dropped",
        path="lowbit/quant/params.py",
        old="return p._replace(zero_point=zero_point(q, lo, p.step()))",
        new="return p._replace(zero_point=jnp.zeros_like(p.step()))",
        what="asymmetric quantizers: zero point dropped (0)",
        tests=QUANT,
    ),
    Mutant(
        id="quant-e4m3-tensor-scale-from-empty-groups",
        path="lowbit/quant/params.py",
        old="ts = _positive(_arith.div(jnp.max(jnp.where(real, step, jnp.float32(0))), jnp.float32(E4M3.max_value)))",
        new="ts = _positive(_arith.div(jnp.max(step), jnp.float32(E4M3.max_value)))",
        what="two-level `e4m3` scales: an all-zero group's placeholder step takes part in the tensor scale",
        tests=QUANT,
    ),
    Mutant(
        id="quant-stochastic-half",
        path="lowbit/quant/_arith.py",
        old="u = lax.shift_right_logical(rbits, u32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)",
        new="u = jnp.full(a.shape, 0.5, jnp.float32)",
        what="integer-grid stochastic rounding: the uniform draw replaced by 0.5",
        tests=QUANT,
    ),
    # ----- lowbit/training/ste.py
    Mutant(
        id="ste-clip-mask-dropped",
        path="lowbit/training/ste.py",
        old=(
            "inside: jax.Array, g: jax.Array\n) -> tuple[jax.Array]:\n"
            "    return (jnp.where(inside, g, jnp.zeros_like(g)),)"
        ),
        new="inside: jax.Array, g: jax.Array\n) -> tuple[jax.Array]:\n    return (g,)",
        what="`clipped_ste`: the gradient passes outside [lo, hi] (mask dropped)",
        tests=STE,
    ),
    Mutant(
        id="lsq-grad-scale-removed",
        path="lowbit/training/ste.py",
        old="d_step = _sum_to_shape(gc * dq_ds, step.shape) * gs",
        new="d_step = _sum_to_shape(gc * dq_ds, step.shape)",
        what="LSQ: the step gradient's scale g = 1/sqrt(N Q_P) removed",
        tests=STE,
    ),
    Mutant(
        id="pact-alpha-grad-zeroed",
        path="lowbit/training/ste.py",
        old="d_alpha = jnp.where(high, gc, below)",
        new="d_alpha = jnp.zeros_like(gc)",
        what="PACT: the clip level's gradient is zero",
        tests=STE,
    ),
    # ----- lowbit/training/qdot.py
    Mutant(
        id="qdot-wgrad-quantizer-skipped",
        path="lowbit/training/qdot.py",
        old="g_drhs = _quantize(config, config.drhs_grad, g_r, ax_r, k2)\n",
        new="g_drhs = g_r\n",
        what="weight-gradient product: the gradient quantizer `drhs_grad` skipped",
        tests=QDOT,
    ),
    Mutant(
        id="qdot-wgrad-forward-copy",
        path="lowbit/training/qdot.py",
        old='res_lhs = lhs_q if _reuses(config, "lhs") else lhs',
        new="res_lhs = lhs_q",
        what="weight-gradient product re-quantizes the forward's quantized lhs, not the raw operand",
        tests=QDOT,
    ),
    Mutant(
        id="qdot-grad-history-not-rolled",
        path="lowbit/training/qdot.py",
        old="        h_grad = delayed.update(h_grad, current)\n",
        new="",
        what="delayed gradient scaling: the gradient's amax history is not updated",
        tests=QDOT + DELAYED,
    ),
    # ----- lowbit/training: state updates
    Mutant(
        id="gradscale-update-skipped",
        path="lowbit/training/gradscale.py",
        old="new = jnp.where(jnp.isfinite(scaled), new, scale)",
        new="new = scale",
        what="GradScale: the scale is never updated",
        tests=QDOT,
    ),
    Mutant(
        id="gradscale-unbounded",
        path="lowbit/training/gradscale.py",
        old="return jnp.clip(new, jnp.float32(MIN_SCALE), jnp.float32(MAX_SCALE))",
        new="return new",
        what="GradScale: the [2^-100, 2^100] bounds dropped (a zero gradient doubles s to inf)",
        tests=QDOT,
    ),
    Mutant(
        id="qdot-gradscale-stale-scale",
        path="lowbit/training/qdot.py",
        old="inv = (1.0 / new_gs).astype(jnp.float32)",
        new="inv = (1.0 / gs).astype(jnp.float32)",
        what="GradScale: the gradient is quantized with the previous step's scale, not the updated one",
        tests=QDOT,
    ),
    Mutant(
        id="delayed-history-not-rolled",
        path="lowbit/training/delayed.py",
        old="return jnp.concatenate([current.astype(history.dtype)[None], history[:-1]])",
        new="return history",
        what="delayed scaling: the amax history is not rolled",
        tests=DELAYED,
    ),
    Mutant(
        id="loss-scale-not-updated",
        path="lowbit/training/loss_scale.py",
        old="loss_scale=jnp.where(grads_finite, grown, shrunk),",
        new="loss_scale=self.loss_scale,",
        what="dynamic loss scale: S never grows or backs off",
        tests=LOSS_SCALE,
    ),
    Mutant(
        id="hadamard-signs-dropped",
        path="lowbit/training/hadamard.py",
        old="signs = rht_signs(key, block).astype(dtype)",
        new="signs = jnp.ones((block,), dtype)",
        what="RHT: the random signs are not applied (plain Hadamard)",
        tests=HADAMARD,
    ),
    Mutant(
        id="accumulate-never-promotes",
        path="lowbit/training/accumulate.py",
        old="interval = acc.promote_every or chunks * acc.chunk",
        new="interval = chunks * acc.chunk",
        what="narrow accumulator: `promote_every` ignored (the partial sum is never promoted)",
        tests=ACCUMULATE,
    ),
]

# Not in the table: proves that the tests import the worktree's lowbit and that a failure is seen.
SANITY = Mutant(
    id="sanity-import-raises",
    path="lowbit/formats/minifloat.py",
    old='SPECIALS = ("ieee",',
    new='raise RuntimeError("mutation.py sanity check")\nSPECIALS = ("ieee",',
    what="raise at import",
    tests=FORMATS,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one pytest run of a (mutated) worktree gave.

    Attributes:
      status: ``caught`` (a test failed or errored), ``survived`` (all passed)
        or ``timeout`` (killed after ``TIMEOUT_S``; counted as caught).
      test: the first failing test's node id (or collection error's path), else "".
      seconds: wall time of the run.
      tail: the last lines of pytest's output (for errors).
    """

    status: str
    test: str
    seconds: float
    tail: str


def git(*args: str, cwd: Path = REPO) -> str:
    """Output of a git command (raises on failure)."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def pytest_env(worktree: Path) -> dict[str, str]:
    """The environment pytest runs in: the worktree's lowbit first, fast CI profile."""
    env = dict(os.environ, CI="true", PYTHONPATH=str(worktree))
    env.pop("HYPOTHESIS_PROFILE", None)  # the ci profile, whatever the caller's shell says
    env.pop("XLA_FLAGS", None)  # conftest then sets its fast-compile flag, as in CI
    return env


def run_pytest(worktree: Path, tests: tuple[str, ...]) -> Outcome:
    """Run ``tests`` (and the guards file, if present) in ``worktree``, stopping at the first failure."""
    files = [*tests, GUARDS] if (worktree / GUARDS).exists() else list(tests)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *files]
    t0 = time.perf_counter()
    try:
        env = pytest_env(worktree)
        proc = subprocess.run(cmd, cwd=worktree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Outcome(status="timeout", test="", seconds=time.perf_counter() - t0, tail="")
    finally:
        # Hypothesis' example database would replay one mutant's failures into the next run.
        shutil.rmtree(worktree / ".hypothesis", ignore_errors=True)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-30:])
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if proc.returncode == 0:
        return Outcome(status="survived", test="", seconds=seconds, tail=tail)
    if proc.returncode in (1, 2) and failed:  # 1: tests failed; 2: interrupted (a collection error)
        return Outcome(status="caught", test=failed[0], seconds=seconds, tail=tail)
    raise RuntimeError(f"pytest {' '.join(files)} exited {proc.returncode} without a failing test:\n{tail}")


def apply(worktree: Path, m: Mutant) -> str:
    """Apply ``m`` in ``worktree``; returns the original text (for ``revert``)."""
    path = worktree / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"mutant {m.id}: its old text occurs {count} times in {m.path} (must be exactly once)")
    path.write_text(text.replace(m.old, m.new))
    return text


def revert(worktree: Path, m: Mutant, original: str) -> None:
    """Undo ``apply`` and check that the worktree's sources are HEAD's again."""
    (worktree / m.path).write_text(original)
    git("diff", "--quiet", "HEAD", "--", "lowbit", cwd=worktree)


def run_mutant(worktree: Path, m: Mutant) -> Outcome:
    """Apply ``m``, run its tests, revert."""
    original = apply(worktree, m)
    try:
        return run_pytest(worktree, m.tests)
    finally:
        revert(worktree, m, original)


def sanity_checks(worktree: Path) -> None:
    """The tests import the worktree's lowbit, and an import-time failure there is caught."""
    code = "import lowbit, pathlib; print(pathlib.Path(lowbit.__file__).resolve())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=worktree, env=pytest_env(worktree), capture_output=True, text=True, check=True
    )
    imported = Path(out.stdout.strip())
    if worktree.resolve() not in imported.parents:
        raise RuntimeError(f"the test environment imports {imported}, not the worktree's lowbit ({worktree})")
    outcome = run_mutant(worktree, SANITY)
    if outcome.status != "caught":
        raise RuntimeError(f"a mutant that raises at import was not caught ({outcome.status}):\n{outcome.tail}")
    print(f"sanity: lowbit from {imported}; import-time raise caught by {outcome.test}", flush=True)


def baseline(worktree: Path, mutants: list[Mutant]) -> dict[tuple[str, ...], float]:
    """Run every distinct test selection unmutated; each must pass. Returns selection -> seconds."""
    seconds = {}
    for tests in dict.fromkeys(m.tests for m in mutants):
        outcome = run_pytest(worktree, tests)
        if outcome.status != "survived":
            raise RuntimeError(f"unmutated HEAD fails {' '.join(tests)} ({outcome.test}):\n{outcome.tail}")
        seconds[tests] = outcome.seconds
        print(f"baseline {' '.join(tests)}: pass, {outcome.seconds:.0f} s", flush=True)
    return seconds


def read_records() -> list[dict]:
    """Every record of ``results/mutation.jsonl`` (oldest first)."""
    path = RESULTS / "mutation.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _verdict(r: dict | None) -> str:
    if r is None:
        return "not run"
    return {"caught": "yes", "timeout": "yes (timeout)", "survived": "**no**"}[r["status"]]


def report() -> str:
    """Markdown: one row per mutant in ``MUTANTS``, in table order.

    A row's verdict is its latest record run with the guards file (a record
    without it counts where it was caught: a guard cannot uncatch a mutant);
    the "other tests alone" column is its latest record run without the guards
    file, where it has one, else the verdict where a test outside it caught.
    """
    records = read_records()
    with_guards = {r["id"]: r for r in records if r["guards_sha256"]}
    alone = {r["id"]: r for r in records if not r["guards_sha256"]}
    rows = []
    for m in MUTANTS:
        r = with_guards.get(m.id) or alone.get(m.id)
        if m.id in alone and alone[m.id]["status"] != "survived" and m.id in with_guards:
            r = max(with_guards[m.id], alone[m.id], key=lambda x: x["date"])
        rows.append((m, r))
    done = [r for _, r in rows if r is not None]
    commits = sorted({r["commit"] for r in done})
    dates = sorted(r["date"] for r in done)
    caught = sum(r["status"] != "survived" for r in done)
    guard_tests = sum(r["status"] != "survived" and r["test"].startswith(GUARDS) for r in done)
    same_code = ""
    if len(commits) > 1:  # records from several commits compare only if the code under test is the same
        differs = any(
            subprocess.run(["git", "diff", "--quiet", commits[0], c, "--", "lowbit", "tests"], cwd=REPO).returncode
            for c in commits[1:]
        )
        same_code = " (`lowbit/` and `tests/` " + ("differ" if differs else "identical") + " between them)"
    lines = [
        "## mutation: every mutant is caught by some test",
        "",
        "`python benchmarks/mutation.py`: each mutant is one exact text replacement in a core module "
        "(`old` must occur exactly once), applied in a temporary git worktree of HEAD with this checkout's "
        f"`{GUARDS}` overlaid, then that module's tests run there (`pytest -x -n 0`, `CI=true`, the worktree's "
        "`lowbit` first on `sys.path`; a mutant raising at import must be caught first, and each selection must "
        "pass unmutated before its mutants run, which `--skip-baseline` skips: only a survival reads without it). "
        'Seconds: wall time until the first failure (or the whole selection). "other tests '
        f"alone\": the same run without `{GUARDS}` (`--no-guards`), i.e. before the mutant's guard was written.",
        "",
        f"HEAD {', '.join(f'`{c}`' for c in commits) or '-'}{same_code}; runs {dates[0] if dates else '-'} .. "
        f"{dates[-1] if dates else '-'}; {caught} of {len(MUTANTS)} caught ({guard_tests} only by "
        f"`{GUARDS}`, the rest by the tests that were already there)"
        + ("; not run yet: " + ", ".join(m.id for m, r in rows if r is None) if len(done) < len(MUTANTS) else "")
        + ".",
        "",
        "| module | mutant | mutation | caught? | first failing test | seconds | other tests alone |",
        "|---|---|---|---|---|---:|---|",
    ]
    for m, r in rows:
        if r is None:
            lines.append(f"| `{m.path}` | `{m.id}` | {m.what} | not run | | | |")
            continue
        test = f"`{r['test']}`" if r["test"] else ""
        if m.id in alone:
            before = _verdict(alone[m.id])
        else:
            before = "yes" if r["status"] != "survived" and not r["test"].startswith(GUARDS) else "not run"
        lines.append(f"| `{m.path}` | `{m.id}` | {m.what} | {_verdict(r)} | {test} | {r['seconds']:.0f} | {before} |")
    return "\n".join(lines)


def write_report() -> None:
    """Rewrite ``results/mutation.md`` from the records."""
    text = report()
    (RESULTS / "mutation.md").write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--report", action="store_true", help="only rewrite results/mutation.md from the records")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the selections unmutated first")
    ap.add_argument("--no-guards", action="store_true", help=f"run without {GUARDS} (the other tests alone)")
    args = ap.parse_args(argv)
    by_id = {m.id: m for m in MUTANTS}
    if len(by_id) != len(MUTANTS):
        raise ValueError("mutant ids must be unique")
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:32} {m.path:32} {m.what}")
        return
    if args.report:
        write_report()
        return
    unknown = [i for i in args.ids if i not in by_id]
    if unknown:
        raise SystemExit(f"unknown mutant ids {unknown}; allowed: {', '.join(by_id)}")
    mutants = [by_id[i] for i in args.ids] if args.ids else MUTANTS
    info = _timing.machine_info()
    commit = git("rev-parse", "--short", "HEAD")
    RESULTS.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-mutation-") as tmp:
        worktree = Path(tmp) / "wt"
        git("worktree", "add", "--detach", str(worktree), "HEAD")
        try:
            guards = REPO / GUARDS
            guards_sha = ""
            if args.no_guards:
                (worktree / GUARDS).unlink(missing_ok=True)
            elif guards.exists():
                shutil.copyfile(guards, worktree / GUARDS)
                guards_sha = hashlib.sha256(guards.read_bytes()).hexdigest()[:12]
            # Every mutant's old text must be there before anything runs: a stale table fails fast.
            for m in mutants:
                revert(worktree, m, apply(worktree, m))
            sanity_checks(worktree)
            base = {} if args.skip_baseline else baseline(worktree, mutants)
            for m in mutants:
                outcome = run_mutant(worktree, m)
                row = dict(
                    id=m.id,
                    path=m.path,
                    what=m.what,
                    status=outcome.status,
                    test=outcome.test,
                    seconds=round(outcome.seconds, 1),
                    baseline_seconds=round(base[m.tests], 1) if m.tests in base else None,
                    tests=list(m.tests),
                    commit=commit,
                    guards_sha256=guards_sha,  # "": run without the guards file
                    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    load_average=_timing.load_average(),
                    cpu=info["cpu"],
                    jax=info["jax"],
                )
                print(json.dumps(row), flush=True)
                with (RESULTS / "mutation.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
        finally:
            git("worktree", "remove", "--force", str(worktree))
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    write_report()


if __name__ == "__main__":
    main()
