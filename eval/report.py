"""The report of a run, in four files (schema of report.json: README.md, "Reports"):

  report.json   the facts (schema version 1; fields are only ever added within a version)
  report.md     for CI logs and pull requests
  report.html   self-contained (inline CSS, the plot as inline SVG): quality with intervals, cost measured and
                MODELED, gates, quantization error per pass and per layer, artifacts
  pareto.png    quality against cost per variant, the baseline marked
  (quality_vs_size.svg, the older dependency-free plot, is kept beside them)

The tables are built once here (lists of cells) and rendered to Markdown here and to HTML by eval/html.py.
`rerender` rebuilds every file but report.json from report.json (`compress report OUT`).
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import InputError

REPORT_SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.{digits}g} ({v['min']:.{digits}g}-{v['max']:.{digits}g}, n={v['n']})"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _delta(base, res) -> str:
    b = base.get("median") if isinstance(base, dict) else base
    r = res.get("median") if isinstance(res, dict) else res
    if not isinstance(b, (int, float)) or not isinstance(r, (int, float)) or not b:
        return "-"
    return f"{(r - b) / abs(b) * 100:+.2f}%"


def _iv(iv: dict | None, spec: str = ".4f") -> str:
    """' [low, high]' of an interval entry in the value's format, or '' when there is none."""
    if not iv:
        return ""
    return f" [{iv['low']:{spec}}, {iv['high']:{spec}}]"


Table = tuple[list[str], list[list[str]]]


def quality_table(report: dict) -> Table:
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    head = ["eval set", "metric", "baseline", "result", "change"]
    rows = []
    for name, rs in r.get("eval_sets", {}).items():
        bs = b["eval_sets"][name]
        if "embedding_cosine" in rs:  # an encoder: embedding fidelity instead of perplexity
            iv = (rs.get("embedding_intervals") or {}).get("embedding_cosine")
            rows.append([name, "embedding cosine to the original (mean)", "1",
                         f"{rs['embedding_cosine']:.6f}{_iv(iv, '.6f')}", ""])
            rows.append([name, "embedding cosine (worst sentence)", "1", f"{rs['embedding_cosine_min']:.6f}", ""])
            rows.append([name, "held-out sentences", str(bs["sentences"]), str(rs["sentences"]), ""])
            continue
        iv = rs.get("intervals", {})
        change = _delta(bs["perplexity"], rs["perplexity"])
        if "perplexity_delta" in iv:
            d, p = iv["perplexity_delta"], iv["perplexity_delta_pct"]
            change = (f"{d['value']:+.4f}{_iv(d, '+.4f')} ({p['value']:+.2f}%"
                      f" [{p['low']:+.2f}%, {p['high']:+.2f}%])")
        rows.append([name, "perplexity", f"{bs['perplexity']:.4f}{_iv(iv.get('perplexity_baseline'))}",
                     f"{rs['perplexity']:.4f}{_iv(iv.get('perplexity'))}", change])
        rows.append([name, "KL divergence (nats/token)", "0",
                     f"{rs['kl_divergence']:.5f}{_iv(iv.get('kl_divergence'), '.5f')}", ""])
        rows.append([name, "top-1 agreement", "1", f"{rs['top1_agreement']:.4f}{_iv(iv.get('top1_agreement'))}", ""])
        rows.append([name, "tokens evaluated", str(bs["tokens"]), str(rs["tokens"]), ""])
    rows += task_rows(report)
    return head, rows


def task_rows(report: dict) -> list[list[str]]:
    """Multiple-choice accuracy per task (eval.tasks, eval.lm_eval) with bootstrap intervals over items; the
    change is paired (the same items drawn for baseline and result)."""
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    rows = []
    for name, rt in (r.get("tasks") or {}).items():
        bt = b["tasks"][name]
        iv, biv = rt.get("intervals", {}), bt.get("intervals", {})
        d = iv.get("accuracy_delta")
        change = (f"{d['value']:+.4f}{_iv(d, '+.4f')}" if d else
                  f"{rt['accuracy'] - bt['accuracy']:+.4f}")
        what = f"accuracy ({rt['items']} items, {rt.get('source', 'compressor')})"
        rows.append([f"task {name}", what, f"{bt['accuracy']:.4f}{_iv(biv.get('accuracy'))}",
                     f"{rt['accuracy']:.4f}{_iv(iv.get('accuracy'))}", change])
        if "accuracy_norm" in rt:
            rows.append([f"task {name}", "accuracy, length-normalised", f"{bt['accuracy_norm']:.4f}",
                         f"{rt['accuracy_norm']:.4f}{_iv(iv.get('accuracy_norm'))}",
                         f"{rt['accuracy_norm'] - bt['accuracy_norm']:+.4f}"])
    return rows


