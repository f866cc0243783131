"""Text -> token windows: disjoint held-out split, seeded selection, clear errors on too little text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from compressor.calibration.data import calibration_windows, eval_windows, load_documents, split_documents
from compressor.errors import InputError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_split_is_disjoint_and_deterministic(text_dir):
    docs = load_documents(str(text_dir))
    assert len(docs) == 20
    calib, held = split_documents(docs)
    assert len(held) == 2 and len(calib) == 18
    assert not set(calib) & set(held)
    assert split_documents(list(reversed(docs))) == (calib, held)  # independent of the source's order


def test_single_document_is_split_inside(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("a" * 900 + "b" * 100)
    calib, held = split_documents(load_documents(str(p)))
    assert calib == ["a" * 900] and held == ["b" * 100]


def test_windows_shapes_and_no_overlap(tok, text_dir):
    ev = eval_windows(tok, str(text_dir), 3, 32)
    assert ev.shape == (3, 32) and ev.dtype == torch.long
    cal = calibration_windows(tok, str(text_dir), 5, 32, seed=0)
    assert cal.shape == (5, 32)
    assert torch.equal(cal, calibration_windows(tok, str(text_dir), 5, 32, seed=0))
    assert not torch.equal(cal, calibration_windows(tok, str(text_dir), 5, 32, seed=1))
    # No held-out window appears in the calibration stream.
    calib_texts, _ = split_documents(load_documents(str(text_dir)))
    calib_ids = tok("".join(calib_texts), add_special_tokens=False)["input_ids"]
    s = " ".join(map(str, calib_ids))
    for w in ev:
        assert " ".join(map(str, w[:16].tolist())) not in s


def test_jsonl_source_with_text_field(tmp_path, tok):
    import json

    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"id": str(i), "body": "word " * 400}) for i in range(5)))
    assert eval_windows(tok, str(p), 2, 16, text_field="body").shape == (2, 16)
    with pytest.raises(InputError, match="no field 'text'"):
        eval_windows(tok, str(p), 2, 16)


def test_too_short_and_empty_text_are_clear_errors(tmp_path, tok):
    short = tmp_path / "short"
    short.mkdir()
    for i in range(3):
        (short / f"{i}.txt").write_text("tiny text")
    with pytest.raises(InputError, match=r"need 4 x 64 = 256"):
        calibration_windows(tok, str(short), 4, 64, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(InputError, match="holds no text"):
        load_documents(str(empty))


def test_parquet_source(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [str(i) for i in range(6)], "text": [f"document {i} " + "words here " * 200 for i in range(6)]})
    pq.write_table(table, tmp_path / "d.parquet")
    docs = load_documents(str(tmp_path / "d.parquet"))
    assert [d[0] for d in docs] == [str(i) for i in range(6)]
    calib, held = split_documents(docs)
    assert len(held) == 1 and len(calib) == 5
    assert eval_windows(tok, str(tmp_path / "d.parquet"), 2, 32).shape == (2, 32)
