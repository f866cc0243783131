"""Measured cost: ONNX Runtime latency (prefill and per-token decode with KV cache) and process memory.

Warm-up runs are discarded; each figure is the median over `repetitions` with min and max beside it, and the
backend, device and thread count are recorded with it.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _session(path: str, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache inputs shaped from the graph's own input metadata."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            _, heads, _, dim = i.shape
            feeds[i.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return feeds


def _one_rep(sess, outs, past_names, prompt, decode_tokens) -> tuple[float, float]:
    """One prefill + `decode_tokens` greedy decode steps; -> (prefill ms, median decode-step ms)."""
    prompt_len = prompt.shape[1]
    feeds = {"input_ids": prompt, "attention_mask": np.ones((1, prompt_len), np.int64), **empty_past(sess, 1)}
    t0 = time.perf_counter()
    res = dict(zip(outs, sess.run(None, feeds)))
    prefill = (time.perf_counter() - t0) * 1e3
    total, steps = prompt_len, []
    nxt = res["logits"][:, -1:].argmax(-1).astype(np.int64)
    for _ in range(decode_tokens):
        total += 1
        feeds = {"input_ids": nxt, "attention_mask": np.ones((1, total), np.int64)}
        feeds.update({n: res[n.replace("past_key_values", "present")] for n in past_names})
        s0 = time.perf_counter()
        res = dict(zip(outs, sess.run(None, feeds)))
        steps.append((time.perf_counter() - s0) * 1e3)
        nxt = res["logits"][:, -1:].argmax(-1).astype(np.int64)
    return prefill, statistics.median(steps)


def ort_latency(paths: dict[str, str], prompt_len: int, decode_tokens: int, repetitions: int, warmup: int,
                threads: int | None = None, vocab_size: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Batch-1 prefill latency for `prompt_len` tokens and per-token decode latency of each graph in `paths`
    (name -> file). Repetitions are interleaved across the graphs, so machine noise hits all of them alike."""
    sessions = {}
    for name, path in paths.items():
        sess = _session(path, threads)
        sessions[name] = (sess, [o.name for o in sess.get_outputs()],
                          [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")])
    prompt = np.random.default_rng(seed).integers(0, vocab_size, size=(1, prompt_len), dtype=np.int64)
    times = {name: ([], []) for name in paths}
    for rep in range(warmup + repetitions):
        for name, (sess, outs, past_names) in sessions.items():
            p, d = _one_rep(sess, outs, past_names, prompt, decode_tokens)
            if rep >= warmup:
                times[name][0].append(p)
                times[name][1].append(d)
    out = {}
    for name, (prefill, decode) in times.items():
        d = _stats(decode)
        out[name] = {"backend": "onnxruntime", "device": f"cpu ({platform.processor() or platform.machine()})",
                     "threads": threads or "default", "batch": 1, "prompt_len": prompt_len,
                     "decode_tokens": decode_tokens, "repetitions": repetitions, "interleaved_with": sorted(paths),
                     "latency_ms_prefill": _stats(prefill), "latency_ms_decode": d, "tokens_per_s": 1000.0 / d["median"]}
    return out