def interval_note(report: dict) -> str | None:
    r = report["result"]["metrics"]
    sets = [s["intervals"] for s in r.get("eval_sets", {}).values() if "intervals" in s]
    if not sets:
        emb = [s["embedding_intervals"] for s in r.get("eval_sets", {}).values() if "embedding_intervals" in s]
        if emb:
            return (f"Brackets: {emb[0]['level']:.0%} intervals, {emb[0]['method']} ({emb[0]['resamples']} "
                    f"resamples, seed {emb[0]['seed']}).")
        return None
    iv = sets[0]
    tokens = next(iter(r["eval_sets"].values()))["tokens"] // iv["windows"]
    return (f"Brackets: {iv['level']:.0%} intervals, {iv['method']} ({iv['windows']} windows of {tokens} scored "
            f"tokens per set, {iv['resamples']} resamples, seed {iv['seed']}); the change is paired: the same "
            "windows drawn for baseline and result.")


def measured_cost_table(report: dict) -> Table:
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    head = ["metric", "baseline", "result", "change", "backend"]
    rows = [["model bytes", f"{b.get('model_bytes', 0) / 1e6:.1f} MB", f"{r.get('model_bytes', 0) / 1e6:.1f} MB",
             _delta(b.get("model_bytes"), r.get("model_bytes")), "weights as stored"]]
    for m, what in (("parameters", "unique tensors"), ("nonzero_parameters", "weights not pruned")):
        if m in r:
            rows.append([m.replace("_", " "), f"{b[m] / 1e6:.2f}M", f"{r[m] / 1e6:.2f}M", _delta(b[m], r[m]), what])
    for m in ("latency_ms_prefill", "latency_ms_decode", "tokens_per_s"):
        if m in r or m in b:
            lat = r.get("latency", {})
            backend = lat.get("backend", "onnxruntime") + " " + str(lat.get("device", ""))
            rows.append([m, _fmt(b.get(m)), _fmt(r.get(m)), _delta(b.get(m, {}), r.get(m, {})), backend])
    return head, rows


def throughput_table(report: dict) -> Table | None:
    """Measured tokens/s per batch size, backend and machine (eval.throughput): median (min-max, n)."""
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    rows = []
    for who, m in (("baseline", b), ("result", r)):
        for run in m.get("throughput") or []:
            where = f"{run['backend']} {run['device']}, threads {run['threads']}"
            for p in run["points"]:
                for k, what in (("prefill_tokens_per_s", f"prefill {run['prompt_len']} tokens"),
                                ("decode_tokens_per_s", f"decode {run['decode_tokens']} steps"),
                                ("forward_tokens_per_s", f"forward {run['prompt_len']} tokens")):
                    if k in p:
                        rows.append([who, str(p["batch"]), what, _fmt(p[k], 4), where])
    if not rows:
        return None
    return ["model", "batch", "tokens/s of", "tokens/s median (min-max, n)", "backend, machine"], rows


def latency_note(report: dict) -> str | None:
    r = report["result"]["metrics"]
    if "latency" not in r:
        return None
    lat = r["latency"]
    return (f"Latency: batch 1, prompt {lat['prompt_len']} tokens, {lat['decode_tokens']} decode steps, median of "
            f"{lat['latency_ms_decode']['n']} repetitions (min-max in brackets), baseline and result interleaved in "
            f"one run, threads {lat['threads']}.")


def modeled_table(report: dict) -> Table | None:
    mb, mr = report["baseline"]["metrics"].get("modeled"), report["result"]["metrics"].get("modeled")
    if not mr:
        return None
    head = ["batch", "baseline tok/s", "result tok/s", "baseline $/Mtok", "result $/Mtok", "bound", "memory GB"]
    usd = lambda p: f"{p['usd_per_mtok']:.4f}" if p["usd_per_mtok"] is not None else "-"  # noqa: E731
    rows = [[str(pr["batch"]), f"{pb['tokens_per_s']:.0f}", f"{pr['tokens_per_s']:.0f}", usd(pb), usd(pr), pr["bound"],
             f"{pr['memory_gb']:.2f}"] for pb, pr in zip(mb["points"], mr["points"])]
    return head, rows


