"""Encoder models (BERT family, AutoModel) through the pipeline: quantize_rtn W8/W4 on their Linear layers,
export_checkpoint, and embedding fidelity (cosine of mean-pooled sentence embeddings to the original's) instead
of perplexity. A tiny random BertModel with a WordPiece tokenizer trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_text, run_cli, run_report, write_recipe


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([make_text(3000, 99)], trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def _recipe(tmp_path: Path, model: Path, text_dir: Path, passes: str, gates: str = "", target_line: str = "") -> Path:
    return write_recipe(tmp_path / "encoder.yaml", f"""
schema_version: 1
name: tiny-bert
model: {{source: {model}}}
passes:
{passes}
export:
  - pass: export_checkpoint
eval:
  datasets: [{{name: local, source: {text_dir}}}]
  embeddings: {{num_sentences: 48, max_tokens: 32, batch_size: 16}}
  latency: {{enabled: false}}
{gates}
""")


def test_encoder_loads_with_automodel(bert_dir):
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    h = load_model(ModelSpec(source=str(bert_dir)))
    assert type(h.model).__name__ == "BertModel" and h.is_encoder


def test_embedding_math_exact_for_identical_models(bert_dir):
    from transformers import AutoTokenizer, BertModel

    from compressor.eval import embeddings

    model = BertModel.from_pretrained(bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    sents = ["the king speaks to the queen", "return value of the function", "a b"]
    e = embeddings.sentence_embeddings(model, tok, sents, max_tokens=16, batch_size=2)
    assert e.shape == (3, 64)
    # Mean pooling over the mask: padding does not change a sentence's embedding.
    alone = embeddings.sentence_embeddings(model, tok, sents[2:], max_tokens=16, batch_size=1)
    assert torch.allclose(e[2], alone[0], atol=1e-5)
    assert embeddings.cosines(e, e.clone()) == [1.0, 1.0, 1.0]
    iv = embeddings.intervals([0.9, 0.95, 1.0, 0.99], 0.9, 500, 0)["embedding_cosine"]
    assert iv["value"] == pytest.approx(0.96) and 0.9 <= iv["low"] <= 0.96 <= iv["high"] <= 1.0


def test_encoder_w8_w4_through_the_pipeline(tmp_path, bert_dir, text_dir, home, capsys):
    gate = "gates:\n  - {metric: embedding_cosine, min: 0.9}\n  - {metric: perplexity, max: 100}"
    rep = {}
    for fmt, extra in (("int8", ""), ("int4", "    granularity: per_group\n    group_size: 32\n")):
        recipe = _recipe(tmp_path, bert_dir, text_dir, f"  - pass: quantize_rtn\n    format: {fmt}\n{extra}",
                         gate if fmt == "int8" else "")
        out = tmp_path / f"out-{fmt}"
        if fmt == "int8":  # the perplexity gate fails: an encoder has no perplexity, and the report says why
            rc, _, err = run_cli([recipe, "--target", "h200", "--out", out, "--quiet"], capsys)
            assert rc == 1 and "perplexity was not measured" in err
            rep[fmt] = json.loads((out / "report" / "report.json").read_text())
        else:
            rep[fmt] = run_report(recipe, out, capsys, target="cpu")
    r8, r4 = rep["int8"]["result"]["metrics"], rep["int4"]["result"]["metrics"]
    # Every Linear of the encoder (6 per layer x 2 layers + the pooler) is quantized.
    assert rep["int8"]["passes"][0]["info"]["layers_quantized"] == 13
    assert 0.9 < r8["embedding_cosine"] < 1.0 and r8["embedding_cosine_min"] <= r8["embedding_cosine"]
    assert r4["embedding_cosine"] < r8["embedding_cosine"]  # 4 bits keep less than 8
    iv = r8["eval_sets"]["local"]["embedding_intervals"]["embedding_cosine"]
    assert iv["low"] <= r8["embedding_cosine"] <= iv["high"] and r8["eval_sets"]["local"]["sentences"] == 48
    assert "perplexity" not in r8 and "kl_divergence" not in r8
    notes = " ".join(rep["int8"]["notes"])
    assert "is an encoder" in notes and "embedding fidelity" in notes and "no modeled h200 cost" in notes
    gates = {g["metric"]: g for g in rep["int8"]["gates"]}
    assert gates["embedding_cosine"]["passed"] and not gates["perplexity"]["passed"]
    md = (tmp_path / "out-int8" / "report" / "report.md").read_text()
    assert "embedding cosine to the original (mean)" in md
    # The Pareto plot's quality axis for an encoder: 1 - cosine (the original at 0), its interval flipped.
    from compressor.eval.plot import pareto_points

    pts, _, y_label = pareto_points(rep["int8"])
    assert y_label.startswith("1 - embedding cosine") and [p["baseline"] for p in pts] == [True, False]
    assert pts[0]["quality"] == 0.0 and pts[1]["quality"] == pytest.approx(1 - r8["embedding_cosine"])
    assert pts[1]["low"] == pytest.approx(1 - iv["high"]) and pts[1]["high"] == pytest.approx(1 - iv["low"])
    # The report re-renders from report.json, and two encoder runs compare.
    assert run_cli(["report", tmp_path / "out-int8"], capsys)[0] == 0
    assert "embedding cosine to the original" in (tmp_path / "out-int8" / "report" / "report.html").read_text()
    rc, out, err = run_cli(["compare", tmp_path / "out-int8", tmp_path / "out-int4"], capsys)
    assert rc == 0, err
    assert r8["model_bytes"] < rep["int8"]["baseline"]["metrics"]["model_bytes"]
    # Quantization changes no parameter count (the biases of quantized layers included).
    assert r8["parameters"] == r4["parameters"] == rep["int8"]["baseline"]["metrics"]["parameters"]

    # The exported checkpoint reloads as the same quantized BertModel: bit-identical embeddings.
    from compressor.kernels.qlinear import QuantLinear
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    h = load_model(ModelSpec(source=str(tmp_path / "out-int8" / "checkpoint")))
    assert type(h.model).__name__ == "BertModel"
    assert sum(isinstance(m, QuantLinear) for m in h.model.modules()) == 13


def test_unmodified_encoder_has_cosine_exactly_one(tmp_path, bert_dir, text_dir, home, capsys):
    recipe = _recipe(tmp_path, bert_dir, text_dir, "  []", "gates:\n  - {metric: embedding_cosine_min, min: 1.0}")
    r = run_report(recipe, tmp_path / "out", capsys)["result"]["metrics"]
    assert r["embedding_cosine"] == 1.0 and r["embedding_cosine_min"] == 1.0


def test_encoder_throughput_per_batch(bert_dir):
    from transformers import BertModel

    from compressor.eval import measure, report

    model = BertModel.from_pretrained(bert_dir).eval()
    t = measure.torch_encoder_throughput({"baseline": model}, [1, 4], seq_len=16, repetitions=3, warmup=1,
                                         threads=1, vocab_size=model.config.vocab_size)["baseline"]
    assert t["backend"] == "torch" and t["threads"] == 1 and [p["batch"] for p in t["points"]] == [1, 4]
    for p in t["points"]:
        f = p["forward_tokens_per_s"]
        assert f["n"] == 3 and 0 < f["min"] <= f["median"] <= f["max"]
    head, rows = report.throughput_table({"baseline": {"metrics": {"throughput": [t]}}, "result": {"metrics": {}}})
    assert [r[1] for r in rows] == ["1", "4"] and rows[0][2] == "forward 16 tokens" and "torch cpu" in rows[0][4]
