"""Synthetic Llama checkpoints of real shapes and random bf16 weights, for larger-than-memory benchmarks.

    python -m compressor.eval.fixtures synthetic-llama --shape llama-2-7b --out /tmp/synth7b   # ~13.5 GB
    python -m compressor.eval.fixtures synthetic-llama --shape llama-1b --out /tmp/synth1b     # ~1.7 GB

Shapes: `llama-2-7b` (Llama-2-7B's config: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000),
`llama-1b` (TinyLlama's widths: hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000; 16 layers, 0.85B
parameters) and `tiny` (hidden 128, 4 layers, for tests). The folder holds config.json, a byte-level BPE
tokenizer (the 256 bytes plus <unk>, <s>, </s>, padded to the vocabulary size with tokens it never emits: it
tokenizes any text, one token a byte) and the weights as sharded safetensors with model.safetensors.index.json,
written tensor by tensor (the generator holds one tensor at a time). Weights are N(0, 0.02) (norms 1),
deterministic from --seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int


SHAPES = {
    "llama-2-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-1b": Shape(2048, 5632, 16, 32, 4, 32000, 2048),
    "tiny": Shape(128, 256, 4, 4, 2, 512, 512),
}
SPECIALS = ("<unk>", "<s>", "</s>")


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the order written (embedding, blocks, final norm, LM head)."""
    head = s.hidden // s.heads
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (s.heads * head, s.hidden)),
                (p + "self_attn.k_proj.weight", (s.kv_heads * head, s.hidden)),
                (p + "self_attn.v_proj.weight", (s.kv_heads * head, s.hidden)),
                (p + "self_attn.o_proj.weight", (s.hidden, s.heads * head)),
                (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
                (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
                (p + "input_layernorm.weight", (s.hidden,)),
                (p + "post_attention_layernorm.weight", (s.hidden,))]
    return out + [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]


def checkpoint_bytes(s: Shape) -> int:
    return sum(2 * math.prod(shape) for _, shape in tensor_specs(s))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (no merges: one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*SPECIALS, *alphabet])}
    if vocab_size < len(vocab):
        raise ValueError(f"vocabulary of {vocab_size} is smaller than the {len(vocab)} byte-level tokens")
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused_{i}>"] = i  # never produced: BPE without merges emits single bytes only
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def llama_config(s: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       max_position_embeddings=s.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def generate(shape: str | Shape, out: Path, seed: int = 0, shard_bytes: int = 2 << 30, progress=None,
             **overrides) -> Path:
    """Write the synthetic checkpoint into `out` (created; must not exist). `overrides` replace Shape fields
    (e.g. layers=8). Returns `out`."""
    import torch

    from compressor.stream_io import ShardWriter

    s = SHAPES[shape] if isinstance(shape, str) else shape
    s = replace(s, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    llama_config(s).save_pretrained(out)
    write_tokenizer(out, s.vocab)
    writer = ShardWriter(out, shard_bytes)
    specs = tensor_specs(s)
    for i, (name, dims) in enumerate(progress(specs) if progress else specs):
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            t = torch.randn(dims, generator=g).mul_(0.02).to(torch.bfloat16)
        writer.add(name, t)
        del t
    writer.finish()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compressor.eval.fixtures synthetic-llama",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of decoder layers")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (GB, default 2)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2
    over = {"layers": args.layers} if args.layers else {}
    s = replace(SHAPES[args.shape], **over)
    if not args.quiet:
        print(f"{args.shape}: {checkpoint_bytes(s) / 1e9:.2f} GB of bf16 weights -> {args.out}", file=sys.stderr)
    progress = None
    if not args.quiet:
        from tqdm.auto import tqdm

        progress = lambda it: tqdm(it, desc="tensors", unit="tensor", mininterval=2.0)  # noqa: E731
    from compressor.stream_io import DiskFull

    try:
        generate(s, args.out, args.seed, int(args.shard_gb * 1e9), progress)
    except DiskFull as e:
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        files = sorted(args.out.glob("*.safetensors"))
        print(f"wrote {len(files)} shards, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
