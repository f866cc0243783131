"""Modeled cost on a GPU target: a roofline over bytes moved and FLOPs (see TARGETS.md). Every figure here is
*modeled*, not measured, and is labeled so in reports.

Decode step time at batch B, context S:
  t = max(bytes / (bandwidth * BW_EFF), flops / (peak * FLOP_EFF))
  bytes = serving weight bytes + B * S * kv_bytes_per_token;  flops = 2 * params * B
Weight-only formats (int8/int4 weights, 16-bit activations) compute at the BF16 rate; FP8 at the FP8 rate.
2:4-sparse layers (config.compressor_sparsity, from the prune pass) are served compressed, as sparse tensor cores
store them: half the values plus a 2-bit index per kept value, and half the FLOPs. That is the paper 2x; TARGETS.md
quotes 1.3-1.6x measured end to end. Unstructured sparsity is served dense (no modeled gain).

A run's modeled cost (model_cost) and `compress estimate` share the split of the served tensors (`traffic`):
the input embedding is a lookup, not a matmul: no FLOPs, and a run's decode step reads only the B rows its
tokens select (a tied embedding is the lm_head too, read whole); MoE experts compute top_k of E per token and
a batch reads the experts it hits under uniform routing, E x (1 - (1 - k/E)^B).
"""

from __future__ import annotations

from compressor.targets import TargetSpec

BW_EFF = 0.6  # tuned runtimes reach ~55-60% of peak bandwidth at batch 1 (TARGETS.md)
FLOP_EFF = 0.6


def serving_weight_bytes(model) -> tuple[int, int, str]:
    """(bytes as served, parameters, compute precision). Float weights are served in BF16; packed codes,
    scales and zero points as stored."""
    t = served_model(model)
    return t["dense_bytes"] + t["expert_bytes"], t["dense_params"] + t["expert_params"], t["precision"]


def served_model(model) -> dict:
    """The served tensors of a loaded model, split as `served_tensors` splits a meta model: dense / expert bytes
    and parameters, the input embedding (a lookup unless tied), experts and top_k, and the compute precision."""
    from compressor.checkpoint_io import unique_state_dict
    from compressor.kernels.qlinear import QuantLinear

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sparse = {n for n, pat in (getattr(model.config, "compressor_sparsity", None) or {}).items() if pat == "2:4"}
    out = _empty_split(model)
    emb = model.get_input_embeddings()
    emb_key = (emb.weight.untyped_storage().data_ptr(), tuple(emb.weight.shape)) if emb is not None else None
    for k, t in unique_state_dict(model).items():
        owner, _, leaf = k.rpartition(".")
        q = qmods.get(owner)
        if q is not None and leaf == "weight_packed":
            nbytes, n = t.numel() * t.element_size(), q.in_features * q.out_features
        elif q is not None and leaf in ("weight_scale", "weight_zero_point"):
            nbytes, n = t.numel() * t.element_size(), 0  # scales: bytes, not parameters
        else:
            nbytes, n = t.numel() * (2 if t.is_floating_point() else t.element_size()), t.numel()
        if owner in sparse and leaf in ("weight", "weight_packed"):
            nbytes, n = nbytes // 2 + n // 8, n // 2  # kept half + 2-bit indices; sparse tensor cores skip half
        if emb_key and (t.untyped_storage().data_ptr(), tuple(t.shape)) == emb_key and not out["tied"]:
            out["embedding_params"], out["embedding_bytes"] = n, nbytes
        _add(out, ".experts." in f".{k}", nbytes, n)
    # Weight-only schemes dequantize to 16-bit before the GEMM, so they compute at the BF16 rate. When every
    # quantized layer also quantizes its activations, the GEMMs run at that precision (W8A8 INT8/FP8, W4A8 at
    # the FP8 rate, NVFP4 at the FP4 rate).
    acts = {(m.activations or {}).get("format") for m in qmods.values()}
    out["precision"] = {"int8": "int8", "fp8": "fp8", "nvfp4": "fp4"}.get(acts.pop(), "bf16") if len(acts) == 1 \
        else "bf16"
    return out


