"""Multiple-choice log-likelihood scoring (no lm-eval needed), the way lm-evaluation-harness scores
`output_type: multiple_choice` tasks, so the two agree item for item.

An item is {"context": str, "choices": [str, ...], "label": int}. Each choice is scored as the continuation
`delimiter + choice` of the context:

  ll(choice)   = sum_t log p(continuation token t | context, earlier continuation tokens)
  acc          = [argmax_i ll_i == label]
  acc_norm     = [argmax_i ll_i / len(choice_i in characters) == label]   (lm-eval's length normalisation)

Encoding (the same for our scorer and the lm-eval adapter): whitespace at the end of the context moves to the
front of the continuation; whole = tok(context + continuation), the continuation's tokens are whole minus the
tokens of tok(context) (so a merge across the boundary is scored as the model would see it). Contexts longer
than the model's window keep their last tokens. No special tokens are added.

Accuracy carries a percentile bootstrap interval over items (eval/stats.py's seeded resampling), and the change
against the baseline a paired one (the same items drawn for both).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """-> (context ids, continuation ids); see the module docstring."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    k = len(ctx)
    # A merge across the boundary can make the context's own encoding disagree with the whole's prefix:
    # keep at least one continuation token, and score the whole's tokens after the shared prefix.
    while k > 0 and (k > len(whole) - 1 or whole[:k] != ctx[:k]):
        k -= 1
    return whole[:k], whole[k:]


@torch.inference_mode()
def continuation_logprobs(model, context_ids: list[int], continuations: list[list[int]],
                          max_len: int | None = None) -> list[tuple[float, bool]]:
    """Score every continuation of one context in one right-padded batch.
    -> [(sum log p(continuation | context), continuation is the greedy one)] in input order."""
    if not context_ids:
        raise ValueError("multiple-choice scoring needs a non-empty context")
    seqs = []
    for cont in continuations:
        if not cont:
            raise ValueError("a choice encodes to no tokens")
        seq = context_ids + cont
        if max_len is not None and len(seq) > max_len:
            seq = seq[-max_len:]  # keep the end: the continuation and the nearest context
        seqs.append(seq)
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (C, T, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (s, cont) in enumerate(zip(seqs, continuations)):
        n = len(cont)
        pos = torch.arange(len(s) - n - 1, len(s) - 1)  # positions predicting the continuation's tokens
        target = torch.tensor(s[-n:])
        lp = logp[i, pos]  # (n, V)
        out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def score_requests(model, tokenizer, requests: list[tuple[str, str]], max_len: int | None = None,
                   progress=None) -> list[tuple[float, bool]]:
    """(context, continuation) pairs -> [(log-likelihood, greedy)] in order. Consecutive requests with the same
    context (an item's choices) run as one batch per shared context encoding, so our scorer and the lm-eval
    adapter, which both call this, compute the same numbers."""
    groups: list[list[int]] = []
    for i, (ctx, _) in enumerate(requests):
        if groups and requests[groups[-1][0]][0] == ctx:
            groups[-1].append(i)
        else:
            groups.append([i])
    it = progress(groups, total=len(groups), desc="tasks", unit="item") if progress else groups
    out: list = [None] * len(requests)
    for group in it:
        pairs = {i: encode_pair(tokenizer, *requests[i]) for i in group}
        # A choice whose first token merges with the context has its own context prefix: one batch per prefix.
        for prefix in dict.fromkeys(tuple(p[0]) for p in pairs.values()):  # first-seen order: reproducible
            idx = [i for i in group if tuple(pairs[i][0]) == prefix]
            ctx = list(prefix) or _start_token(tokenizer)  # an empty context is conditioned on EOS (as lm-eval's HF)
            for i, r in zip(idx, continuation_logprobs(model, ctx, [pairs[i][1] for i in idx], max_len)):
                out[i] = r
    return out


def _start_token(tokenizer) -> list[int]:
    tok = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if tok is None:
        raise ValueError("an empty context needs an EOS or BOS token to condition on; this tokenizer has neither")
    return [tok]


def score_items(model, tokenizer, items: list[dict], delimiter: str = " ", max_len: int | None = None,
                progress=None) -> dict:
    """Score every item -> {"accuracy", "accuracy_norm", "items", "correct": [0/1], "correct_norm": [0/1],
    "loglikelihoods": [[ll per choice]]}."""
    requests = [(item["context"], delimiter + c) for item in items for c in item["choices"]]
    scores = iter(score_requests(model, tokenizer, requests, max_len, progress))
    correct, correct_norm, lls = [], [], []
    for item in items:
        res = [next(scores)[0] for _ in item["choices"]]
        c, cn = choice_correct(res, item["choices"], item["label"])
        correct.append(c)
        correct_norm.append(cn)
        lls.append(res)
    n = len(items)
    return {"accuracy": sum(correct) / n, "accuracy_norm": sum(correct_norm) / n, "items": n,
            "correct": correct, "correct_norm": correct_norm, "loglikelihoods": lls}


def choice_correct(lls: list[float], choices: list[str], label: int) -> tuple[int, int]:
    """(acc, acc_norm) of one item: the first maximum wins ties, as numpy's argmax does in lm-eval."""
    acc = int(int(np.argmax(lls)) == label)
    norm = np.asarray(lls) / np.asarray([float(len(c)) for c in choices])
    return acc, int(int(np.argmax(norm)) == label)


def accuracy_intervals(correct: list[int], base_correct: list[int] | None = None, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict:
    """{"accuracy": {value, low, high}, "accuracy_delta": {...} (paired, result - baseline) when the baseline's
    per-item results are given, "level", "resamples", "seed", "items", "method"}."""
    res = np.asarray(correct, dtype=np.float64)
    cols = [res] + ([np.asarray(base_correct, dtype=np.float64)] if base_correct is not None else [])
    if base_correct is not None and len(cols[1]) != len(res):
        raise ValueError(f"baseline scored {len(cols[1])} items, result {len(res)}: not paired")
    draws = mean_draws(np.stack(cols, axis=1), resamples, seed)  # (resamples, 1 or 2)
    out: dict = {"level": level, "resamples": resamples, "seed": seed, "items": len(res),
                 "method": "paired percentile bootstrap over items"}
    out["accuracy"] = _entry(float(res.mean()), draws[:, 0], level)
    if base_correct is not None:
        out["accuracy_delta"] = _entry(float(res.mean() - cols[1].mean()), draws[:, 0] - draws[:, 1], level)
    return out


def mean_draws(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(items, k) per-item values -> (resamples, k) bootstrap means, the same item draws for every column."""
    from compressor.eval import stats

    n = len(values)
    return np.concatenate([c @ values for c in stats.resample_counts(n, resamples, seed)]) / n


def mean_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """{value, low, high}: the mean of per-item values with its percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    return _entry(float(v.mean()), mean_draws(v[:, None], resamples, seed)[:, 0], level)


def _entry(value: float, draws: np.ndarray, level: float) -> dict:
    from compressor.eval import stats

    lo, hi = stats.interval(draws, level)
    return {"value": value, "low": lo, "high": hi}
