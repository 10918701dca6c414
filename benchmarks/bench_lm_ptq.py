"""Language-model PTQ table (issue 20): lowbit's weight methods and qwix's on the same trained LM.

Loads the float model of a ``lowbit train --model lm --dataset text`` checkpoint
(``lowbit.ptq.restore.load_model``), draws the calibration windows as ``lowbit
ptq`` does (``lowbit.ptq.run.calibration_images``: ``--samples`` training
windows, ``--seed``), and scores every row on the dataset's fixed held-out
split with ``lowbit.ptq.evaluate.evaluate``: bits per byte (mean cross-entropy
/ ln 2) and the increase over the float model.

lowbit rows (``lowbit.ptq.weights.quantize_weights``): fp32; W8A8 (int8
per-channel RTN weights, dynamic int8 per-tensor activations); W4A16 g128 RTN /
GPTQ / AWQ / SmoothQuant; W3A16 g128 RTN / GPTQ / AWQ; W4A8 g128 SmoothQuant
(smoothing, then RTN of the scaled weights), W4A8 g128 GPTQ and W4A8 g128
SmoothQuant + GPTQ (smoothing, then GPTQ of the scaled weights); NF4 g64 RTN. Weight-only rows are packed
(``pack=True``, ``lowbit.nn.packed.memory``); the memory columns of the others
say ``n/a`` (and the record why).

qwix rows (``qwix.contrib``; the ``[peers]`` extra): RTN (``PtqProvider``),
GPTQ, AWQ and SmoothQuant, int4 weights in groups of 128 inputs
(``tile_size=128``), on the same float weights and the same calibration
windows. They run in a child process: ``lowbit.quantize`` (which
``load_model`` calls) installs lowbit's op hooks on ``jax.lax.dot_general`` for
the rest of the process, and qwix's interception then no longer sees
``nnx.Linear``'s products (its calibration collects no statistics). The child
rebuilds the model from the parent's float parameters and never installs them.
A qwix method that fails is recorded with its exception (type and first line).

Every row appends one JSON record (lowbit commit, qwix version, command line,
load) to ``<out>.jsonl``; ``<out>.md`` is rewritten with the newest record of
every row of this configuration (checkpoint, samples, seed, batch size).

Usage::

    python benchmarks/bench_lm_ptq.py --checkpoint runs/lm            # all rows, 128 windows
    python benchmarks/bench_lm_ptq.py --checkpoint runs/lm --samples 16 --rows 'W4A16.*'
    python benchmarks/bench_lm_ptq.py --checkpoint runs/lm --no-qwix
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from bench_accuracy import lowbit_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LINEAR_OPS = r".*/(qkv|proj|mlp_in|mlp_out)"  # qwix rules: the LM's nnx.Linear layers (lowbit: every weighted op)

# (label, weight format, group size (None: per channel), method, activation format or None)
LOWBIT_ROWS = [
    ("fp32", None, None, None, None),
    ("W8A8 RTN", "int8", None, "rtn", "int8"),
    ("W4A16 g128 RTN", "int4", 128, "rtn", None),
    ("W4A16 g128 GPTQ", "int4", 128, "gptq", None),
    ("W4A16 g128 AWQ", "int4", 128, "awq", None),
    ("W4A16 g128 SmoothQuant", "int4", 128, "smoothquant", None),
    ("W3A16 g128 RTN", "int3", 128, "rtn", None),
    ("W3A16 g128 GPTQ", "int3", 128, "gptq", None),
    ("W3A16 g128 AWQ", "int3", 128, "awq", None),
    ("W4A8 g128 SmoothQuant", "int4", 128, "smoothquant", "int8"),
    ("W4A8 g128 GPTQ", "int4", 128, "gptq", "int8"),
    ("W4A8 g128 SmoothQuant + GPTQ", "int4", 128, "smoothquant+gptq", "int8"),
    ("NF4 g64 RTN", "nf4", 64, "rtn", None),
]
QWIX_ROWS = [
    "qwix W4A16 g128 RTN",
    "qwix W4A16 g128 GPTQ",
    "qwix W4A16 g128 AWQ",
    "qwix W4A16 g128 SmoothQuant",
    "qwix W4A8 g128 SmoothQuant",
]
ORDER = [r[0] for r in LOWBIT_ROWS] + QWIX_ROWS


def _reason(e: BaseException) -> str:
    """An exception as ``Type: first line``."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _mean_error(rows: list[dict]) -> float | None:
    errors = [r["error"] for r in rows if r.get("error") is not None]
    return sum(errors) / len(errors) if errors else None