def _empty_split(model) -> dict:
    cfg = model.config
    experts = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
    emb = model.get_input_embeddings()
    return {"dense_bytes": 0.0, "expert_bytes": 0.0, "dense_params": 0, "expert_params": 0, "embedding_params": 0,
            "embedding_bytes": 0.0, "embedding_rows": int(emb.weight.shape[0]) if emb is not None else 0,
            "tied": bool(getattr(cfg, "tie_word_embeddings", False)), "experts": experts,
            "top_k": int(getattr(cfg, "num_experts_per_tok", 0) or 0) if experts else 0}


def _add(out: dict, is_expert: bool, nbytes: float, n: int) -> None:
    key = "expert" if is_expert else "dense"
    out[f"{key}_bytes"] += nbytes
    out[f"{key}_params"] += n


def traffic(t: dict, batch: int, embedding_rows: int | None = None) -> tuple[float, float]:
    """(weight bytes a forward step over `batch` tokens reads, parameters each token computes with) of a split
    (served_model / served_tensors). MoE: top_k of E experts compute, the experts a batch hits are read.
    `embedding_rows`: the untied input embedding is read for that many rows only (None: read whole)."""
    moe = t["experts"] > 0 and t["top_k"] > 0 and t["expert_params"] > 0
    hit = 1 - (1 - t["top_k"] / t["experts"]) ** batch if moe else 1.0
    dense = t["dense_bytes"]
    if embedding_rows is not None and t["embedding_params"]:
        dense -= t["embedding_bytes"] * (1 - min(embedding_rows, t["embedding_rows"]) / t["embedding_rows"])
    active = t["dense_params"] - t["embedding_params"] + (
        t["expert_params"] * t["top_k"] / t["experts"] if moe else t["expert_params"])
    return dense + t["expert_bytes"] * hit, active


def kv_bytes_per_token(config, kv_bytes: int = 2) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * kv_bytes


def decode(target: TargetSpec, weight_bytes: int, params: int, kv_per_token: int, precision: str,
           batch: int, context: int, usd_per_hour: float | None = None, resident_bytes: float | None = None) -> dict:
    """One decode step of `batch` sequences at `context`: weight_bytes read, params computed per token;
    memory holds resident_bytes of weights (default: weight_bytes) and the KV cache."""
    bytes_moved = weight_bytes + batch * context * kv_per_token
    peak = target.peak_flops.get(precision) or target.peak_flops["bf16"]
    t_mem = bytes_moved / (target.bandwidth_bytes_per_s * BW_EFF)
    t_cmp = 2 * params * batch / (peak * FLOP_EFF)
    t = max(t_mem, t_cmp)
    tps = batch / t
    price = usd_per_hour if usd_per_hour is not None else target.usd_per_hour
    memory = (weight_bytes if resident_bytes is None else resident_bytes) + batch * context * kv_per_token
    return {"batch": batch, "context": context, "tokens_per_s": tps, "latency_ms_decode": t * 1e3,
            "bound": "memory" if t_mem >= t_cmp else "compute", "memory_gb": memory / 1e9,
            "fits": memory <= target.memory_bytes,
            "usd_per_mtok": (price / (tps * 3600) * 1e6) if price else None, "usd_per_hour": price}