def modeled_notes(report: dict) -> list[str]:
    mb, mr = report["baseline"]["metrics"].get("modeled"), report["result"]["metrics"].get("modeled")
    if not mr:
        return []
    price = mr.get("price") or {"usd_per_hour": mr["points"][0]["usd_per_hour"], "source": "target default"}
    out = [f"Modeled at context {mr['points'][0]['context']} tokens, {mr['bandwidth_efficiency']:.0%} of peak "
           f"bandwidth and {mr.get('flop_efficiency', 0.6):.0%} of peak FLOP/s, weights served in BF16 unless "
           f"quantized ({mr['precision']} compute in the result), KV cache {mr.get('kv_cache', 'bf16')}, price "
           f"${price['usd_per_hour']}/GPU-hour ({price['source']})."]
    if "crossover_batch" in mr:
        def cb(m: dict) -> str:
            return ", ".join(f"{'weights only' if k == 'weights_only' else k.replace('_', ' ')}: "
                             + (f"{v:.0f}" if v is not None else "never") for k, v in m["crossover_batch"].items())
        out.append(f"Crossover batch where decode turns compute-bound (MODELED): baseline {cb(mb)}; result {cb(mr)}.")
    emb, moe = mr.get("embedding") or {}, mr.get("moe")
    if emb.get("lookup_parameters"):
        out.append(f"The input embedding ({emb['lookup_parameters'] / 1e6:.2f}M parameters) is a lookup: no FLOPs, "
                   "and a decode step reads only the rows of its batch's tokens (MODELED).")
    if moe:
        out.append(f"MoE (MODELED): {moe['top_k']} of {moe['experts']} experts compute per token "
                   f"({mr['active_parameters'] / 1e6:.1f}M active parameters); a batch reads the experts it hits "
                   "under uniform routing.")
    if "prefill" in mr:
        pb, pr = mb["prefill"], mr["prefill"]
        out.append(f"Prefill of {pr['prompt_len']} tokens at batch 1 (MODELED): baseline {pb['latency_ms_prefill']:.3g} "
                   f"ms, result {pr['latency_ms_prefill']:.3g} ms ({pr['bound']}-bound).")
    return out


def gate_table(report: dict) -> Table | None:
    if not report["gates"]:
        return None
    head = ["gate", "limit", "measured", "bound", "verdict"]
    rows = []
    for g in report["gates"]:
        name = g["metric"] + (f" ({g['eval_set']})" if g.get("eval_set") else "")
        conf = g.get("confidence")
        bnd = f"{g['bound_side']} {conf:.0%}: {_fmt(g['bound'])}" if conf is not None and "bound" in g else "-"
        verdict = "pass" if g["passed"] else f"**FAIL**: {g.get('reason', '')}"
        rows.append([name, f"{g['kind']} {g['limit']}" + (f" at {conf:.0%} confidence" if conf else ""),
                     _fmt(g.get("measured")), bnd, verdict])
    return head, rows


def sqnr_summary_table(report: dict) -> Table | None:
    """Weight quantization error per pass, from each pass's info (sqnr_db_min / _median / worst_layer)."""
    rows = []
    for p in report["passes"]:
        info = p.get("info", {})
        if "sqnr_db_median" in info:
            rows.append([p["name"], str(info.get("layers_quantized", "-")), _fmt(info.get("sqnr_db_min")),
                         _fmt(info.get("sqnr_db_median")), f"`{info['worst_layer']}`" if info.get("worst_layer") else "-"])
    return (["pass", "layers", "SQNR min dB", "SQNR median dB", "worst layer"], rows) if rows else None


