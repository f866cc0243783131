"""MoE fixtures: small Mixtral- and Qwen2-MoE-style models, trained here on the bundled corpora so that their
experts specialise (no MoE weights can be installed offline). Deterministic: a seeded script builds them; the
result is cached as an ordinary Hugging Face checkpoint (safetensors + config + tokenizer).

    python -m compressor.moe_fixtures moe-mixtral --out DIR     # or moe-qwen; reuses the cached build
    model: {source: asset:moe-mixtral-fixture}                   # in a recipe (built on first use)

Each fixture: 4 decoder layers, hidden 128, 8 routed experts (intermediate 128), top-2, a byte-level BPE
vocabulary of 2048 tokens trained on the same text, 1024 positions. `moe-qwen` adds Qwen2-MoE's gated shared
expert (intermediate 256) and does not renormalise its top-2 weights (norm_topk_prob false, as Qwen1.5-MoE).
Training reads only the calibration part of asset:python-docs and asset:shakespeare (calibration.data.
split_documents), so the held-out documents every recipe evaluates on are never seen; half of every batch comes
from each corpus, and a weak load-balancing loss (0.01) lets experts specialise by domain. 500 steps of 8 x 256
tokens, one thread: about 2.5 CPU-minutes each (15-18 minutes of wall time on 2 heavily shared cores).
`fixture.json` beside the weights records the spec, the training loss, the held-out perplexity and the
per-layer, per-expert token share on each corpus's held-out text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIXTURE_VERSION = 1
CORPORA = ("asset:python-docs", "asset:shakespeare")


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    arch: str  # "mixtral" | "qwen2_moe"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    expert_inter: int = 128
    shared_inter: int = 0  # Qwen2-MoE's shared expert
    norm_topk_prob: bool = True
    vocab: int = 2048
    positions: int = 1024
    seq_len: int = 256
    batch: int = 8  # windows per step, half from each corpus
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 25
    aux_loss: float = 0.01
    seed: int = 0
    tokenizer_chars: int = 3_000_000  # per corpus, for the BPE vocabulary
    train_tokens: int = 1_500_000  # per corpus, the stream windows are drawn from
    table_windows: int = 8  # held-out windows per corpus for fixture.json's routing table
    table_len: int = 256
    corpora: tuple[str, ...] = field(default=CORPORA)


FIXTURES: dict[str, FixtureSpec] = {
    "moe-mixtral": FixtureSpec("moe-mixtral", "mixtral"),
    "moe-qwen": FixtureSpec("moe-qwen", "qwen2_moe", shared_inter=256, norm_topk_prob=False),
}
# Asset names recipes use (`asset:NAME`) -> fixture names.
ASSET_NAMES = {f"{n}-fixture": n for n in FIXTURES}


def fixture_key(spec: FixtureSpec) -> str:
    """Content key of a fixture's recipe: a changed spec gets a new cache folder."""
    return hashlib.sha256(json.dumps([FIXTURE_VERSION, asdict(spec)], sort_keys=True).encode()).hexdigest()


def _config(spec: FixtureSpec, tok):
    common = dict(vocab_size=len(tok), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, num_experts_per_tok=spec.top_k,
                  max_position_embeddings=spec.positions, router_aux_loss_coef=spec.aux_loss,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                  tie_word_embeddings=False, output_router_logits=True)
    if spec.arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=spec.expert_inter, num_local_experts=spec.experts, **common)
    if spec.arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(intermediate_size=spec.shared_inter, moe_intermediate_size=spec.expert_inter,
                              shared_expert_intermediate_size=spec.shared_inter, num_experts=spec.experts,
                              norm_topk_prob=spec.norm_topk_prob, decoder_sparse_step=1, **common)
    raise ValueError(f"unknown fixture architecture {spec.arch!r}")


def training_texts(spec: FixtureSpec) -> dict[str, list[str]]:
    """The calibration part of each corpus (never the held-out documents), in the split's fixed order."""
    from compressor.calibration.data import load_documents, split_documents

    return {src: split_documents(load_documents(src))[0] for src in spec.corpora}


