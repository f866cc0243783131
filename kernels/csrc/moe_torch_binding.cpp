// torch extension over compressor_moe_forward, for the GPU check (scripts/gpu_check_moe.py); built at run time
// by kernels/python/moe_ext.py. Not part of the TensorRT plugin and not compiled in CI (needs torch's CUDA headers).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels.h"

namespace
{

void checkCuda(torch::Tensor const& t, char const* name)
{
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

bool isByteType(torch::Tensor const& t)
{
    auto const d = t.scalar_type();
    return d == torch::kUInt8 || d == torch::kInt8 || d == torch::kFloat8_e4m3fn;
}

} // namespace

// hidden bf16 [T, H]; router_logits fp32 [T, E]; weights and scales as in moe_kernels.h.
// weight_format: 0 bf16, 1 fp8, 2 int4. `out` (bf16 [T, H]) is written in place when given, else allocated.
torch::Tensor moeForward(torch::Tensor hidden, torch::Tensor routerLogits, torch::Tensor wGateUp, torch::Tensor wDown,
    int64_t topK, bool normalize, int64_t weightFormat, c10::optional<torch::Tensor> sGateUp,
    c10::optional<torch::Tensor> sDown, c10::optional<torch::Tensor> out)
{
    checkCuda(hidden, "hidden");
    checkCuda(routerLogits, "router_logits");
    checkCuda(wGateUp, "w_gate_up");
    checkCuda(wDown, "w_down");
    TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == torch::kBFloat16, "hidden must be bf16 [T, H]");
    TORCH_CHECK(routerLogits.dim() == 2 && routerLogits.scalar_type() == torch::kFloat32
            && routerLogits.size(0) == hidden.size(0),
        "router_logits must be float32 [T, E]");
    TORCH_CHECK(wGateUp.dim() == 3 && wDown.dim() == 3, "expert weights must be 3-D [E, out, in]");
    TORCH_CHECK(weightFormat >= 0 && weightFormat <= 2, "weight_format must be 0 (bf16), 1 (fp8) or 2 (int4)");
    auto const fmt = static_cast<CompressorMoeWeightFormat>(weightFormat);
    bool const quantized = fmt != CompressorMoeWeightFormat::kBF16;
    if (quantized)
    {
        TORCH_CHECK(isByteType(wGateUp) && isByteType(wDown), "fp8/int4 weights must be 1-byte tensors");
    }
    else
    {
        TORCH_CHECK(wGateUp.scalar_type() == torch::kBFloat16 && wDown.scalar_type() == torch::kBFloat16,
            "bf16 weights must be bf16");
    }

    CompressorMoeShape shape;
    shape.tokens = hidden.size(0);
    shape.hidden = static_cast<int32_t>(hidden.size(1));
    shape.num_experts = static_cast<int32_t>(routerLogits.size(1));
    shape.inter = static_cast<int32_t>(wGateUp.size(1) / 2);
    shape.top_k = static_cast<int32_t>(topK);
    shape.weight_format = fmt;
    shape.normalize = normalize;
    int64_t const packing = fmt == CompressorMoeWeightFormat::kINT4 ? 2 : 1;
    TORCH_CHECK(wGateUp.size(0) == shape.num_experts && wGateUp.size(1) == 2 * shape.inter
            && wGateUp.size(2) * packing == shape.hidden,
        "w_gate_up must be [E, 2I, H] (int4: [E, 2I, H/2])");
    TORCH_CHECK(wDown.size(0) == shape.num_experts && wDown.size(1) == shape.hidden
            && wDown.size(2) * packing == shape.inter,
        "w_down must be [E, H, I] (int4: [E, H, I/2])");

    float const* sGu = nullptr;
    float const* sDn = nullptr;
    if (quantized)
    {
        TORCH_CHECK(sGateUp.has_value() && sDown.has_value(), "fp8/int4 weights need s_gate_up and s_down");
        checkCuda(*sGateUp, "s_gate_up");
        checkCuda(*sDown, "s_down");
        TORCH_CHECK(sGateUp->scalar_type() == torch::kFloat32 && sDown->scalar_type() == torch::kFloat32,
            "scales must be float32");
        TORCH_CHECK(sGateUp->dim() == 3 && sGateUp->size(0) == shape.num_experts
                && sGateUp->size(1) == 2 * shape.inter,
            "s_gate_up must be [E, 2I, G1]");
        TORCH_CHECK(sDown->dim() == 3 && sDown->size(0) == shape.num_experts && sDown->size(1) == shape.hidden,
            "s_down must be [E, H, G2]");
        shape.groups_gate_up = static_cast<int32_t>(sGateUp->size(2));
        shape.groups_down = static_cast<int32_t>(sDown->size(2));
        sGu = sGateUp->data_ptr<float>();
        sDn = sDown->data_ptr<float>();
    }
    char const* problem = compressor_moe_check(shape);
    TORCH_CHECK(problem == nullptr, "MoE: ", problem ? problem : "");

    torch::Tensor result = out.has_value() ? *out : torch::empty_like(hidden);
    checkCuda(result, "out");
    TORCH_CHECK(result.sizes() == hidden.sizes() && result.scalar_type() == torch::kBFloat16,
        "out must be bf16 [T, H]");

    c10::cuda::CUDAGuard const guard(hidden.device());
    size_t const wsBytes = compressor_moe_workspace_size(shape);
    torch::Tensor workspace = torch::empty({static_cast<int64_t>(wsBytes)}, hidden.options().dtype(torch::kUInt8));
    cudaError_t const err = compressor_moe_forward(shape, hidden.data_ptr(), routerLogits.data_ptr<float>(),
        wGateUp.data_ptr(), wDown.data_ptr(), sGu, sDn, result.data_ptr(), workspace.data_ptr(), wsBytes,
        c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "compressor_moe_forward failed: ", cudaGetErrorString(err));
    return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("moe_forward", &moeForward, "MoE forward (routing + expert MLPs), see kernels/csrc/moe_kernels.h",
        pybind11::arg("hidden"), pybind11::arg("router_logits"), pybind11::arg("w_gate_up"), pybind11::arg("w_down"),
        pybind11::arg("top_k"), pybind11::arg("normalize"), pybind11::arg("weight_format"),
        pybind11::arg("s_gate_up") = pybind11::none(), pybind11::arg("s_down") = pybind11::none(),
        pybind11::arg("out") = pybind11::none());
}