def per_layer_sqnr(info: dict) -> dict[str, float]:
    """Per-layer weight SQNR (dB) where a pass reports it: info["sqnr_db"] = {layer: dB}, or
    info["layers"] / info["per_layer"] = {layer: {"sqnr_db": dB, ...}}."""
    flat = info.get("sqnr_db")
    if isinstance(flat, dict):
        return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float))}
    for key in ("per_layer", "layers"):
        d = info.get(key)
        if isinstance(d, dict):
            return {k: float(v["sqnr_db"]) for k, v in d.items() if isinstance(v, dict)
                    and isinstance(v.get("sqnr_db"), (int, float))}
    return {}


def sweep_table(report: dict) -> Table | None:
    """A sweep's variants: quality, cost (the Pareto plot's axis), gates, frontier and cheapest passing marked."""
    sw = report.get("sweep")
    if not sw:
        return None
    b = report["baseline"]["metrics"]
    head = ["variant", "status", "perplexity", "change", "KL", "top-1", "MB", "cost", "gates", "Pareto front",
            "cheapest passing", "seconds (saved)"]
    rows = []
    if "perplexity" in b:
        from compressor.eval.plot import cost_axis

        c = cost_axis(report)[1](b)
        rows.append(["baseline (original model)", "-", f"{b['perplexity']:.4f}", "", "0", "1",
                     f"{b.get('model_bytes', 0) / 1e6:.1f}", _fmt(c), "", "", "", ""])
    for v in report["variants"]:
        secs = "" if v.get("seconds") is None else f"{v['seconds']:.1f} ({v.get('seconds_saved', 0):.1f})"
        if v.get("resumed"):
            secs += " resumed"
        if "metrics" not in v:
            why = (v.get("reason") or "").splitlines()[0] if v.get("reason") else ""
            why = why if len(why) <= 90 else why[:87] + "..."  # the whole reason is in the notes below
            rows.append([f"`{v['name']}`", f"**{v['status']}**" if v["status"] == "error" else v["status"], "-",
                         why, "", "", "", "", "", "", "", secs])
            continue
        m = v["metrics"]
        gates = "pass" if v["passed"] else "**FAIL**: " + ", ".join(
            g["metric"] for g in v.get("gates", []) if not g["passed"])
        rows.append([f"`{v['name']}`", v["status"], _fmt(m.get("perplexity")), _delta(b.get("perplexity"),
                     m.get("perplexity")), _fmt(m.get("kl_divergence")), _fmt(m.get("top1_agreement")),
                     f"{m.get('model_bytes', 0) / 1e6:.1f}", _fmt(v.get("cost")), gates,
                     "yes" if v.get("frontier") else "", "**yes**" if v.get("cheapest_passing") else "", secs])
    return head, rows


def sweep_notes(report: dict) -> list[str]:
    sw = report.get("sweep")
    if not sw:
        return []
    kinds = ", ".join(f"{k} {s:.1f} s" for k, s in sorted(sw["saved_by_kind"].items(), key=lambda kv: -kv[1]))
    out = [f"Sweep of {sw['variants_total']} variants on {report['target']} ({sw['executor']} executor, "
           f"{sw['parallel']} at a time): {sw['ran']} ran, {sw['resumed']} resumed from an earlier run, "
           f"{len(sw['skipped'])} skipped, {len(sw['failed'])} failed.",
           f"Time: {sw['seconds']:.0f} s for the sweep ({sw['variant_seconds']:.0f} s in variants); reuse through "
           f"the cache saved {sw['seconds_saved']:.1f} s" + (f" ({kinds})" if kinds else "") + "."
           + (f" Resumed variants had taken {sw['resumed_seconds']:.0f} s." if sw["resumed"] else ""),
           f"Cost axis: {sw['cost_axis']}." if sw.get("cost_axis") else "",
           f"Result below: `{sw['result']}`, {sw['result_is']}." if sw.get("result") else "No variant finished."]
    out += [f"Skipped `{s['name']}`: {s['reason']}" for s in sw["skipped"]]
    out += [f"Failed `{s['name']}`: {(s['reason'] or '').splitlines()[0]}" for s in sw["failed"]]
    return [o for o in out if o]


def artifact_table(report: dict) -> Table:
    return (["kind", "path", "bytes", "sha256"],
            [[a["kind"], a["path"], f"{a['bytes']:,}", f"`{a['sha256'][:16]}`"] for a in report["artifacts"]])