def train_tokenizer(spec: FixtureSpec, texts: dict[str, list[str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = []
    for docs in texts.values():
        n = 0
        for t in docs:
            sample.append(t[: spec.tokenizer_chars - n])
            n += len(sample[-1])
            if n >= spec.tokenizer_chars:
                break
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _streams(spec: FixtureSpec, tok, texts: dict[str, list[str]]):
    import torch

    from compressor.calibration.data import _token_stream

    return [torch.tensor(_token_stream(tok, docs, spec.train_tokens), dtype=torch.long) for docs in texts.values()]


def _lr(spec: FixtureSpec, step: int) -> float:
    import math

    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(spec: FixtureSpec, quiet: bool = False):
    """-> (model, tokenizer, facts). Seeded and single-threaded: the same spec gives the same weights on the same
    machine whatever its core count (and on 2 shared cores one thread ran 10x faster than two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(spec, quiet)
    finally:
        torch.set_num_threads(threads)


def _train(spec: FixtureSpec, quiet: bool):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    texts = training_texts(spec)
    tok = train_tokenizer(spec, texts)
    streams = _streams(spec, tok, texts)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_config(spec, tok), dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(spec.seed)
    per = spec.batch // len(streams)
    losses = []
    bar = tqdm(range(spec.steps), desc=f"train {spec.name}", unit="step", disable=quiet, dynamic_ncols=True,
               mininterval=1.0)
    for step in bar:
        rows = []
        for s in streams:  # (per, seq_len) windows at seeded offsets of each corpus's stream
            starts = torch.randint(0, len(s) - spec.seq_len, (per,), generator=gen)
            rows += [s[a:a + spec.seq_len] for a in starts.tolist()]
        x = torch.stack(rows)
        for g in opt.param_groups:
            g["lr"] = _lr(spec, step)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = float(out.loss.detach()) - spec.aux_loss * float(out.aux_loss.detach())
        losses.append(lm)
        bar.set_postfix(loss=f"{lm:.3f}", refresh=False)
    model.eval()
    model.config.output_router_logits = False
    for p in model.parameters():
        p.requires_grad_(False)
    tail = losses[-20:]
    facts = {"train_loss_last20": sum(tail) / len(tail), "train_loss_first": losses[0] if losses else None,
             "train_seconds": round(time.perf_counter() - t0, 1),
             "train_tokens": spec.steps * spec.batch * spec.seq_len}
    return model, tok, facts


def routing_table(model, tok, spec: FixtureSpec) -> dict:
    """Held-out perplexity and per-layer, per-expert token share on each corpus's held-out windows."""
    import math

    import torch

    from compressor.calibration.data import eval_windows
    from compressor.passes.moe._arch import arch_of, moe_blocks
    from compressor.passes.moe._stats import collect

    arch = arch_of(model)
    blocks = moe_blocks(model, arch)
    out = {}
    for src in spec.corpora:
        w = eval_windows(tok, src, spec.table_windows, spec.table_len)
        stats = collect(model, arch, blocks, w, sample_every=64)
        with torch.no_grad():
            nll = [float(model(input_ids=row[None], labels=row[None]).loss) for row in w]
        out[src.removeprefix("asset:")] = {
            "perplexity": math.exp(sum(nll) / len(nll)),
            "token_share": {n: [round(float(v), 4) for v in st.share("counts")] for n, st in stats.items()}}
    return out


def build(name: str, out: Path, quiet: bool = False, **overrides) -> Path:
    """Train fixture `name` and write it to `out` (atomically: a temp sibling renamed on success). `overrides`
    replace spec fields (tests build miniature fixtures this way)."""
    from dataclasses import replace

    spec = replace(FIXTURES[name], **overrides)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok, facts = train(spec, quiet)
    facts["held_out"] = routing_table(model, tok, spec)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        sha = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        meta = {"fixture": name, "key": fixture_key(spec), "spec": asdict(spec), "weights_sha256": sha, **facts}
        (tmp / "fixture.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def format_table(meta: dict) -> str:
    """Markdown: per layer, each expert's held-out token share on each corpus (fixture.json's `held_out`)."""
    held = meta["held_out"]
    corpora = list(held)
    layers = list(held[corpora[0]]["token_share"])
    n = len(held[corpora[0]]["token_share"][layers[0]])
    lines = ["| layer | corpus | " + " | ".join(f"e{e}" for e in range(n)) + " |", "|---|---|" + "---|" * n]
    for layer in layers:
        for c in corpora:
            share = held[c]["token_share"][layer]
            lines.append(f"| {layer.split('.')[2]} | {c} | " + " | ".join(f"{100 * v:.1f}" for v in share) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from compressor import assets

    ap = argparse.ArgumentParser(prog="python -m compressor.moe_fixtures", description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(FIXTURES))
    ap.add_argument("--out", required=True, type=Path, help="folder to write the HF checkpoint to")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2
    src = assets.resolve(f"{args.name}-fixture")  # built once into $COMPRESSOR_HOME, reused after
    shutil.copytree(src, args.out)
    meta = json.loads((args.out / "fixture.json").read_text())
    if not args.quiet:
        print(f"{args.name}: {args.out} (cached at {src})")
        print(format_table(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