# ----- lowbit ---------------------------------------------------------------------------------------------------
def run_lowbit(model, batches, x_test, y_test, spec, float_loss: float, pack: bool) -> dict[str, Any]:
    """One lowbit row: quantize a copy of ``model``, score it; the row's record fields."""
    from lowbit.ptq.config import named_format
    from lowbit.ptq.evaluate import evaluate
    from lowbit.ptq.weights import quantize_weights
    from lowbit.quant import Channel, Group, Quantizer

    label, wfmt, group, method, afmt = spec
    out: dict[str, Any] = dict(
        library="lowbit", row=label, weights=wfmt, group_size=group, method=method, activations=afmt
    )
    weights = Quantizer(format=named_format(wfmt), granularity=Channel() if group is None else Group(size=group))
    acts = None if afmt is None else Quantizer(format=named_format(afmt))
    why_not = "activations are quantized (packing is weight-only)" if afmt is not None else None
    if why_not is None and not pack:
        why_not = "--no-pack"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head's "stays float": its row says so
        qmodel, rows = quantize_weights(
            model, batches, weights=weights, method=method, activations=acts, pack=why_not is None
        )
    out["time_s"] = time.perf_counter() - t0
    loss = evaluate(qmodel, x_test, y_test)["loss"]
    out.update(_scores(loss, float_loss))
    out["mean_error"] = _mean_error(rows)
    out["ops"] = [{k: r.get(k) for k in ("name", "method", "error", "rtn_error", "reason")} for r in rows]
    out["float_ops"] = [r["name"] for r in rows if r.get("method") == "float"]
    if why_not is None:
        from lowbit.nn import packed

        mem = packed.memory(qmodel)
        out["memory"] = dict(mem, packed_ratio=mem["packed_bytes"] / max(mem["packed_float32_bytes"], 1))
    else:
        out["memory"] = None
        out["memory_reason"] = why_not
    return out


def _scores(loss: float, float_loss: float) -> dict[str, float]:
    return dict(
        test_loss=loss,
        bits_per_byte=loss / math.log(2),
        bits_per_byte_increase=(loss - float_loss) / math.log(2),
    )


