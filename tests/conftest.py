"""Shared fixtures: a tiny randomly initialised Llama with a real (small, trained here) tokenizer, and text."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the model quantize weight layer scale group token window export graph runtime calibration python "
          "function module return value list dict string error file path object class method import data "
          "king queen lord lady sword crown night day love death speak hear good noble heart").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sents = []
    while n_words > 0:
        k = rng.randint(5, 14)
        sents.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sents)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """20 small documents (.txt), enough for calibration and held-out windows of a tiny model."""
    d = tmp_path_factory.mktemp("text")
    for i in range(20):
        (d / f"doc{i:02d}.txt").write_text(make_text(1500, i))
    return d


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, 99)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty COMPRESSOR_HOME (cache) for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("COMPRESSOR_HOME", str(h))
    return h


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_eval(text_dir: Path, latency: str) -> str:
    """The eval section of the tiny recipes: 4 windows of 64 tokens of the local text."""
    return f"""eval:
  datasets:
    - name: local
      source: {text_dir}
  num_windows: 4
  seq_len: 64
  latency: {latency}"""


@pytest.fixture()
def tiny_recipe(tmp_path, tiny_model_dir, text_dir):
    """A runnable recipe on the tiny model (INT8 RTN, checkpoint + ONNX, eval on the local text)."""

    def make(extra_passes: str = "", fmt: str = "int8", gates: str = "", export: str | None = None) -> Path:
        export = export if export is not None else """
export:
  - pass: export_checkpoint
  - pass: export_onnx
"""
        text = f"""
schema_version: 1
name: tiny
model:
  source: {tiny_model_dir}
passes:
  - pass: quantize_rtn
    format: {fmt}
{extra_passes}
{export}
{tiny_eval(text_dir, "{prompt_len: 16, decode_tokens: 4, repetitions: 2, warmup: 1}")}
{gates}
"""
        return write_recipe(tmp_path / "recipe.yaml", text)

    return make


@pytest.fixture()
def quant_recipe(tmp_path, tiny_model_dir, text_dir):
    """A recipe on the tiny model with the given passes (YAML list items), calibrated on the local text."""

    def make(passes: str, calibration: str | None = "", export: str = "export: [{pass: export_checkpoint}]",
             model: Path | None = None, name: str = "recipe.yaml", extra: str = "") -> Path:
        calib = "" if calibration is None else (calibration or f"""
calibration:
  source: {text_dir}
  num_samples: 8
  seq_len: 64
""")
        text = f"""
schema_version: 1
name: tiny
model:
  source: {model or tiny_model_dir}
{calib}
passes:
{passes}
{export}
{tiny_eval(text_dir, "{enabled: false}")}
{extra}
"""
        return write_recipe(tmp_path / name, text)

    return make


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of the compress CLI."""
    from compressor.cli import main

    rc = main([str(a) for a in args])
    return rc, *capsys.readouterr()


def run_report(recipe: Path, out: Path, capsys, target: str = "cpu") -> dict:
    """Run a recipe through the CLI and return its report.json (asserting success)."""
    import json

    rc, _, err = run_cli([recipe, "--target", target, "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    return json.loads((out / "report" / "report.json").read_text())


def build_tiny_mixtral(folder: Path, experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
    """A tiny random Mixtral (hidden 32, 2 layers) with the trained tokenizer, saved as safetensors."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(folder)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# --- sweep tests (tests/compressor/sweep/) ---

SWEEP_VARIANTS = """  variants:
    - {name: int8, set: {passes.0.granularity: per_channel}}
    - {name: int4-g32, set: {passes.0.format: int4, passes.0.granularity: per_group, passes.0.group_size: 32}}
    - {name: int4-g16, set: {passes.0.format: int4, passes.0.granularity: per_group, passes.0.group_size: 16}}
    - {name: nvfp4, set: {passes.0.format: nvfp4}}
"""


@pytest.fixture()
def sweep_recipe(tmp_path, tiny_model_dir, text_dir):
    """A sweep recipe on the tiny model: RTN variants, a KL gate, eval on the local text, no export."""

    def make(sweep: str = SWEEP_VARIANTS, gates: str = "  - {metric: kl_divergence, max: 0.0001}\n",
             name: str = "sweep.yaml") -> Path:
        p = tmp_path / name
        p.write_text(f"""schema_version: 1
name: tiny-sweep
model:
  source: {tiny_model_dir}
passes:
  - pass: quantize_rtn
    format: int8
export: []
eval:
  datasets:
    - name: local
      source: {text_dir}
  num_windows: 4
  seq_len: 64
  latency: {{enabled: false}}
gates:
{gates}sweep:
{sweep}""")
        return p

    return make
