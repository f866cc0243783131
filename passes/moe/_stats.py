"""Per-layer, per-expert routing statistics over calibration data (the input of expert_trim / expert_merge).

Hooks on each sparse MoE block see exactly what the model computes: the router's logits (its forward output) and
the experts module's inputs (hidden states, top-k indices, top-k weights as applied). Per expert e:

  counts[e]     routed token slots (tokens whose top-k holds e)
  prob_mass[e]  sum over all tokens of the router's probability for e (softmax; sigmoid scores normalised)
  gate_mass[e]  sum of the top-k weights e was applied with
  reap_sum[e]   sum over routed tokens of gate weight x ||f_e(x)||_2 (REAP's router-weighted output norm)
  coact[e, f]   tokens routing to both e and f
  gram[e, f]    sum of <f_e(x), f_f(x)> over a fixed sample of tokens every expert is run on (output similarity)
Per layer also `inputs`: a seeded reservoir sample (at most MAX_INPUTS) of the block's input tokens, on which the
passes measure how much trimming or merging changes the block's output (the predicted risk).

Statistics are cached by content hash (model state + calibration tokens), so expert_stats, expert_trim and
expert_merge in one recipe, or a rerun, compute them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.passes.moe._arch import Arch, MoEBlock, expert_forward, router_probs

STATS_VERSION = 2
FIELDS = ("counts", "prob_mass", "gate_mass", "reap_sum", "norm_sum", "coact", "gram", "inputs")
MAX_INPUTS = 512


@dataclass
class LayerStats:
    name: str
    num_experts: int
    tokens: int = 0
    t: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0  # tokens offered to the inputs reservoir

    def __post_init__(self) -> None:
        e = self.num_experts
        for k in FIELDS[:-1]:
            self.t.setdefault(k, torch.zeros((e, e) if k in ("coact", "gram") else (e,), dtype=torch.float64))
        self.t.setdefault("inputs", torch.zeros(0))
        self._rng = torch.Generator().manual_seed(0)

    def offer(self, x: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R): every offered token is kept with equal probability."""
        keep = self.t["inputs"]
        if keep.numel() == 0:
            keep = x.new_zeros(0, x.shape[-1])
        rows = list(keep)
        for tok in x:
            if len(rows) < MAX_INPUTS:
                rows.append(tok)
            else:
                j = int(torch.randint(0, self.seen + 1, (1,), generator=self._rng))
                if j < MAX_INPUTS:
                    rows[j] = tok
            self.seen += 1
        self.t["inputs"] = torch.stack(rows).clone()

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.t[k]

    @property
    def reap(self) -> torch.Tensor:
        """Mean router-weighted output norm over the tokens routed to each expert (0 where none were)."""
        return self.t["reap_sum"] / self.t["counts"].clamp_min(1)

    def share(self, k: str) -> torch.Tensor:
        """A statistic as shares of its layer total (uniform if the total is 0)."""
        v = self.t[k]
        s = v.sum()
        return v / s if s > 0 else torch.full_like(v, 1.0 / len(v))


def _observe_block(arch: Arch, block: MoEBlock, st: LayerStats, sample_every: int):
    """Hooks for one block -> list of handles. The router's forward output is kept until the experts run."""
    seen: dict = {}

    def on_gate(mod, args, out):
        seen["logits"] = out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def on_experts(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        x = x.reshape(-1, x.shape[-1])
        e_n = st.num_experts
        # (T, k) indices -> (T, E) 0/1 routing matrix and applied weights
        onehot = torch.zeros(x.shape[0], e_n, dtype=torch.float64)
        onehot.scatter_(1, idx.long(), 1.0)
        weights = torch.zeros(x.shape[0], e_n, dtype=torch.float64)
        weights.scatter_add_(1, idx.long(), w.to(torch.float64))
        st.tokens += x.shape[0]
        st.t["counts"] += onehot.sum(0)
        st.t["gate_mass"] += weights.sum(0)
        st.t["coact"] += onehot.T @ onehot
        logits = seen.pop("logits", None)
        if logits is not None:
            st.t["prob_mass"] += router_probs(arch, logits.reshape(-1, e_n)).to(torch.float64).sum(0)
        sample = x[::sample_every]
        st.offer(sample.detach().float())
        outs = []
        for e in range(e_n):
            tok = torch.nonzero(onehot[:, e]).flatten()
            if tok.numel():
                y = expert_forward(block.experts, e, x[tok]).float()
                st.t["reap_sum"][e] += (weights[tok, e] * y.norm(dim=-1).to(torch.float64)).sum()
                st.t["norm_sum"][e] += y.norm(dim=-1).to(torch.float64).sum()
            outs.append(expert_forward(block.experts, e, sample).float().reshape(-1))
        o = torch.stack(outs).to(torch.float64)  # (E, S*H)
        st.t["gram"] += o @ o.T

    return [block.gate.register_forward_hook(on_gate),
            block.experts.register_forward_pre_hook(on_experts, with_kwargs=True)]


@torch.no_grad()
def collect(model, arch: Arch, blocks: list[MoEBlock], batches: torch.Tensor, progress=None,
            sample_every: int = 16) -> dict[str, LayerStats]:
    """Run every calibration row (N, L) through the model with the hooks on; -> {block name: LayerStats}."""
    stats = {b.name: LayerStats(b.name, b.num_experts) for b in blocks}
    handles = [h for b in blocks for h in _observe_block(arch, b, stats[b.name], sample_every)]
    try:
        rows = batches if progress is None else progress(batches, total=len(batches), desc="expert statistics",
                                                          unit="sample")
        for row in rows:
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def cached_collect(handle, arch: Arch, blocks: list[MoEBlock], batches: torch.Tensor, ctx) -> tuple[dict, bool]:
    """collect(), reusing a cached result for the same model state and calibration tokens. -> (stats, reused)."""
    from safetensors.torch import load_file, save_file

    from compressor.cache import Cache, key_of, sha256_tensor
    from compressor.calibration.stats import state_hash

    cache = Cache(ctx.cache_dir, ctx.cache_enabled)
    key = key_of("expert-stats", STATS_VERSION, state_hash(handle.model), sha256_tensor(batches),
                 [b.name for b in blocks])
    hit = cache.get("expert-stats", key)
    if hit is not None:
        flat = load_file(str(hit / "stats.safetensors"))
        out = {}
        for b in blocks:
            st = LayerStats(b.name, b.num_experts, int(flat[f"{b.name}/tokens"].item()))
            st.t.update({k: flat[f"{b.name}/{k}"] for k in FIELDS})
            out[b.name] = st
        return out, True
    stats = collect(handle.model, arch, blocks, batches, ctx.progress)
    if cache.enabled:
        flat = {f"{n}/{k}": v.contiguous() for n, st in stats.items() for k, v in st.t.items()}
        flat.update({f"{n}/tokens": torch.tensor(st.tokens) for n, st in stats.items()})
        cache.put("expert-stats", key, lambda d: save_file(flat, str(d / "stats.safetensors")))
    return stats, False


def heatmap(stats: dict[str, LayerStats], digits: int = 4) -> dict:
    """Report data: per layer (rows) and expert (columns) token share, router-mass share, REAP saliency."""
    names = list(stats)

    def rows(fn):
        return [[round(float(v), digits) for v in fn(stats[n])] for n in names]

    return {"layers": names,
            "token_share": rows(lambda s: s.share("counts")),
            "router_mass_share": rows(lambda s: s.share("prob_mass")),
            "reap_saliency": rows(lambda s: s.reap),
            "tokens": [stats[n].tokens for n in names]}
