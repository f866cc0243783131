"""Task accuracy in a run: the recipe's `eval.tasks` (built from held-out text, scored by eval/mc.py) and
`eval.lm_eval` tasks (lm-evaluation-harness on local files), for the baseline and the result.

report.json: baseline.metrics.tasks.<name> / result.metrics.tasks.<name> =
  {accuracy, accuracy_norm, items, source: "compressor" | "lm-eval", correct, correct_norm, intervals (result:
   accuracy, accuracy_delta paired against the baseline; baseline: accuracy)}
lm-eval's results are named "lm-eval:<task>". The first task is the primary one: its accuracy and accuracy_norm
are also top-level metrics, which gates use (`{metric: accuracy, max_decrease: 0.02}`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger("compressor.eval")


def _resolve(recipe, p: str) -> str:
    path = Path(p).expanduser()
    if not path.is_absolute() and recipe.path:
        path = Path(recipe.path).resolve().parent / path
    return str(path)


def build_task_items(recipe) -> dict[str, list[dict]]:
    """{task name: items} for eval.tasks (deterministic; the cache key holds them)."""
    from compressor.errors import InputError
    from compressor.eval.corpus_tasks import held_out_items

    ev = recipe.eval
    out = {}
    for t in ev.tasks:
        src = t.source or ev.datasets[0].source
        if t.source and not src.startswith("asset:"):
            src = _resolve(recipe, src)
        d0 = ev.datasets[0]
        try:
            out[t.name] = held_out_items(src, t.num_items, t.choices, t.context_lines,
                                         recipe.seed if t.seed is None else t.seed,
                                         d0.text_field if t.source is None else "text",
                                         d0.split if t.source is None else "train")
        except InputError as e:
            raise InputError(f"eval task {t.name!r}: {e}") from None
    return out


def include_paths(recipe) -> list[str]:
    lm = recipe.eval.lm_eval
    if lm is None or lm.include_path is None:
        return []
    paths = [lm.include_path] if isinstance(lm.include_path, str) else list(lm.include_path)
    return [_resolve(recipe, p) for p in paths]


def lm_eval_fingerprint(recipe) -> str | None:
    """sha256 over the include paths' files, so an edited local task is never served from the cache."""
    if recipe.eval.lm_eval is None:
        return None
    h = hashlib.sha256()
    for root in include_paths(recipe):
        for f in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if f.is_file():
                h.update(str(f.relative_to(root) if f != Path(root) else f.name).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def run(recipe, models: dict, tokenizer, items: dict[str, list[dict]], progress=None) -> dict[str, dict]:
    """models: {"baseline": model, "result": model} -> {"baseline": {task: entry}, "result": {task: entry}}."""
    import tempfile

    from compressor.eval import mc
    from compressor.eval.corpus_tasks import DELIMITER, write_lm_eval_task

    out: dict[str, dict] = {k: {} for k in models}
    for name, its in items.items():
        for which, model in models.items():
            log.info("task %s (%s): %d items", name, which, len(its))
            r = mc.score_items(model, tokenizer, its, DELIMITER, _max_len(model), progress)
            out[which][name] = {"source": "compressor", **{k: r[k] for k in ("accuracy", "accuracy_norm", "items",
                                                                               "correct", "correct_norm")}}
    lm = recipe.eval.lm_eval
    if lm is not None:
        from compressor.eval import lm_eval_adapter

        with tempfile.TemporaryDirectory(prefix="compressor-lm-eval-") as built:
            for t in lm.tasks:
                if t in items:  # our built task, as lm-eval reads it
                    write_lm_eval_task(items[t], Path(built), t)
            paths = include_paths(recipe) + ([built] if any(t in items for t in lm.tasks) else [])
            for which, model in models.items():
                log.info("lm-eval (%s): %s", which, ", ".join(lm.tasks))
                res = lm_eval_adapter.run_tasks(model, tokenizer, lm.tasks, paths, lm.limit, lm.builtin_tasks,
                                                recipe.seed)
                out[which].update({f"lm-eval:{t}": v for t, v in res.items()})
    return out


def _max_len(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def add_intervals(recipe, baseline: dict, result: dict, seed: int) -> None:
    """Bootstrap intervals over items for every task (paired change against the baseline); the primary task's
    accuracy and accuracy_norm become top-level metrics."""
    from compressor.eval.mc import accuracy_intervals

    iv = recipe.eval.intervals
    for name, r in result.get("tasks", {}).items():
        b = baseline["tasks"][name]
        r["intervals"] = accuracy_intervals(r["correct"], b["correct"], iv.level, iv.resamples, seed)
        b["intervals"] = {"accuracy": accuracy_intervals(b["correct"], None, iv.level, iv.resamples, seed)["accuracy"]}
        if "correct_norm" in r:
            r["intervals"]["accuracy_norm"] = accuracy_intervals(r["correct_norm"], None, iv.level, iv.resamples,
                                                                 seed)["accuracy"]
    primary = next(iter(result.get("tasks", {})), None)
    if primary:
        for metrics in (baseline, result):
            t = metrics["tasks"][primary]
            metrics["accuracy"] = t["accuracy"]
            if "accuracy_norm" in t:
                metrics["accuracy_norm"] = t["accuracy_norm"]
        result["primary_task"] = primary
