"""The TensorRT `MoE` plugin node in exported graphs (tensorrt flavour): TensorRT has no MoE layer.

Inside `plugin_blocks(model)`, every Mixtral-style sparse MoE block (a router `gate` with a [E, H] weight, an
`experts` module, no shared expert) computes its routed experts through the custom op `compressor::moe_plugin`,
whose ONNX translation is one node with the contract of kernels/plugins/moe_plugin.h:

    MoE (domain compressor; plugin_namespace "compressor", plugin_version "1")
      inputs  hidden BF16 [T, H], router_logits FLOAT [T, E], w_gate_up [E, 2I, H], w_down [E, H, I]
              (+ s_gate_up FLOAT [E, 2I, G1], s_down FLOAT [E, H, G2] for fp8 / int4)
      attrs   top_k, num_experts, hidden, inter, weight_format (0 bf16, 1 fp8, 2 int4), normalize
      output  BF16 [T, H]

The weights are ours: unfused QuantLinear experts travel as their packed INT4 bytes (as INT8) or FP8 codes with
their scales; fused float experts as BF16. In torch the op runs the plugin's reference (compressor.kernels.
moe_ref), so the traced model computes what the plugin computes.
"""

from __future__ import annotations

from contextlib import contextmanager

_FORMAT_IDS = {"bf16": 0, "fp8": 1, "int4": 2}
_OP = None


def _op():
    """Register `compressor::moe_plugin` once (torch.library), with a fake kernel for tracing."""
    global _OP
    if _OP is not None:
        return _OP
    import torch

    from compressor.kernels.moe_ref import moe_reference

    names = {v: k for k, v in _FORMAT_IDS.items()}

    schema = ("(Tensor hidden, Tensor router_logits, Tensor w_gate_up, Tensor w_down, Tensor? s_gate_up, "
              "Tensor? s_down, int top_k, int num_experts, int hidden_size, int inter, int weight_format, "
              "bool normalize) -> Tensor")

    @torch.library.custom_op("compressor::moe_plugin", mutates_args=(), schema=schema)
    def moe_plugin(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   s_gate_up: torch.Tensor | None, s_down: torch.Tensor | None, top_k: int, num_experts: int,
                   hidden_size: int, inter: int, weight_format: int, normalize: bool) -> torch.Tensor:
        return moe_reference(hidden, router_logits, w_gate_up, w_down, top_k, normalize, names[weight_format],
                             s_gate_up, s_down, compute_dtype=torch.float32)

    @moe_plugin.register_fake
    def _(hidden, router_logits, w_gate_up, w_down, s_gate_up, s_down, top_k, num_experts, hidden_size, inter,
          weight_format, normalize):
        return torch.empty_like(hidden)

    _OP = torch.ops.compressor.moe_plugin.default
    return _OP


def _schema():
    """The node's OpSchema (inputs, types, attributes), which ONNX Script needs to emit a non-standard op."""
    from onnx.defs import OpSchema

    P, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    ints = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in
            ("top_k", "num_experts", "hidden", "inter", "weight_format", "normalize")]
    strings = [OpSchema.Attribute(a, OpSchema.AttrType.STRING, "") for a in ("plugin_namespace", "plugin_version")]
    return OpSchema(
        "MoE", "compressor", 1,
        inputs=[P("hidden_states", "T"), P("router_logits", "F"), P("w_gate_up", "W"), P("w_down", "W"),
                P("s_gate_up", "F", param_option=opt), P("s_down", "F", param_option=opt)],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(bfloat16)"], "activations"), ("F", ["tensor(float)"], "logits, scales"),
                          ("W", ["tensor(bfloat16)", "tensor(float8e4m3fn)", "tensor(int8)"], "expert weights")],
        attributes=ints + strings)


