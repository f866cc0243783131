// TensorRT plugin `MoE` (namespace "compressor", version "1"): a Mixtral / Qwen-MoE sparse MoE block --
// softmax top-k routing and SiLU-gated expert MLPs -- with bf16, fp8 or int4 expert weights. TensorRT has no
// MoE layer; the kernels are kernels/csrc/moe_kernels.cu, the torch oracle kernels/python/moe_ref.py.
//
// ============================== ONNX node contract (what the exporter emits) ==============================
//   op_type "MoE", domain "compressor"
//   attributes (all INT; TensorRT's ONNX parser hands them to the creator as plugin fields):
//     plugin_namespace = "compressor" (STRING), plugin_version = "1" (STRING)   -- read by the parser itself
//     top_k          k, 1 <= k <= min(num_experts, 32)
//     num_experts    E
//     hidden         H
//     inter          I   (expert intermediate size)
//     weight_format  0 = bf16, 1 = fp8 (e4m3, one scale per output channel), 2 = int4 (symmetric, per group)
//     normalize      1 = divide the k routing weights by their sum (Mixtral; Qwen-MoE norm_topk_prob=True),
//                    0 = keep the softmax probabilities (Qwen-MoE norm_topk_prob=False)
//   inputs (row-major; [...] = any leading dims, the same for hidden, router_logits and the output):
//     0 hidden         BFLOAT16 [..., H]
//     1 router_logits  FLOAT    [..., E]        (the router's Linear output; cast to float32 before the node)
//     2 w_gate_up      [E, 2I, H]  rows [0, I) = gate_proj, [I, 2I) = up_proj, each nn.Linear [out, in]
//                        bf16: BFLOAT16
//                        fp8:  FLOAT8E4M3FN, or its bytes as INT8
//                        int4: INT8 [E, 2I, H/2], the uint8 packed bytes reinterpreted (low nibble = even
//                              column, nibble = q + 8); uint8 is not allowed inside a TensorRT network
//     3 w_down         [E, H, I]   same formats (int4: INT8 [E, H, I/2])
//     4 s_gate_up      FLOAT [E, 2I, G1]   fp8: G1 = 1; int4: group size H / G1   (absent for bf16)
//     5 s_down         FLOAT [E, H, G2]    fp8: G2 = 1; int4: group size I / G2   (absent for bf16)
//   The node has exactly 4 inputs for bf16 and 6 for fp8 / int4. Weights and scales are inputs (initializers
//   in the graph), not fields: they stay in the engine as constants, the plugin stays small, and one node
//   shape serves every format.
//   output 0  BFLOAT16 [..., H]
//   Per expert, the tensors are QuantLinear's weight_packed / weight_scale stacked over experts
//   (compressor.kernels.moe_ref.stack_linear_experts builds them).
// ===========================================================================================================
//
// The shared library exports `setLoggerFinder` and `getCreators` (trtexec --dynamicPlugins=libcompressor_moe_plugin.so,
// IPluginRegistry::loadLibrary). Every method is noexcept; failures are logged through the logger TensorRT
// provides and reported as a non-zero status or a null pointer.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace compressor
{
namespace trt
{

// The node attributes. `kMoeFieldSpecs` in moe_plugin.cpp is the one table that names them for the creator,
// for parsing and for serialization.
struct MoeFields
{
    int32_t top_k{0};
    int32_t num_experts{0};
    int32_t hidden{0};
    int32_t inter{0};
    int32_t weight_format{0};
    int32_t normalize{1};
};

class MoePlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuild,
                  public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit MoePlugin(MoeFields const& fields);
    ~MoePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    int32_t expectedInputs() const noexcept;
    // Empty when the input dims agree with the fields (unknown dims, -1, pass), else what is wrong.
    std::string checkDims(nvinfer1::Dims const* dims, int32_t nbInputs) const;
    // checkDims on the inputs' dims, logged with `where`; 0 or -1 as configurePlugin / onShapeChange return.
    template <typename Desc>
    int32_t validate(char const* where, Desc const* descs, int32_t nbInputs) const noexcept;

    MoeFields mFields;
    std::vector<nvinfer1::PluginField> mSerialized; // point into mFields
    nvinfer1::PluginFieldCollection mSerializedFc{};
};

class MoePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    MoePluginCreator();
    ~MoePluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldNamesFc{};
};

} // namespace trt
} // namespace compressor

// TENSORRTAPI is empty outside TensorRT's own build, so the two entry points are exported here; the CMake
// build hides every other symbol.
#if defined(_MSC_VER)
#define COMPRESSOR_PLUGIN_API __declspec(dllexport)
#else
#define COMPRESSOR_PLUGIN_API __attribute__((visibility("default")))
#endif

extern "C" COMPRESSOR_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
extern "C" COMPRESSOR_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
