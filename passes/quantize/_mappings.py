"""Which layers share an input that can be rescaled (SmoothQuant, AWQ): a `Mapping` is a module whose output
feeds the listed Linear layers and nothing else, so dividing its output channels by s and multiplying the
Linears' input columns by s leaves the block's function unchanged.

Llama-style decoder blocks (Llama, Mistral, Qwen2/3, SmolLM2, Mixtral-style MoE after unfusing experts):
  input_layernorm          -> q_proj, k_proj, v_proj
  self_attn.v_proj         -> self_attn.o_proj       (only without grouped KV heads: shapes must match)
  post_attention_layernorm -> gate_proj, up_proj     (MoE: every expert's, and the router's columns)
  mlp.up_proj              -> mlp.down_proj          (MoE: per expert)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Mapping:
    prev_name: str
    prev: nn.Module
    linears: list[tuple[str, nn.Module]]
    # Modules that read the same input but are not quantized (MoE routers): their input columns get the
    # same factor so that the block's function is unchanged.
    passengers: list[tuple[str, nn.Module]] = field(default_factory=list)


def _get(mod: nn.Module, path: str):
    try:
        return mod.get_submodule(path)
    except AttributeError:
        return None


def block_mappings(block: nn.Module, prefix: str) -> list[Mapping]:
    """Mappings of one decoder block; raises TypeError for layouts it does not know."""
    attn, mlp = _get(block, "self_attn"), _get(block, "mlp")
    ln1, ln2 = _get(block, "input_layernorm"), _get(block, "post_attention_layernorm")
    if attn is None or mlp is None or ln1 is None or ln2 is None:
        raise TypeError(f"{prefix}: not a Llama-style decoder block (self_attn, mlp, input_layernorm, "
                        "post_attention_layernorm); no smoothing mappings known for it")
    p = f"{prefix}."
    out = [Mapping(p + "input_layernorm", ln1, [(f"{p}self_attn.{n}", getattr(attn, n))
                                               for n in ("q_proj", "k_proj", "v_proj")])]
    v, o = attn.v_proj, attn.o_proj
    if isinstance(v, nn.Linear) and v.out_features == o.in_features:
        out.append(Mapping(f"{p}self_attn.v_proj", v, [(f"{p}self_attn.o_proj", o)]))
    experts = _get(mlp, "experts")
    if experts is not None:
        if not isinstance(experts, nn.ModuleList):
            raise TypeError(f"{prefix}.mlp.experts: fused experts; split them first (compressor.moe.unfuse_experts)")
        lins = [(f"{p}mlp.experts.{e}.{n}", getattr(x, n)) for e, x in enumerate(experts) for n in ("gate_proj", "up_proj")]
        router = _get(mlp, "gate")
        out.append(Mapping(p + "post_attention_layernorm", ln2, lins,
                           [(f"{p}mlp.gate", router)] if router is not None else []))
        out += [Mapping(f"{p}mlp.experts.{e}.up_proj", x.up_proj, [(f"{p}mlp.experts.{e}.down_proj", x.down_proj)])
                for e, x in enumerate(experts)]
        shared = _get(mlp, "shared_expert")
        if shared is not None:
            raise TypeError(f"{prefix}: MoE blocks with a shared expert are not supported by smoothing yet")
    else:
        out.append(Mapping(p + "post_attention_layernorm", ln2, [(f"{p}mlp.gate_proj", mlp.gate_proj),
                                                                  (f"{p}mlp.up_proj", mlp.up_proj)]))
        out.append(Mapping(f"{p}mlp.up_proj", mlp.up_proj, [(f"{p}mlp.down_proj", mlp.down_proj)]))
    return out