def translation_table() -> dict:
    """{torch op: ONNX Script builder} for torch.onnx.export(custom_translation_table=...)."""
    from onnxscript import values

    moe_node = values.Op(values.Opset("compressor", 1), "MoE", _schema())

    def moe(hidden, router_logits, w_gate_up, w_down, s_gate_up=None, s_down=None, top_k: int = 2,
            num_experts: int = 0, hidden_size: int = 0, inter: int = 0, weight_format: int = 0,
            normalize: bool = True):
        ins = [hidden, router_logits, w_gate_up, w_down]
        if s_gate_up is not None:
            ins += [s_gate_up, s_down]
        return moe_node(*ins, top_k=top_k, num_experts=num_experts, hidden=hidden_size, inter=inter,
                                    weight_format=weight_format, normalize=int(normalize),
                                    plugin_namespace="compressor", plugin_version="1")

    return {_op(): moe}


def _is_block(mod) -> bool:
    gate = getattr(mod, "gate", None)
    return (hasattr(mod, "experts") and getattr(gate, "weight", None) is not None and gate.weight.dim() == 2
            and not hasattr(mod, "shared_expert"))


def _stacked(block) -> dict:
    import torch

    from compressor.kernels.moe_ref import stack_linear_experts
    from compressor.moe import LinearExperts

    ex = block.experts
    if isinstance(ex, LinearExperts):
        if any(getattr(lin, "activations", None) for lin in ex.modules()):
            raise ValueError("the MoE plugin takes weight-only experts (BF16 activations); these quantize their "
                             "activations: set moe_plugin: false to export them as standard ops")
        w = stack_linear_experts(ex)
    else:  # fused transformers experts: [E, 2I, H] (gate rows first) and [E, H, I]
        if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False) or not getattr(ex, "has_gate", True):
            raise ValueError(f"{type(ex).__name__}: the MoE plugin takes gated, untransposed, bias-free experts")
        w = {"weight_format": "bf16", "w_gate_up": ex.gate_up_proj.detach(), "w_down": ex.down_proj.detach(),
             "s_gate_up": None, "s_down": None}
    if w["weight_format"] == "bf16":
        w["w_gate_up"], w["w_down"] = w["w_gate_up"].to(torch.bfloat16), w["w_down"].to(torch.bfloat16)
    elif w["weight_format"] == "int4":  # uint8 is not allowed inside a TensorRT network: the same bytes as INT8
        w["w_gate_up"], w["w_down"] = w["w_gate_up"].view(torch.int8), w["w_down"].view(torch.int8)
    return w


def _plugin_forward(self, hidden_states):
    import torch
    import torch.nn.functional as F

    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = F.linear(x, self.gate.weight).float()
    y = _op()(x.to(torch.bfloat16), logits, self.plugin_w_gate_up, self.plugin_w_down, self.plugin_s_gate_up,
              self.plugin_s_down, self.plugin_top_k, self.plugin_w_gate_up.shape[0], shape[-1],
              self.plugin_w_gate_up.shape[1] // 2, _FORMAT_IDS[self.plugin_format], self.plugin_normalize)
    return y.to(hidden_states.dtype).reshape(shape)


@contextmanager
def plugin_blocks(model):
    """Route every plugin-eligible MoE block of `model` through the plugin op inside the block.
    Yields the qualified names of the blocks (their expert layers are not in the graph)."""
    blocks = {n: m for n, m in model.named_modules() if _is_block(m)}
    cfg = model.config
    added = ("plugin_w_gate_up", "plugin_w_down", "plugin_s_gate_up", "plugin_s_down")
    try:
        for name, b in blocks.items():
            try:
                w = _stacked(b)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            for k in added:
                b.register_buffer(k, w[k.removeprefix("plugin_")], persistent=False)
            b.plugin_format = w["weight_format"]
            b.plugin_top_k = int(getattr(b, "top_k", None) or cfg.num_experts_per_tok)
            b.plugin_normalize = bool(getattr(cfg, "norm_topk_prob", True))
            b.forward = _plugin_forward.__get__(b)
        yield list(blocks)
    finally:
        for b in blocks.values():
            for k in added:
                b._buffers.pop(k, None)
            for k in ("plugin_format", "plugin_top_k", "plugin_normalize", "forward"):
                b.__dict__.pop(k, None)
