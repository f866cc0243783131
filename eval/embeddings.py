"""Embedding fidelity of encoder models (BERT-family, loaded with AutoModel): how close the compressed model's
sentence embeddings stay to the original's on held-out sentences.

  embedding(s) = mean over the tokens of s (attention mask) of the last hidden state      (N, H)
  cosine_i     = <e_base(s_i), e_result(s_i)> / (|e_base(s_i)| |e_result(s_i)|)
  reported     = mean cosine (with a bootstrap interval over sentences) and the minimum

Perplexity, KL and top-1 agreement do not apply to an encoder (it has no next-token distribution); the harness
says so in the report's notes. Sentences come from the held-out documents of each eval set (never the
calibration part), split at line breaks and sentence ends, a seeded sample of those with 3 words or more.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def held_out_sentences(source: str, n: int, seed: int = 0, text_field: str = "text", split: str = "train") -> list[str]:
    from compressor.calibration.data import load_documents, split_documents
    from compressor.errors import InputError

    _, held = split_documents(load_documents(source, text_field, split))
    sents = [s.strip() for t in held for s in _SPLIT.split(t)]
    sents = [s for s in sents if len(s.split()) >= 3 and 15 <= len(s) <= 1000]
    if len(sents) < n:
        raise InputError(f"eval data {source!r}: held-out part has {len(sents)} sentences, need {n}; lower "
                         "eval.embeddings.num_sentences")
    return random.Random(seed).sample(sents, n)


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str], max_tokens: int = 128,
                        batch_size: int = 32) -> torch.Tensor:
    """(N, H) float32 mean-pooled last hidden states (padding excluded by the attention mask)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(out)


def cosines(base: torch.Tensor, result: torch.Tensor) -> list[float]:
    """Per-sentence cosine similarity of two (N, H) embedding sets. Identical rows give exactly 1.0."""
    cos = F.cosine_similarity(base.double(), result.double(), dim=-1)
    same = (base == result).all(-1)
    return [1.0 if s else float(c) for c, s in zip(cos, same)]


def fidelity(base_model, result_model, tokenizer, sentences: list[str], max_tokens: int, batch_size: int) -> dict:
    """-> {"embedding_cosine", "embedding_cosine_min", "sentences", "sentence_cosine": [...]}; the interval is
    added from sentence_cosine by `intervals` (so changed interval settings reuse cached embeddings)."""
    cos = cosines(sentence_embeddings(base_model, tokenizer, sentences, max_tokens, batch_size),
                  sentence_embeddings(result_model, tokenizer, sentences, max_tokens, batch_size))
    return {"embedding_cosine": sum(cos) / len(cos), "embedding_cosine_min": min(cos), "sentences": len(cos),
            "sentence_cosine": cos}


def intervals(cos: list[float], level: float, resamples: int, seed: int) -> dict:
    """{"embedding_cosine": {value, low, high}, level, resamples, seed, method}: bootstrap over sentences."""
    from compressor.eval.mc import mean_interval

    return {"embedding_cosine": mean_interval(cos, level, resamples, seed), "level": level,
            "resamples": resamples, "seed": seed, "method": "percentile bootstrap over sentences"}