def md_table(table: Table) -> list[str]:
    head, rows = table
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: dict) -> str:
    r = report["result"]["metrics"]
    lines = [f"# compressor report: {report['recipe']['name']}", "",
             f"- model: `{report['model']['source']}` ({report['model'].get('parameters', 0) / 1e6:.1f}M parameters)",
             f"- target: **{report['target']}**",
             f"- passes: {', '.join(p['name'] for p in report['passes']) or 'none'}",
             f"- compress time: {r.get('compress_seconds', 0):.1f} s; peak RSS {r.get('peak_rss_mb', 0):.0f} MB", ""]
    sw = sweep_table(report)
    if sw:
        lines += ["## Sweep", ""] + md_table(sw) + [f"\n{n}" for n in sweep_notes(report)] + [""]
        if report["sweep"].get("result"):
            lines += [f"# Result: {report['sweep']['result']}", ""]
    lines += ["## Quality (measured, torch CPU)", ""] + md_table(quality_table(report))
    if interval_note(report):
        lines.append(f"\n{interval_note(report)}")
    lines += ["", "## Cost (measured)", ""] + md_table(measured_cost_table(report))
    if latency_note(report):
        lines.append(f"\n{latency_note(report)}")
    tt = throughput_table(report)
    if tt:
        lines += ["", "### Throughput (measured)", ""] + md_table(tt)
    mt = modeled_table(report)
    if mt:
        lines += ["", f"## Cost on {r['modeled']['target']} (MODELED, roofline; not measured)", ""] + md_table(mt)
        lines += [f"\n{n}" for n in modeled_notes(report)]
    gt = gate_table(report)
    if gt:
        lines += ["", "## Gates", ""] + md_table(gt)
    st = sqnr_summary_table(report)
    if st:
        lines += ["", "## Weight quantization error (per pass)", ""] + md_table(st)
    lines += ["", "## Artifacts", ""] + md_table(artifact_table(report))
    if "perplexity" in report["baseline"]["metrics"] and "perplexity" in r:
        lines.append("\n![perplexity vs size](quality_vs_size.svg)")
    lines.append("\n![quality vs cost](pareto.png) (report.html has every table and the plot in one file)")
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def write(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    render_all(report, folder)


def render_all(report: dict, folder: Path) -> None:
    """report.md, report.html, pareto.png and quality_vs_size.svg from the report dict."""
    from compressor.eval import html, plot

    (folder / "report.md").write_text(render_markdown(report))
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    if "perplexity" in b and "perplexity" in r:
        pts = [{"name": "baseline", "mb": b["model_bytes"] / 1e6, "ppl": b["perplexity"]},
               {"name": report["recipe"]["name"], "mb": r["model_bytes"] / 1e6, "ppl": r["perplexity"]}]
        first = next(iter(r.get("eval_sets", {"": None})))
        (folder / "quality_vs_size.svg").write_text(plot.scatter_svg(
            pts, "mb", "ppl", title=f"{report['recipe']['name']}: perplexity vs size",
            x_label="model MB (weights as stored)", y_label=f"perplexity ({first}, held out)"))
    svg = plot.write_pareto(report, folder / "pareto.png")
    (folder / "report.html").write_text(html.render_html(report, svg))


def load(path: str | Path) -> tuple[dict, Path]:
    """report.json from OUT (a run's folder), OUT/report, or the file itself -> (report, its folder).
    An unknown schema version is an InputError (exit 2)."""
    p = Path(path)
    for cand in (p / "report" / "report.json", p / "report.json", p):
        if cand.is_file():
            p = cand
            break
    else:
        raise InputError(f"{path}: no report/report.json here (give a run's output folder)")
    try:
        report = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    version = report.get("schema_version") if isinstance(report, dict) else None
    if version not in READABLE_VERSIONS:
        raise InputError(f"{p}: report schema_version {version!r} is not one this compressor reads "
                         f"({', '.join(map(str, READABLE_VERSIONS))}); render it with the compressor that wrote it")
    for key in ("baseline", "result", "gates", "artifacts", "passes", "recipe", "model", "target"):
        if key not in report:
            raise InputError(f"{p}: report.json lacks {key!r}: not a compressor report")
    return report, p.parent


def rerender(path: str | Path) -> Path:
    """`compress report OUT`: rebuild report.md, report.html, pareto.png from report.json. -> the folder."""
    report, folder = load(path)
    render_all(report, folder)
    return folder
