"""Text data -> token windows, with a held-out split that never overlaps calibration.

Sources: `asset:NAME`, a local .txt/.json/.jsonl/.parquet file or folder of such files (read with `datasets`),
or a hub dataset id (online only). Each row is one document.

Split rule (the same for every source, so calibration and evaluation can name the same corpus safely):
documents are ordered by sha256 of their id (or row index); the first ceil(10%) are held out for evaluation,
the rest may be used for calibration. A source with a single document is split inside it: the last 10% of its
characters are held out.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from compressor.errors import InputError

HELD_OUT_FRACTION = 0.10
_TEXT_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _cache_dir() -> str:
    from compressor import assets

    return str(assets.home() / "datasets")


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[tuple[str, str]]:
    """-> [(doc_id, text)] in source order."""
    import datasets

    from compressor import assets
    from compressor.recipe import ASSET_PREFIX, is_local_path

    datasets.disable_progress_bars()
    if source.startswith(ASSET_PREFIX):
        source = str(assets.resolve(source[len(ASSET_PREFIX):]))
    try:
        if is_local_path(source):
            p = Path(source)
            if not p.exists():
                raise InputError(f"data source not found: {p}")
            files = sorted(f for f in p.rglob("*") if f.suffix in _TEXT_SUFFIX) if p.is_dir() else [p]
            if not files:
                raise InputError(f"no .txt/.json/.jsonl/.parquet files in {p}")
            builders = {_TEXT_SUFFIX.get(f.suffix) for f in files}
            if None in builders or len(builders) != 1:
                raise InputError(f"data source {p}: use one kind of .txt, .json/.jsonl or .parquet files")
            builder = builders.pop()
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       cache_dir=_cache_dir(), **kwargs)
        else:
            ds = datasets.load_dataset(source, split=split, cache_dir=_cache_dir())
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"could not read data source {source!r}: {type(e).__name__}: {e}") from None
    if text_field not in ds.column_names:
        raise InputError(f"data source {source!r} has no field {text_field!r} (fields: {ds.column_names})")
    ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
    docs = [(str(i), t) for i, t in zip(ids, ds[text_field]) if isinstance(t, str) and t.strip()]
    if not docs:
        raise InputError(f"data source {source!r} holds no text")
    return docs


def split_documents(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """-> (calibration texts, held-out texts). Deterministic; disjoint by construction."""
    if len(docs) == 1:
        text = docs[0][1]
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        return [text[:cut]], [text[cut:]]
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    n_held = max(1, math.ceil(len(order) * HELD_OUT_FRACTION))
    return [t for _, t in order[n_held:]], [t for _, t in order[:n_held]]


def _token_stream(tokenizer, texts: list[str], need: int) -> list[int]:
    """Concatenate documents (separated by EOS) until `need` tokens are gathered (or the texts run out)."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for t in texts:
        out.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            out.append(eos)
        if len(out) >= need:
            break
    return out


def eval_windows(tokenizer, source: str, num_windows: int, seq_len: int, text_field: str = "text",
                 split: str = "train"):
    """Held-out token windows (num_windows, seq_len), consecutive and non-overlapping. Deterministic."""
    import torch

    _, held = split_documents(load_documents(source, text_field, split))
    need = num_windows * seq_len
    stream = _token_stream(tokenizer, held, need)
    if len(stream) < need:
        raise InputError(f"eval data {source!r}: held-out part has {len(stream)} tokens, "
                         f"need {num_windows} x {seq_len} = {need}; lower eval.num_windows or eval.seq_len")
    return torch.tensor(stream[:need], dtype=torch.long).reshape(num_windows, seq_len)


def calibration_windows(tokenizer, source: str | list[str], num_samples: int, seq_len: int, seed: int,
                        text_field: str = "text", split: str = "train"):
    """Seeded selection of `num_samples` windows of `seq_len` tokens from the calibration part. (N, L) int64.
    A list of sources mixes them: the samples are shared out as evenly as possible, in list order."""
    import torch

    if not isinstance(source, str):
        if not source:
            raise InputError("calibration.source: an empty list of sources")
        k = len(source)
        counts = [num_samples // k + (1 if i < num_samples % k else 0) for i in range(k)]
        parts = [calibration_windows(tokenizer, s, n, seq_len, seed, text_field, split)
                 for s, n in zip(source, counts) if n]
        return torch.cat(parts)

    calib, _ = split_documents(load_documents(source, text_field, split))
    rng = random.Random(seed)
    texts = list(calib)
    rng.shuffle(texts)
    need = num_samples * seq_len
    # Gather 4x what is needed, then choose windows at seeded offsets from the whole stream.
    stream = _token_stream(tokenizer, texts, 4 * need)
    if len(stream) < need:
        raise InputError(f"calibration data {source!r} has {len(stream)} tokens, need {num_samples} x {seq_len} "
                         f"= {need}; give more text or lower calibration.num_samples / seq_len")
    starts = sorted(rng.sample(range(len(stream) // seq_len), num_samples))
    rows = [stream[s * seq_len:(s + 1) * seq_len] for s in starts]
    return torch.tensor(rows, dtype=torch.long)