def model_cost(target: TargetSpec, model, batch_sizes: list[int], context: int,
               usd_per_hour: float | None = None) -> dict:
    """MODELED cost of a loaded (compressed) model on `target`: decode at `context` per batch size, prefill of
    `context` tokens, crossover batch. Bytes and FLOPs through `traffic` (embedding rows, MoE active experts)."""
    t = served_model(model)
    wb, precision = t["dense_bytes"] + t["expert_bytes"], t["precision"]
    kv_fp8 = bool(getattr(model.config, "compressor_kv_cache", None))
    kv = kv_bytes_per_token(model.config, 1 if kv_fp8 else 2)
    sparse = sum(p == "2:4" for p in (getattr(model.config, "compressor_sparsity", None) or {}).values())
    points = []
    for b in batch_sizes:
        read, active = traffic(t, b, embedding_rows=b)  # one new token per sequence and step
        points.append(decode(target, read, active, kv, precision, b, context, usd_per_hour, resident_bytes=wb))
    full, active = traffic(t, 1 << 30, embedding_rows=0)  # every expert read: the large-batch limit
    pf_read, _ = traffic(t, context, embedding_rows=context)
    moe = t["experts"] > 0 and t["top_k"] > 0 and t["expert_params"] > 0
    return {"modeled": True, "target": target.name, "precision": precision, "weight_bytes": wb,
            "parameters": t["dense_params"] + t["expert_params"], "active_parameters": active,
            "embedding": {"lookup_parameters": t["embedding_params"], "bytes": t["embedding_bytes"],
                          "counted": "rows read per step only (a lookup, no FLOPs)" if t["embedding_params"]
                          else "tied with the lm_head: read whole"},
            "moe": {"experts": t["experts"], "top_k": t["top_k"], "expert_params": t["expert_params"],
                    "experts_read": [1 - (1 - t["top_k"] / t["experts"]) ** b for b in batch_sizes]}
            if moe else None,
            "sparse_2of4_layers": sparse,
            "kv_cache": "fp8" if kv_fp8 else "bf16",
            "bandwidth_efficiency": BW_EFF, "flop_efficiency": FLOP_EFF,
            "price": price_of(target, usd_per_hour),
            "crossover_batch": {"weights_only": crossover_batch(target, full, active, 0, precision, 0),
                                f"context_{context}": crossover_batch(target, full, active, kv, precision, context)},
            "prefill": prefill(target, pf_read, active, precision, context, 1, attention_dim(model.config),
                               model.config.num_hidden_layers, kv),
            "points": points}


# ---------------------------------------------------------------------------------------------------------
# Crossover, prefill, price; the estimate of a bare config (compress estimate). All MODELED.


def price_of(target: TargetSpec, usd_per_hour: float | None) -> dict:
    """The price used for $/Mtok and where it came from."""
    from compressor.targets import PRICE_DATE

    if usd_per_hour is not None:
        return {"usd_per_hour": usd_per_hour, "source": "recipe/command line"}
    return {"usd_per_hour": target.usd_per_hour, "source": f"default for {target.name}, {PRICE_DATE}"}


def crossover_batch(target: TargetSpec, weight_bytes: float, params: float, kv_per_token: int, precision: str,
                    context: int) -> float | None:
    """Batch B* where a decode step's compute time reaches its memory time (decode() turns compute-bound).

    memory: (W + B S kv) / bw_eff;  compute: 2 P B / peak_eff  ->  B* = (W / bw_eff) / (2 P / peak_eff - S kv / bw_eff).
    None when the KV cache read grows as fast as compute (long contexts): decode stays memory-bound at any batch.
    Weights only (S = 0) this is TARGETS.md's peak x bytes-per-weight / (2 x bandwidth)."""
    bw = target.bandwidth_bytes_per_s * BW_EFF
    fl = (target.peak_flops.get(precision) or target.peak_flops["bf16"]) * FLOP_EFF
    denom = 2 * params / fl - context * kv_per_token / bw
    return (weight_bytes / bw) / denom if denom > 0 else None


