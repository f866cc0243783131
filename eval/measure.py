"""Measured cost: ONNX Runtime latency (prefill and per-token decode with KV cache), tokens/s at several batch
sizes (torch CPU and ONNX Runtime CPU), and process memory.

Warm-up runs are discarded; each figure is the median over `repetitions` with min and max beside it, and the
backend, device (machine) and thread count are recorded with it. Models or graphs measured together are
interleaved repetition by repetition, so machine noise hits all of them alike.
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


def _one_rep(sess, outs, past_names, prompt, decode_tokens) -> tuple[float, list[float]]:
    """One prefill of `prompt` (B, L) + `decode_tokens` greedy decode steps; -> (prefill ms, decode-step ms)."""
    batch, prompt_len = prompt.shape
    feeds = {"input_ids": prompt, "attention_mask": np.ones((batch, prompt_len), np.int64),
             **empty_past(sess, batch)}
    t0 = time.perf_counter()
    res = dict(zip(outs, sess.run(None, feeds)))
    prefill = (time.perf_counter() - t0) * 1e3
    total, steps = prompt_len, []
    nxt = res["logits"][:, -1:].argmax(-1).astype(np.int64)
    for _ in range(decode_tokens):
        total += 1
        feeds = {"input_ids": nxt, "attention_mask": np.ones((batch, total), np.int64)}
        feeds.update({n: res[n.replace("past_key_values", "present")] for n in past_names})
        s0 = time.perf_counter()
        res = dict(zip(outs, sess.run(None, feeds)))
        steps.append((time.perf_counter() - s0) * 1e3)
        nxt = res["logits"][:, -1:].argmax(-1).astype(np.int64)
    return prefill, steps


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
                times[name][1].append(statistics.median(d))
    out = {}
    for name, (prefill, decode) in times.items():
        d = _stats(decode)
        out[name] = {"backend": "onnxruntime", "device": device(),
                     "threads": threads or "default", "batch": 1, "prompt_len": prompt_len,
                     "decode_tokens": decode_tokens, "repetitions": repetitions, "interleaved_with": sorted(paths),
                     "latency_ms_prefill": _stats(prefill), "latency_ms_decode": d, "tokens_per_s": 1000.0 / d["median"]}
    return out


def device() -> str:
    """The machine a CPU figure was measured on: architecture, CPU model and core count."""
    import os

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu ({platform.processor() or platform.machine()}{', ' + model if model else ''}, {os.cpu_count()} cores)"


def _rates(batch: int, tokens: int, ms: list[float]) -> dict:
    """tokens/s of each repetition (batch x tokens over its time) -> median, min, max, n."""
    return _stats([batch * tokens / (t / 1e3) for t in ms])


def _header(backend: str, threads, prompt_len: int, decode_tokens: int | None, repetitions: int, warmup: int) -> dict:
    return {"backend": backend, "device": device(), "threads": threads or "default", "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "repetitions": repetitions, "warmup": warmup, "points": []}


def torch_throughput(models: dict, batch_sizes: list[int], prompt_len: int, decode_tokens: int, repetitions: int,
                     warmup: int, threads: int | None = None, vocab_size: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Causal LMs in torch on the CPU: per batch size B, prefill tokens/s (B x prompt_len over the prefill) and
    decode tokens/s (B x decode_tokens over the greedy decode steps with KV cache). -> {name: measurement}."""
    import torch

    out = {name: _header("torch", threads, prompt_len, decode_tokens, repetitions, warmup) for name in models}
    with _torch_threads(threads), torch.inference_mode():
        for b in batch_sizes:
            prompt = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab_size, size=(b, prompt_len)))
            times = {name: ([], []) for name in models}
            for rep in range(warmup + repetitions):
                for name, model in models.items():
                    key = _cache_kwarg(model)
                    t0 = time.perf_counter()
                    res = model(input_ids=prompt, use_cache=True)
                    t1 = time.perf_counter()
                    for _ in range(decode_tokens):
                        res = model(input_ids=res.logits[:, -1:].argmax(-1), use_cache=True, **{key: res[key]})
                    t2 = time.perf_counter()
                    if rep >= warmup:
                        times[name][0].append((t1 - t0) * 1e3)
                        times[name][1].append((t2 - t1) * 1e3)
            for name, (pre, dec) in times.items():
                out[name]["points"].append({"batch": b, "prefill_tokens_per_s": _rates(b, prompt_len, pre),
                                            "decode_tokens_per_s": _rates(b, decode_tokens, dec)})
    return out


def _cache_kwarg(model) -> str:
    """The KV cache's name in a causal LM's forward and output: `cache` (transformers 5), else past_key_values."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def torch_encoder_throughput(models: dict, batch_sizes: list[int], seq_len: int, repetitions: int, warmup: int,
                             threads: int | None = None, vocab_size: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Encoders in torch on the CPU: tokens/s of one forward pass over B sequences of seq_len tokens."""
    import torch

    out = {name: _header("torch", threads, seq_len, None, repetitions, warmup) for name in models}
    with _torch_threads(threads), torch.inference_mode():
        for b in batch_sizes:
            ids = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab_size, size=(b, seq_len)))
            times: dict[str, list[float]] = {name: [] for name in models}
            for rep in range(warmup + repetitions):
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                    if rep >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            for name, t in times.items():
                out[name]["points"].append({"batch": b, "forward_tokens_per_s": _rates(b, seq_len, t)})
    return out


def ort_throughput(path: str, batch_sizes: list[int], prompt_len: int, decode_tokens: int, repetitions: int,
                   warmup: int, threads: int | None = None, vocab_size: int = 1000, seed: int = 0) -> dict:
    """An exported KV-cache graph in ONNX Runtime on the CPU: prefill and decode tokens/s per batch size."""
    sess = _session(path, threads)
    outs = [o.name for o in sess.get_outputs()]
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    out = _header("onnxruntime", threads, prompt_len, decode_tokens, repetitions, warmup)
    out["graph"] = path.rsplit("/", 2)[-2] if "/" in path else path
    for b in batch_sizes:
        prompt = np.random.default_rng(seed).integers(0, vocab_size, size=(b, prompt_len), dtype=np.int64)
        pre, dec = [], []
        for rep in range(warmup + repetitions):
            p, steps = _one_rep(sess, outs, past_names, prompt, decode_tokens)
            if rep >= warmup:
                pre.append(p)
                dec.append(sum(steps))
        out["points"].append({"batch": b, "prefill_tokens_per_s": _rates(b, prompt_len, pre),
                              "decode_tokens_per_s": _rates(b, decode_tokens, dec)})
    return out


class _torch_threads:
    """Run with `threads` torch intra-op threads (default: torch's own), restoring the previous count."""

    def __init__(self, threads: int | None):
        self.threads, self.before = threads, None

    def __enter__(self):
        import torch

        if self.threads:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        import torch

        if self.before is not None:
            torch.set_num_threads(self.before)