# ----- qwix (child process) -------------------------------------------------------------------------------------
def qwix_worker(npz_path: str, out_path: str) -> None:
    """Run the qwix rows on the model and windows in ``npz_path``; write their records to ``out_path``."""
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix
    from flax import nnx
    from qwix._src.core import qarray
    from qwix._src.providers import ptq as qptq
    from qwix._src.utils import flax_util
    from qwix.contrib import awq, gptq
    from qwix.contrib import smooth_quant as sq

    from lowbit.nn import intercept, models
    from lowbit.ptq.evaluate import evaluate
    from lowbit.ptq.restore import BUILT_IN

    data = np.load(npz_path, allow_pickle=False)
    meta = json.loads(str(data["meta"]))
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    model = models.factory(BUILT_IN[meta["type"]])(**config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    flat = {"/".join(map(str, k)) for k in flax.traverse_util.flatten_dict(pure)}
    missing = set(flat) - {k[len("param:") :] for k in data.files if k.startswith("param:")}
    if missing:
        raise ValueError(f"qwix worker: parameters missing from {npz_path}: {sorted(missing)}")
    pure = flax.traverse_util.unflatten_dict(
        {tuple(_key(p) for p in k.split("/")): jnp.asarray(data["param:" + k]) for k in flat}
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    model.eval()
    batches = [
        jnp.asarray(data["calib"][i : i + meta["batch_size"]]) for i in range(0, len(data["calib"]), meta["batch_size"])
    ]
    x_test, y_test = data["x_test"], data["y_test"]
    x0 = batches[0]
    float_loss = evaluate(model, x_test, y_test)["loss"]

    def at(m, path):
        for p in path:
            m = m[p] if isinstance(p, int) else getattr(m, p)
        return m

    def calibrate(provider) -> Any:
        cal = qwix.quantize_model(model, provider, x0)  # its own first call collects nothing
        for b in batches:
            cal(b)
        return nnx.to_pure_dict(nnx.state(cal, flax_util.QuantStat))

    def abstract(rules) -> tuple[Any, dict, dict]:
        """``(PtqProvider model, float kernels, their WithAux)`` of the ops the rules quantize, as nested dicts."""
        mp = qwix.quantize_model(model, qptq.PtqProvider(rules), x0)
        abs_w, params = {}, {}
        for path, mod in nnx.iter_modules(mp):
            if isinstance(getattr(mod, "kernel", None), qptq.WithAux):
                abs_w[(*path, "kernel")] = mod.kernel
                params[(*path, "kernel")] = at(model, path).kernel.get_value()
        un = flax.traverse_util.unflatten_dict
        return mp, un(params), un(abs_w)

    def install(m, q):
        leaves = flax.traverse_util.flatten_dict(q, is_leaf=lambda p, v: isinstance(v, qptq.WithAux))
        for path, v in leaves.items():
            setattr(at(m, path[:-1]), path[-1], v)
        return m

    def effective(v) -> jax.Array:
        """The float weight an op computes with (kernel ``(in, out)``, contracting axis 0)."""
        w = qarray.dequantize(v.array)
        if isinstance(v, awq.WithAwqScale):
            return w / v.awq_scale.reshape(-1, 1)
        if isinstance(v, sq.WithSqScale):
            return w * v.inv_sq_scale.reshape(-1, 1)  # (x * inv) @ Q = x @ (inv * Q)
        return w

    def op_errors(m, hessians) -> list[dict]:
        rows = []
        for path, mod in nnx.iter_modules(m):
            v = getattr(mod, "kernel", None)
            if not isinstance(v, qptq.WithAux):
                continue
            name = "/".join(map(str, path))
            w = at(model, path).kernel.get_value().astype(jnp.float32)
            h = hessians.get(name)
            if h is None:
                rows.append(dict(name=name, error=None))
                continue
            d = w - effective(v).astype(jnp.float32)
            num = jnp.trace(d.T @ h @ d)
            den = jnp.trace(w.T @ h @ w)
            rows.append(dict(name=name, error=float(num / den)))
        return rows

    def nominal_memory(m) -> dict:
        """Quantized kernels' bytes at their nominal width (qwix keeps int4 codes a byte each in memory)."""
        f32 = now = 0
        for _, mod in nnx.iter_modules(m):
            v = getattr(mod, "kernel", None)
            if not isinstance(v, qptq.WithAux):
                continue
            qv = v.array.qvalue
            f32 += qv.size * 4
            now += math.ceil(qv.size * jnp.iinfo(qv.dtype).bits / 8) + v.array.scale.size * v.array.scale.dtype.itemsize
            for extra in ("awq_scale", "inv_sq_scale"):
                if hasattr(v, extra):
                    now += getattr(v, extra).size * 4
        total = sum(v.get_value().size * 4 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        return dict(
            packed_float32_bytes=f32,
            packed_bytes=now,
            packed_ratio=now / max(f32, 1),
            float32_bytes=total,
            bytes=total - f32 + now,
            ratio=(total - f32 + now) / max(total, 1),
            nominal=True,
        )

    class SqInt8Acts(sq.SqInferenceProvider):
        """qwix SmoothQuant whose scaled inputs are then quantized by ``PtqProvider`` (the rule's ``act_qtype``).

        ``SqInferenceProvider`` multiplies an op's input by ``1 / s`` and runs it float against the quantized
        weight; this hands the scaled input and the weight to ``PtqProvider.dot_general`` instead.
        """

        def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
            if isinstance(rhs, sq.WithSqScale):
                lhs = lhs * rhs.inv_sq_scale
                rhs = qptq.WithAux(array=rhs.array, how=rhs.how)
            return qptq.PtqProvider.dot_general(self, lhs, rhs, dimension_numbers, precision, preferred_element_type)

    records = []
    g_rules = [gptq.GptqRule(module_path=LINEAR_OPS, weight_qtype=jnp.int4, tile_size=128)]
    calib_s = 0.0  # GPTQ's calibration, shared with the per-op errors: added to the GPTQ row's time
    try:  # float Hessians (GPTQ's statistics) for every row's per-op error
        t0 = time.perf_counter()
        g_stats = calibrate(gptq.GptqCalibrationProvider(g_rules))
        calib_s = time.perf_counter() - t0
        hessians = {
            "/".join(map(str, k[:-1])): v["sum_of_hessian"] / v["count"]
            for k, v in flax.traverse_util.flatten_dict(
                g_stats, is_leaf=lambda p, v: isinstance(v, dict) and "sum_of_hessian" in v
            ).items()
        }
    except Exception as e:
        g_stats, hessians = None, {}
        print(f"qwix GPTQ calibration failed: {_reason(e)}", file=sys.stderr)

    def one(label: str, fn) -> None:
        rec: dict[str, Any] = dict(library="qwix", row=label, weights="int4", group_size=128)
        try:
            t0 = time.perf_counter()
            m, how = fn()
            rec["time_s"] = time.perf_counter() - t0 + (calib_s if fn is gptq_row and g_stats is not None else 0.0)
            rec["how"] = how
            rec.update(_scores(evaluate(m, x_test, y_test)["loss"], float_loss))
            rec["ops"] = op_errors(m, hessians)
            rec["mean_error"] = _mean_error(rec["ops"])
            rec["memory"] = nominal_memory(m)
        except Exception as e:
            rec["failed"] = _reason(e)
            traceback.print_exc()
        records.append(rec)
        print(f"  {label}: {rec.get('bits_per_byte', rec.get('failed'))}", flush=True)

    def rtn():
        return qwix.quantize_model(model, qptq.PtqProvider(g_rules), x0), "PtqProvider(rules)"

    def gptq_row():
        stats = g_stats if g_stats is not None else calibrate(gptq.GptqCalibrationProvider(g_rules))
        mp, params, abs_w = abstract(g_rules)
        return install(mp, gptq.quantize_params(params, abs_w, stats)), (
            "GptqCalibrationProvider -> gptq.quantize_params -> PtqProvider model"
        )

    def awq_row():
        rules = [awq.AwqRule(module_path=LINEAR_OPS, weight_qtype=jnp.int4, tile_size=128)]
        stats = calibrate(awq.AwqCalibrationProvider(rules))
        _, params, abs_w = abstract(rules)
        q = awq.quantize_params(params, abs_w, stats)
        return install(qwix.quantize_model(model, awq.AwqInferenceProvider(rules), x0), q), (
            "AwqCalibrationProvider -> awq.quantize_params -> AwqInferenceProvider model"
        )

    def sq_row(acts: bool):
        rules = [sq.SqRule(module_path=LINEAR_OPS, weight_qtype=jnp.int4, act_qtype=jnp.int8, tile_size=128)]
        stats = calibrate(sq.SqCalibrationProvider(rules))
        _, params, abs_w = abstract(rules)
        q = sq.quantize_params(params, abs_w, stats)
        provider = SqInt8Acts(rules) if acts else sq.SqInferenceProvider(rules)
        return install(qwix.quantize_model(model, provider, x0), q), (
            "SqCalibrationProvider -> smooth_quant.quantize_params -> "
            + (
                "SqInferenceProvider subclass quantizing the scaled input (PtqProvider)"
                if acts
                else "SqInferenceProvider"
            )
        )

    wanted = re.compile(meta["rows"]) if meta.get("rows") else None
    for label, fn in zip(QWIX_ROWS, [rtn, gptq_row, awq_row, lambda: sq_row(False), lambda: sq_row(True)], strict=True):
        if wanted is None or wanted.search(label):
            one(label, fn)
    for rec in records:
        rec["float_bits_per_byte_child"] = float_loss / math.log(2)
        rec["lowbit_hooks_installed"] = bool(intercept._INSTALLED[0])
        rec["qwix_version"] = qwix.__version__
    Path(out_path).write_text(json.dumps(records))


def _key(p: str) -> Any:
    return int(p) if p.isdigit() else p


def run_qwix(model, meta: dict, calib, x_test, y_test, batch_size: int, rows: str | None) -> list[dict]:
    """The qwix rows, from a child process (module docstring); failed rows carry ``failed``."""
    import flax
    import numpy as np
    from flax import nnx

    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {"/".join(map(str, k)): v for k, v in flax.traverse_util.flatten_dict(pure).items()}
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "model.npz", Path(tmp) / "qwix.json"
        info = dict(type=meta["model"]["type"], config=meta["model"]["config"], batch_size=batch_size, rows=rows)
        np.savez(
            npz,
            meta=json.dumps(info),
            calib=np.asarray(calib),
            x_test=np.asarray(x_test),
            y_test=np.asarray(y_test),
            **{"param:" + k: np.asarray(v) for k, v in flat.items()},
        )
        proc = subprocess.run([sys.executable, __file__, "--qwix-worker", str(npz), str(out)], text=True)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        why = f"qwix worker exited with status {proc.returncode}"
    wanted = re.compile(rows) if rows else None
    return [dict(library="qwix", row=r, failed=why) for r in QWIX_ROWS if wanted is None or wanted.search(r)]


# ----- report ---------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(records: list[dict], header: dict) -> str:
    order = {r: i for i, r in enumerate(ORDER)}
    records = sorted(records, key=lambda r: order.get(r["row"], len(order)))
    lines = [
        "# bench_lm_ptq: language-model PTQ, lowbit and qwix",
        "",
        f"Checkpoint `{header['checkpoint']}` ({header['model']}); float **{header['float_bits_per_byte']:.4f} "
        f"bits/byte** on the held-out split ({header['test_windows']} windows of {header['context']} bytes). "
        f"Calibration: {header['samples']} training windows (seed {header['seed']}, batches of "
        f"{header['batch_size']}). lowbit {header['commit']}, qwix {header['qwix']}; load {header['load']} "
        f"({header['cpu']}, {header['cores']} cores); {header['date']}; `{header['command']}`.",
        "",
        "| library | setting | bits/byte | drop (bits/byte) | mean per-op rel. error | time (s) "
        "| quantized weights / f32 | all params / f32 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        mem = r.get("memory") or {}
        packed = _fmt(mem.get("packed_ratio"), ".3f") if mem else "n/a"
        if mem.get("nominal"):
            packed += " (nominal)"
        whole = (
            _fmt(mem.get("ratio"), ".3f")
            if mem.get("ratio") is not None
            else ("1.000" if r["row"] == "fp32" else "n/a")
        )
        if r["row"] == "fp32":
            packed = "1.000"
        notes = r.get("failed") or ""
        if not notes and r.get("float_ops"):
            notes = "float: " + ", ".join(f"`{n}`" for n in r["float_ops"])
        if r.get("commit") and r["commit"] != header["commit"]:
            notes = (notes + "; " if notes else "") + f"from {r['commit']}"
        lines.append(
            f"| {r['library']} | {r['row'].removeprefix('qwix ')} | {_fmt(r.get('bits_per_byte'), '.4f')} "
            f"| {_fmt(r.get('bits_per_byte_increase'), '+.4f')} | {_fmt(r.get('mean_error'), '.2e')} "
            f"| {_fmt(r.get('time_s'), '.1f')} | {packed} | {whole} | {notes} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- gN: one scale per N inputs of each output channel (qwix: `tile_size=N` on the contraction axis). "
        "W8A8: int8 per-channel weights, dynamic int8 per-tensor activations. lowbit's activations (A8) are "
        "dynamic per tensor on every quantized op's input.",
        "- Quantized ops: the LM's qkv, proj, mlp_in and mlp_out layers in both libraries. The tied head "
        "(`x @ embedding.T`) and the attention products stay float in both (lowbit: the head's weight is a "
        "transpose, no parameter to replace; qwix: its rules match the Linear layers only).",
        "- lowbit SmoothQuant: smoothing scales (alpha 0.5), then RTN of the scaled weights; SmoothQuant + GPTQ: "
        "the same scales, then GPTQ of the scaled weights on the scaled inputs' Hessian H / (s sᵀ) (the W4A8 "
        "recipe of the SmoothQuant paper). A16 SmoothQuant folds 1/s back into the weight.",
        "- lowbit GPTQ / AWQ are sequential (each op's statistics after the ops before it were quantized); "
        "qwix calibrates every op on the float model in one pass.",
        "- qwix SmoothQuant A16: `SqInferenceProvider` scales each input by 1/s and does not quantize it "
        "(`act_qtype=int8` only sizes the smoothing scales), so it compares with lowbit's W4A16 SmoothQuant. "
        "qwix SmoothQuant A8: the same weights, the scaled input then quantized by `PtqProvider` (dynamic int8, "
        "per token and per 128-input tile: finer than lowbit's per tensor); the subclass doing this is in this "
        "script, not in qwix.",
        "- Mean per-op rel. error: `||x w - x ŵ||² / ||x w||²` averaged over the quantized ops, on the "
        "calibration inputs. lowbit: as they reached each op (after the earlier ops were quantized, for the "
        "sequential methods); qwix: float inputs (the Hessians of its GPTQ calibration).",
        "- Memory: lowbit packs weight-only rows (`quantize_weights(pack=True)`, `lowbit.nn.packed.memory`): "
        "quantized weights' bytes (codes + scales) over their float32 bytes, and all parameters over float32 "
        "(the float embedding, norms and biases included). qwix: nominal, codes at their bit width plus scales "
        "(qwix keeps int4 codes one per byte in memory). n/a: not packed (activation-quantized rows, or "
        "--no-pack).",
        "- qwix runs in a child process (module docstring): lowbit's op hooks, installed by `lowbit.quantize`, "
        "hide `nnx.Linear`'s products from qwix's interception in the same process.",
        "- time: quantization (calibration included), not scoring, on a shared machine (load above); a row "
        "that is the first to use a method includes its compilation (lowbit's W4A16 GPTQ, not W4A8 GPTQ). qwix's "
        "`gptq_core.quantize_weight` loops over columns in Python, op by op without `jit`: its GPTQ time is "
        "dispatch-bound here.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a `lowbit train --model lm --dataset text` checkpoint or run directory")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    ap.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="which training windows calibrate (default 0)")
    ap.add_argument("--data-dir", help="the text corpus the model was trained on (default: the standard library's)")
    ap.add_argument("--out", default=str(RESULTS / "bench_lm_ptq"), help="output stem: <out>.jsonl, <out>.md")
    ap.add_argument("--rows", help="regex: only the rows whose label it matches (re.search), e.g. 'W4A16'")
    ap.add_argument("--no-qwix", action="store_true", help="lowbit rows only")
    ap.add_argument("--no-pack", action="store_true", help="do not pack the weight-only rows")
    ap.add_argument("--qwix-worker", nargs=2, metavar=("NPZ", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.qwix_worker:
        qwix_worker(*args.qwix_worker)
        return
    if not args.checkpoint:
        ap.error("--checkpoint is required")

    from lowbit import data
    from lowbit.ptq.evaluate import evaluate
    from lowbit.ptq.restore import find_checkpoint, load_model
    from lowbit.ptq.run import calibration_images

    info = _timing.machine_info()
    commit = lowbit_commit()
    try:
        import qwix

        qwix_version = qwix.__version__
    except ImportError:
        qwix_version = None
    ckpt = find_checkpoint(args.checkpoint).resolve()
    model, meta = load_model(ckpt)
    cfg = meta["model"]["config"]
    dataset = data.load("text", args.data_dir, context=cfg["context"])
    calib = calibration_images(dataset, args.samples, args.seed)
    batches = [calib[i : i + args.batch_size] for i in range(0, len(calib), args.batch_size)]
    float_loss = evaluate(model, dataset.x_test, dataset.y_test)["loss"]
    key = dict(checkpoint=str(ckpt), samples=len(calib), seed=args.seed, batch_size=args.batch_size)
    base = dict(key, lowbit_commit=commit, command=info["command"], xla_flags=info["xla_flags"], qwix=qwix_version)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jsonl = stem.with_suffix(".jsonl")
    wanted = re.compile(args.rows) if args.rows else None
    print(f"float: {float_loss / math.log(2):.4f} bits/byte; {len(calib)} calibration windows", flush=True)

    def save(rec: dict) -> None:
        rec = dict(base, **rec, float_bits_per_byte=float_loss / math.log(2))
        rec.update(load_average=_timing.load_average(), date=_timing.machine_info()["date"])
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    for spec in LOWBIT_ROWS:
        label = spec[0]
        if wanted is not None and not wanted.search(label):
            continue
        if label == "fp32":
            mem = None
            if not args.no_pack:
                from lowbit.nn import packed

                mem = packed.memory(model)
            rec = dict(library="lowbit", row="fp32", time_s=None, mean_error=None, memory=mem)
            rec.update(_scores(float_loss, float_loss))
        else:
            try:
                rec = run_lowbit(model, batches, dataset.x_test, dataset.y_test, spec, float_loss, not args.no_pack)
            except Exception as e:
                traceback.print_exc()
                rec = dict(library="lowbit", row=label, failed=_reason(e))
        print(f"  {label}: {rec.get('bits_per_byte', rec.get('failed'))}", flush=True)
        save(rec)
    if not args.no_qwix:
        if qwix_version is None:
            recs = [
                dict(library="qwix", row=r, failed="ImportError: qwix is not installed (the [peers] extra)")
                for r in QWIX_ROWS
            ]
        else:
            recs = run_qwix(model, meta, calib, dataset.x_test, dataset.y_test, args.batch_size, args.rows)
        for rec in recs:
            save(rec)

    same = [
        r
        for r in (json.loads(line) for line in jsonl.read_text().splitlines() if line.strip())
        if all(r.get(k) == v for k, v in key.items())
    ]
    newest = {r["row"]: dict(r, commit=r.get("lowbit_commit")) for r in same}
    header = dict(
        info,
        **key,
        model=f"{meta['model']['type']} "
        + ", ".join(f"{k} {v}" for k, v in cfg.items() if k in ("dim", "depth", "context")),
        float_bits_per_byte=float_loss / math.log(2),
        test_windows=len(dataset.x_test),
        context=cfg["context"],
        commit=commit,
        qwix=qwix_version or "not installed",
        load=_timing.load_average(),
    )
    text = table(list(newest.values()), header)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {stem.with_suffix('.md')} ({len(newest)} rows), appended to {jsonl}")


if __name__ == "__main__":
    main()