def attention_dim(config) -> int:
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def prefill(target: TargetSpec, weight_bytes: float, params: float, precision: str, prompt_len: int, batch: int = 1,
            attn_dim: int = 0, layers: int = 0, kv_per_token: int = 0) -> dict:
    """Prefill of `batch` prompts of `prompt_len` tokens (time to first token). Mostly compute-bound:
    flops = 2 P B n + causal attention 2 B n^2 d per layer (QK^T and AV over the lower triangle);
    bytes = weights read once + the KV cache written."""
    tokens = batch * prompt_len
    flops = 2 * params * tokens + 2 * layers * batch * prompt_len ** 2 * attn_dim
    peak = target.peak_flops.get(precision) or target.peak_flops["bf16"]
    t_cmp = flops / (peak * FLOP_EFF)
    t_mem = (weight_bytes + tokens * kv_per_token) / (target.bandwidth_bytes_per_s * BW_EFF)
    t = max(t_cmp, t_mem)
    return {"batch": batch, "prompt_len": prompt_len, "latency_ms_prefill": t * 1e3, "tokens_per_s": tokens / t,
            "bound": "compute" if t_cmp >= t_mem else "memory"}


# scheme -> (weight bits, scale bits per weight, per-channel scale bytes per output row, compute precision,
#            formats it needs on the target, what it is)
SCHEMES: dict[str, tuple] = {
    "bf16": (16, 0.0, 0, "bf16", (), "BF16 weights and activations"),
    "fp8": (8, 0.0, 4, "fp8", ("fp8",), "FP8 E4M3 W8A8: per-channel weight scales, dynamic per-token activations"),
    "int8": (8, 0.0, 4, "int8", ("int8",), "INT8 W8A8 (SmoothQuant-style): per-channel weights, INT8 activations"),
    "w8a16": (8, 0.0, 4, "bf16", ("int8",), "INT8 weight-only, dequantized to BF16 before the GEMM"),
    "w4a16": (4, 16 / 128, 0, "bf16", ("int4_weight_only",), "INT4 weight-only, groups of 128 with BF16 scales"),
    "w4a8": (4, 16 / 128, 0, "fp8", ("int4_weight_only", "fp8"), "INT4 g128 weights, FP8 activations"),
    "nvfp4": (4, 8 / 16, 0, "fp4", ("nvfp4",), "NVFP4: FP4 weights and activations, FP8 scale per 16"),
}
SCHEME_ALIASES = {"int4": "w4a16", "w8a8": "int8", "fp8_w8a8": "fp8"}


def _is_router(name: str, shape: tuple, experts: int) -> bool:
    return experts > 0 and name.rsplit(".", 2)[-2] in ("gate", "router") and shape[0] == experts


def served_tensors(model, scheme: str) -> dict:
    """Bytes and parameters of a (meta-device) model served in `scheme`: Linear weights and fused expert
    tensors quantized; embeddings, norms, biases, lm_head and routers in BF16 (as the recipes keep them)."""
    import torch

    bits, scale_bits, row_scale, _, _, _ = SCHEMES[scheme]
    out = _empty_split(model)
    experts = out["experts"]
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out["quantized_params"] = 0
    emb = model.get_input_embeddings()
    for name, p in model.named_parameters():  # tied tensors once
        owner, _, leaf = name.rpartition(".")
        n = p.numel()
        is_expert = ".experts." in f".{name}"
        quant = scheme != "bf16" and p.dim() >= 2 and not _is_router(name, tuple(p.shape), experts) and (
            (owner in linears and leaf == "weight" and not owner.endswith("lm_head")) or (is_expert and p.dim() == 3))
        if quant:
            rows = n // p.shape[-1]
            nbytes = n * (bits + scale_bits) / 8 + rows * row_scale
            out["quantized_params"] += n
        else:
            nbytes = n * 2
        if isinstance(emb, torch.nn.Module) and p is emb.weight and not out["tied"]:
            # a lookup, not a matmul (tied: it is the lm_head too)
            out["embedding_params"], out["embedding_bytes"] = n, nbytes
        _add(out, is_expert, nbytes, n)
    return out


