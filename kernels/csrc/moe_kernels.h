// MoE forward (top-k routing + SiLU-gated expert MLPs) on CUDA, with bf16, fp8 (e4m3, per-output-channel
// scales) or int4 (symmetric, group-wise scales) expert weights. One plain C++ entry point, called by the
// TensorRT plugin (kernels/plugins/moe_plugin.cpp) and by the torch extension (moe_torch_binding.cpp).
// The torch oracle is kernels/python/moe_ref.py; the layouts below are the same.
//
// Tensors (row-major, contiguous; T tokens, H hidden, I intermediate, E experts, k top_k):
//   hidden         bf16  [T, H]
//   router_logits  fp32  [T, E]          softmax in fp32, top-k, optional renormalization of the k weights
//   w_gate_up      [E, 2I, H]            rows [0, I) gate_proj, rows [I, 2I) up_proj (nn.Linear [out, in])
//   w_down         [E, H, I]
//       bf16: bf16 values.  fp8: e4m3 bytes.  int4: [E, out, in / 2] bytes, low nibble = even column,
//       nibble = q + 8, q in [-8, 7].
//   s_gate_up      fp32  [E, 2I, G1]     fp8: G1 = 1; int4: H % G1 == 0, group size H / G1; bf16: unused
//   s_down         fp32  [E, H, G2]      fp8: G2 = 1; int4: I % G2 == 0
//   out            bf16  [T, H]          every element written
// Dequantized weight = fp32 value * fp32 scale; products accumulate in fp32; the SiLU(gate) * up activation
// is rounded to bf16 between the two GEMMs (as a bf16 model does); the k expert outputs are summed in fp32 in
// top-k slot order, so the result does not depend on thread scheduling.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

enum class CompressorMoeWeightFormat : int32_t
{
    kBF16 = 0,
    kFP8 = 1,
    kINT4 = 2,
};

struct CompressorMoeShape
{
    int64_t tokens{0};          // T (0 is allowed: nothing to do)
    int32_t hidden{0};          // H
    int32_t inter{0};           // I
    int32_t num_experts{0};     // E
    int32_t top_k{0};           // k, 1 <= k <= min(E, kCompressorMoeMaxTopK)
    int32_t groups_gate_up{1};  // G1 (scale columns of w_gate_up)
    int32_t groups_down{1};     // G2 (scale columns of w_down)
    CompressorMoeWeightFormat weight_format{CompressorMoeWeightFormat::kBF16};
    bool normalize{true};       // divide the k routing weights by their sum (Mixtral; Qwen-MoE norm_topk_prob)
};

constexpr int32_t kCompressorMoeMaxTopK = 32;

// nullptr when the shape is supported, else a static message saying what is wrong.
char const* compressor_moe_check(CompressorMoeShape const& shape);

// Scratch bytes compressor_moe_forward needs for this shape (routing tables, the bf16 activation
// [T*k, I] and the fp32 expert outputs [T*k, H]). Monotone in tokens: the size for the largest T serves all.
size_t compressor_moe_workspace_size(CompressorMoeShape const& shape);

// Enqueues the whole forward on `stream`; nothing is synchronized and no memory is allocated.
// Returns cudaErrorInvalidValue for an unsupported shape or a too small workspace (nothing enqueued),
// otherwise the launch status. Scale pointers may be null for bf16 weights.
cudaError_t compressor_moe_forward(CompressorMoeShape const& shape, void const* hidden, float const* router_logits,
    void const* w_gate_up, void const* w_down, float const* s_gate_up, float const* s_down, void* out,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);
