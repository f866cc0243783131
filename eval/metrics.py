"""Quality metrics against the original model: perplexity, KL divergence and top-1 agreement of next-token
distributions, computed window by window in lockstep so no logits are stored.

For each window of L tokens, positions 0..L-2 predict tokens 1..L-1:
  nll    = -sum log p(token)                     -> perplexity = exp(total nll / total tokens)
  KL     = sum_v p_base(v) (log p_base(v) - log p_result(v))   (mean over positions)
  top1   = [argmax p_base == argmax p_result]    (mean over positions)
Per-window sums are kept in the output (window_nll, window_kl, window_top1: agreeing positions) so confidence
intervals can be bootstrapped over windows (eval/stats.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def window_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(L,) token ids -> (L-1, V) float32 log-probabilities of the next token."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def compare_models(baseline, result, windows: torch.Tensor, progress=None) -> tuple[dict, dict]:
    """-> (baseline metrics, result metrics) over `windows` (N, L)."""
    it = progress(range(len(windows)), total=len(windows), desc="eval", unit="window") if progress else range(len(windows))
    per = {"nll_base": [], "nll": [], "kl": [], "top1": []}
    n_tok = 0
    for i in it:
        ids = windows[i]
        labels = ids[1:, None]
        lp_b = window_logprobs(baseline, ids)  # (L-1, V)
        lp_r = window_logprobs(result, ids)
        per["nll_base"].append(float(-lp_b.gather(-1, labels).sum()))
        per["nll"].append(float(-lp_r.gather(-1, labels).sum()))
        per["kl"].append(float((lp_b.exp() * (lp_b - lp_r)).sum()))
        per["top1"].append(int((lp_b.argmax(-1) == lp_r.argmax(-1)).sum()))
        n_tok += labels.shape[0]
    base = {"perplexity": math.exp(sum(per["nll_base"]) / n_tok), "tokens": n_tok,
            "window_nll": per["nll_base"]}
    res = {"perplexity": math.exp(sum(per["nll"]) / n_tok), "kl_divergence": sum(per["kl"]) / n_tok,
           "top1_agreement": sum(per["top1"]) / n_tok, "tokens": n_tok, "window_nll": per["nll"],
           "window_kl": per["kl"], "window_top1": per["top1"]}
    return base, res


def perplexity(model, windows: torch.Tensor) -> float:
    nll = n = 0.0
    for ids in windows:
        lp = window_logprobs(model, ids)
        nll += float(-lp.gather(-1, ids[1:, None]).sum())
        n += ids.shape[0] - 1
    return math.exp(nll / n)