def load_config(source: str):
    """A transformers config from a model folder, a config.json file or an asset name (no weights read)."""
    from pathlib import Path

    from transformers import AutoConfig

    from compressor.errors import InputError

    if source.startswith("asset:"):
        from compressor import assets

        name = source[len("asset:"):]
        if name not in assets.ASSETS:
            raise InputError(f"--model: unknown asset {name!r} (known: {', '.join(assets.ASSETS)})")
        source = str(assets.prepare(name))
    p = Path(source)
    if not p.exists():
        raise InputError(f"--model: {source} not found (a model folder with config.json, or a config.json file)")
    if p.is_dir() and not (p / "config.json").is_file():
        raise InputError(f"--model: {source} holds no config.json")
    try:
        return AutoConfig.from_pretrained(str(p))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) + _STRICT_ERRORS as e:
        raise InputError(f"--model: {source}: not a readable transformers config ({str(e).splitlines()[0]})") from None


try:  # huggingface_hub's typed configs raise their own error class for a field of the wrong type
    from huggingface_hub.errors import StrictDataclassFieldValidationError as _StrictError
    _STRICT_ERRORS: tuple = (_StrictError,)
except ImportError:  # older huggingface_hub
    _STRICT_ERRORS = ()


def meta_model(config):
    """The model built on the meta device: shapes and names, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.errors import InputError

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise InputError(f"--model: {type(config).__name__} is not a causal LM transformers can build "
                             f"({str(e).splitlines()[0]})") from None


def estimate(config, target: TargetSpec, scheme: str, batch_sizes: list[int], input_len: int = 1024,
             output_len: int = 1024, kv_cache: str = "bf16", usd_per_hour: float | None = None) -> dict:
    """MODELED serving cost of a model config in a scheme on a target, from shapes alone.

    Decode is modeled at the mean context of a request (input + output / 2), memory at its end (input + output).
    Serving throughput: B requests of input_len in and output_len out: B x out tokens in prefill(B) + out decode
    steps. MoE: FLOPs from the active experts (top_k of E); bytes from the experts a batch hits under uniform
    routing, E x (1 - (1 - k/E)^B)."""
    from compressor.errors import InputError
    from compressor.targets import Format

    scheme = SCHEME_ALIASES.get(scheme, scheme)
    if scheme not in SCHEMES:
        raise InputError(f"--scheme {scheme!r} is not one of {', '.join(list(SCHEMES) + list(SCHEME_ALIASES))}")
    _, _, _, precision, formats, what = SCHEMES[scheme]
    for f in formats:
        if not target.supports(Format(f)):
            raise InputError(f"--scheme {scheme}: {target.why_not(Format(f))}")
    if not target.is_gpu:
        raise InputError(f"target {target.name}: cost on a CPU is measured, not modeled; pick a GPU target")
    model = meta_model(config)
    t = served_tensors(model, scheme)
    kv = kv_bytes_per_token(config, 1 if kv_cache == "fp8" else 2)
    moe = t["experts"] > 0 and t["top_k"] > 0 and t["expert_params"] > 0
    total_bytes = t["dense_bytes"] + t["expert_bytes"]
    params = t["dense_params"] + t["expert_params"]
    _, active = traffic(t, 1)
    adim, layers = attention_dim(config), config.num_hidden_layers
    mid, end = input_len + output_len // 2, input_len + output_len
    price = price_of(target, usd_per_hour)
    points = []
    for b in batch_sizes:
        hit = 1 - (1 - t["top_k"] / t["experts"]) ** b if moe else 1.0
        read, _ = traffic(t, b)
        d = decode(target, read, active, kv, precision, b, mid, price["usd_per_hour"])
        pf = prefill(target, read, active, precision, input_len, b, adim, layers, kv)
        total_s = pf["latency_ms_prefill"] / 1e3 + output_len * d["latency_ms_decode"] / 1e3
        serve_tps = b * output_len / total_s
        memory = total_bytes + b * end * kv
        points.append({"batch": b, "context": mid, "latency_ms_decode": d["latency_ms_decode"],
                       "tokens_per_s": d["tokens_per_s"], "bound": d["bound"],
                       "latency_ms_prefill": pf["latency_ms_prefill"], "serving_tokens_per_s": serve_tps,
                       "memory_gb": memory / 1e9, "fits": memory <= target.memory_bytes,
                       "usd_per_mtok": price["usd_per_hour"] / (serve_tps * 3600) * 1e6,
                       "experts_read": hit * t["experts"] if moe else None})
    return {"modeled": True, "target": target.name, "target_description": target.description, "scheme": scheme,
            "scheme_description": what, "precision": precision, "architecture": type(model).__name__,
            "parameters": params, "active_parameters": active, "quantized_parameters": t["quantized_params"],
            "weight_bytes": total_bytes, "moe": {"experts": t["experts"], "top_k": t["top_k"],
                                                 "expert_params": t["expert_params"]} if moe else None,
            "kv_cache": kv_cache, "kv_bytes_per_token": kv, "input_len": input_len, "output_len": output_len,
            "bandwidth_efficiency": BW_EFF, "flop_efficiency": FLOP_EFF, "price": price,
            "crossover_batch": {"weights_only": crossover_batch(target, total_bytes, active, 0, precision, 0),
                                "at_context": crossover_batch(target, total_bytes, active, kv, precision, mid)},
            "points": points}


def render_estimate(e: dict) -> str:
    """The estimate as text, every figure labelled MODELED."""
    gb = e["weight_bytes"] / 1e9
    cross = e["crossover_batch"]
    fmt_b = lambda v: f"{v:.0f}" if v is not None else "never (KV reads grow as fast as compute)"  # noqa: E731
    lines = [f"MODELED (roofline from shapes; not measured): {e['architecture']} on {e['target']} "
             f"({e['target_description']}), scheme {e['scheme']} ({e['scheme_description']})",
             f"  parameters {e['parameters'] / 1e9:.3f} B ({e['quantized_parameters'] / 1e9:.3f} B quantized), "
             f"active per token {e['active_parameters'] / 1e9:.3f} B; weights as served {gb:.2f} GB; "
             f"compute at the {e['precision']} rate",
             f"  KV cache {e['kv_cache']}: {e['kv_bytes_per_token'] / 1024:.0f} KiB/token; requests of "
             f"{e['input_len']} in / {e['output_len']} out (decode at mean context {e['points'][0]['context']})",
             f"  efficiency: {e['bandwidth_efficiency']:.0%} of peak bandwidth, {e['flop_efficiency']:.0%} of peak "
             f"FLOP/s; price ${e['price']['usd_per_hour']}/GPU-hour ({e['price']['source']})",
             f"  crossover batch (decode turns compute-bound): {fmt_b(cross['weights_only'])} on weights alone, "
             f"{fmt_b(cross['at_context'])} with the KV cache at context {e['points'][0]['context']}"]
    if e.get("moe"):
        m = e["moe"]
        lines.append(f"  MoE: {m['experts']} experts, top-{m['top_k']}; {m['expert_params'] / 1e9:.2f} B expert "
                     "parameters, read as uniform routing hits them")
    lines += ["", "  batch | decode ms/step | decode tok/s | bound   | prefill ms | serving tok/s | memory GB | fits "
              "| $/Mtok (MODELED)", "  " + "-" * 104]
    for p in e["points"]:
        lines.append(f"  {p['batch']:5d} | {p['latency_ms_decode']:14.3f} | {p['tokens_per_s']:12.0f} | "
                     f"{p['bound']:7s} | {p['latency_ms_prefill']:10.1f} | {p['serving_tokens_per_s']:13.0f} | "
                     f"{p['memory_gb']:9.2f} | {'yes' if p['fits'] else 'NO':4s} | {p['usd_per_mtok']:.4f}")
    lines.append("  serving tok/s: output tokens per second with B requests in flight (prefill + decode); "
                 "$/Mtok of output tokens at that rate")
    return "\n".join(lines)
