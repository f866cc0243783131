"""lm-evaluation-harness (the `lm-eval` package, extra `compressor[lmeval]`) on our models, offline.

`CompressorLM` wraps a loaded transformers causal LM (quantized, pruned or not) as an `lm_eval.api.model.LM`:
`loglikelihood` and `loglikelihood_rolling` score with the same code as our own multiple-choice scorer
(eval/mc.py), so a task both can run gets the same accuracy from each; `generate_until` is refused (generation
tasks are out of scope of this harness).

Tasks are read from local files: a folder of task YAMLs (`include_path`) whose data are local json/jsonl files
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`); nothing is fetched. Recipe:

    eval:
      datasets: [{name: shakespeare, source: "asset:shakespeare"}]
      tasks: [{name: corpus-next-line, num_items: 200}]     # our scorer
      lm_eval:
        tasks: [corpus-next-line, my-task]   # a name of eval.tasks is written as an lm-eval task for you
        include_path: my_tasks/              # YAML + jsonl; relative to the recipe
        limit: 100
"""

from __future__ import annotations

import logging
import math

from compressor.errors import MissingDependency

log = logging.getLogger("compressor.eval")


def require_lm_eval():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise MissingDependency("lm-eval", "eval.lm_eval (lm-evaluation-harness tasks)",
                                "pip install compressor[lmeval]") from None
    return LM


def make_lm(model, tokenizer, max_len: int | None = None):
    """An lm_eval LM over `model` (a transformers causal LM in eval mode) and its tokenizer."""
    LM = require_lm_eval()

    class CompressorLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 2048

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.tokenizer, "name_or_path", "compressor").replace("/", "__")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            from compressor.eval.mc import score_requests

            return score_requests(self.model, self.tokenizer, [r.args for r in requests], self.max_len)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [rolling_loglikelihood(self.model, self.tokenizer, r.args[0], self.max_len) for r in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("compressor's lm-eval adapter scores log-likelihoods only (multiple-choice "
                                      "and perplexity tasks); generation tasks (generate_until) are not supported")

    return CompressorLM()


def rolling_loglikelihood(model, tokenizer, text: str, max_len: int) -> float:
    """Sum log p(text) in disjoint windows of `max_len` tokens, the first conditioned on the EOS (or BOS) token,
    each later window on the tail of the previous one (every token scored exactly once)."""
    import torch
    import torch.nn.functional as F

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    seq = ([prefix] if prefix is not None else []) + ids
    total, start = 0.0, 1  # seq[start:] are the tokens still to score
    with torch.inference_mode():
        while start < len(seq):
            end = min(len(seq), start + max_len - 1)
            lo = max(0, end - max_len)
            window = torch.tensor(seq[lo:end])[None]
            logp = F.log_softmax(model(input_ids=window, use_cache=False).logits[0].float(), dim=-1)
            tgt = torch.tensor(seq[start:end])
            total += float(logp[start - lo - 1:end - lo - 1].gather(-1, tgt[:, None]).sum())
            start = end
    return total if not math.isnan(total) else float("-inf")


def run_tasks(model, tokenizer, tasks: list[str], include_path: list[str], limit: int | None = None,
              builtin_tasks: bool = False, seed: int = 0) -> dict:
    """Run lm-eval tasks on `model`. -> {task: {"accuracy", "accuracy_norm"?, "items", "correct", "correct_norm"?,
    "stderr", "source": "lm-eval"}} (per-item correctness kept for our bootstrap)."""
    require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from compressor.errors import InputError

    tm = TaskManager(include_path=include_path or None, include_defaults=builtin_tasks)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = ", ".join(include_path) if include_path else "no include_path"
        raise InputError(f"eval.lm_eval.tasks: unknown task(s) {unknown} (looked in {where}"
                         f"{' and lm-eval built-ins' if builtin_tasks else ''})")
    out = evaluator.simple_evaluate(model=make_lm(model, tokenizer), tasks=list(tasks), task_manager=tm,
                                    limit=limit, log_samples=True, bootstrap_iters=0, random_seed=seed,
                                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    res = {}
    for t in tasks:
        metrics = out["results"][t]
        samples = out["samples"][t]
        samples = sorted(samples, key=lambda s: s["doc_id"])
        entry = {"source": "lm-eval", "items": len(samples)}
        for ours, theirs in (("accuracy", "acc"), ("accuracy_norm", "acc_norm")):
            if f"{theirs},none" in metrics:
                entry[ours] = float(metrics[f"{theirs},none"])
                entry["correct" if ours == "accuracy" else "correct_norm"] = [int(s[theirs]) for s in samples]
        if "accuracy" not in entry:
            raise InputError(f"eval.lm_eval task {t!r} reports no acc metric (got {sorted(metrics)}); "
                             "compressor gates multiple-choice accuracy")
        res[t] = entry
    return res
