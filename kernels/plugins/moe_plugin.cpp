// TensorRT IPluginV3 wrapper over compressor_moe_forward; the ONNX node contract is at the top of moe_plugin.h.
#include "moe_plugin.h"

#include "moe_kernels.h"

#include <atomic>
#include <cstdio>
#include <exception>
#include <limits>
#include <string>

using namespace nvinfer1;

namespace compressor
{
namespace trt
{
namespace
{

constexpr char const* kPluginName = "MoE";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "compressor";

enum InputIndex : int32_t
{
    kHidden = 0,
    kRouterLogits = 1,
    kWGateUp = 2,
    kWDown = 3,
    kSGateUp = 4,
    kSDown = 5,
};

// The one place the fields are named: the creator advertises them, createPlugin parses them and
// getFieldsToSerialize writes them (engine deserialization calls createPlugin with the same fields).
struct FieldSpec
{
    char const* name;
    int32_t MoeFields::*member;
    bool required; // normalize defaults to 1, Mixtral's routing
};

constexpr FieldSpec kMoeFieldSpecs[] = {
    {"top_k", &MoeFields::top_k, true},
    {"num_experts", &MoeFields::num_experts, true},
    {"hidden", &MoeFields::hidden, true},
    {"inter", &MoeFields::inter, true},
    {"weight_format", &MoeFields::weight_format, true},
    {"normalize", &MoeFields::normalize, false},
};
constexpr int32_t kNbFields = static_cast<int32_t>(sizeof(kMoeFieldSpecs) / sizeof(kMoeFieldSpecs[0]));

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void log(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const line = std::string("compressor::MoE plugin: ") + message;
        ILoggerFinder* finder = gLoggerFinder.load();
        ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
        {
            logger->log(severity, line.c_str());
        }
        else
        {
            std::fprintf(stderr, "%s\n", line.c_str()); // loaded without setLoggerFinder (e.g. dlopen by hand)
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    log(ILogger::Severity::kERROR, message);
}

// ONNX INT attributes are int64; accept any integer field type and range-check into int32.
bool readInt(PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    int64_t v = 0;
    switch (field.type)
    {
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(field.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(field.data); break;
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(field.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(field.data); break;
    default: return false;
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    {
        return false;
    }
    value = static_cast<int32_t>(v);
    return true;
}

CompressorMoeShape shapeOf(MoeFields const& f, int64_t tokens, int32_t groupsGateUp, int32_t groupsDown)
{
    CompressorMoeShape s;
    s.tokens = tokens;
    s.hidden = f.hidden;
    s.inter = f.inter;
    s.num_experts = f.num_experts;
    s.top_k = f.top_k;
    s.groups_gate_up = groupsGateUp;
    s.groups_down = groupsDown;
    s.weight_format = static_cast<CompressorMoeWeightFormat>(f.weight_format);
    s.normalize = f.normalize != 0;
    return s;
}

// Empty when the fields describe a block the kernels support.
std::string checkFields(MoeFields const& f)
{
    if (f.weight_format < 0 || f.weight_format > 2)
    {
        return "weight_format must be 0 (bf16), 1 (fp8) or 2 (int4), got " + std::to_string(f.weight_format);
    }
    if (f.normalize != 0 && f.normalize != 1)
    {
        return "normalize must be 0 or 1, got " + std::to_string(f.normalize);
    }
    char const* problem = compressor_moe_check(shapeOf(f, 0, 1, 1));
    return problem ? std::string(problem) : std::string();
}

Dims const& dimsOf(PluginTensorDesc const& d)
{
    return d.dims;
}

Dims const& dimsOf(DynamicPluginTensorDesc const& d)
{
    return d.desc.dims;
}

// Tokens = product of all dims of hidden but the last.
int64_t tokensOf(Dims const& hidden)
{
    int64_t t = 1;
    for (int32_t i = 0; i + 1 < hidden.nbDims; ++i)
    {
        t *= hidden.d[i];
    }
    return t;
}

} // namespace

// ---------------------------------------------------------------------------------------------- MoePlugin

MoePlugin::MoePlugin(MoeFields const& fields)
    : mFields(fields)
{
}

IPluginCapability* MoePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MoePlugin::clone() noexcept
{
    try
    {
        return new MoePlugin(mFields);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* MoePlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MoePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MoePlugin::expectedInputs() const noexcept
{
    return mFields.weight_format == static_cast<int32_t>(CompressorMoeWeightFormat::kBF16) ? 4 : 6;
}

std::string MoePlugin::checkDims(Dims const* dims, int32_t nbInputs) const
{
    if (nbInputs != expectedInputs())
    {
        return "expected " + std::to_string(expectedInputs()) + " inputs for weight_format "
            + std::to_string(mFields.weight_format) + ", got " + std::to_string(nbInputs);
    }
    auto is = [](int64_t dim, int64_t want) { return dim < 0 || dim == want; }; // -1: not known yet
    int64_t const e = mFields.num_experts;
    int64_t const h = mFields.hidden;
    int64_t const i = mFields.inter;
    int64_t const packing = mFields.weight_format == static_cast<int32_t>(CompressorMoeWeightFormat::kINT4) ? 2 : 1;
    Dims const& x = dims[kHidden];
    Dims const& logits = dims[kRouterLogits];
    if (x.nbDims < 1 || !is(x.d[x.nbDims - 1], h))
    {
        return "hidden must be [..., hidden=" + std::to_string(h) + "]";
    }
    if (logits.nbDims != x.nbDims || !is(logits.d[logits.nbDims - 1], e))
    {
        return "router_logits must be [..., num_experts=" + std::to_string(e) + "] with hidden's leading dims";
    }
    for (int32_t k = 0; k + 1 < x.nbDims; ++k)
    {
        if (x.d[k] >= 0 && logits.d[k] >= 0 && x.d[k] != logits.d[k])
        {
            return "hidden and router_logits disagree on leading dim " + std::to_string(k);
        }
    }
    Dims const& gu = dims[kWGateUp];
    Dims const& dn = dims[kWDown];
    if (gu.nbDims != 3 || !is(gu.d[0], e) || !is(gu.d[1], 2 * i) || !is(gu.d[2], h / packing))
    {
        return "w_gate_up must be [num_experts, 2*inter, hidden" + std::string(packing == 2 ? "/2]" : "]");
    }
    if (dn.nbDims != 3 || !is(dn.d[0], e) || !is(dn.d[1], h) || !is(dn.d[2], i / packing))
    {
        return "w_down must be [num_experts, hidden, inter" + std::string(packing == 2 ? "/2]" : "]");
    }
    if (nbInputs == 4)
    {
        return {};
    }
    Dims const& sgu = dims[kSGateUp];
    Dims const& sdn = dims[kSDown];
    if (sgu.nbDims != 3 || !is(sgu.d[0], e) || !is(sgu.d[1], 2 * i) || sdn.nbDims != 3 || !is(sdn.d[0], e)
        || !is(sdn.d[1], h))
    {
        return "scales must be s_gate_up [num_experts, 2*inter, G1] and s_down [num_experts, hidden, G2]";
    }
    if (sgu.d[2] >= 0 && sdn.d[2] >= 0)
    {
        char const* problem = compressor_moe_check(
            shapeOf(mFields, 0, static_cast<int32_t>(sgu.d[2]), static_cast<int32_t>(sdn.d[2])));
        if (problem)
        {
            return problem;
        }
    }
    return {};
}

int32_t MoePlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t MoePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* /* inputTypes */, int32_t /* nbInputs */) const noexcept
{
    if (nbOutputs != 1)
    {
        logError("one output expected");
        return -1;
    }
    outputTypes[0] = DataType::kBF16;
    return 0;
}

int32_t MoePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /* shapeInputs */,
    int32_t /* nbShapeInputs */, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /* exprBuilder */) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != 1)
    {
        logError("expected " + std::to_string(expectedInputs()) + " inputs and 1 output, got "
            + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return -1;
    }
    outputs[0] = inputs[kHidden]; // [..., H], same as hidden
    return 0;
}

bool MoePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t /* nbOutputs */) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == nbInputs) // the output
    {
        return d.type == DataType::kBF16;
    }
    switch (pos)
    {
    case kHidden: return d.type == DataType::kBF16;
    case kRouterLogits: return d.type == DataType::kFLOAT;
    case kWGateUp:
    case kWDown:
        switch (static_cast<CompressorMoeWeightFormat>(mFields.weight_format))
        {
        case CompressorMoeWeightFormat::kBF16: return d.type == DataType::kBF16;
        case CompressorMoeWeightFormat::kFP8: return d.type == DataType::kFP8 || d.type == DataType::kINT8;
        case CompressorMoeWeightFormat::kINT4: return d.type == DataType::kINT8;
        }
        return false;
    case kSGateUp:
    case kSDown: return d.type == DataType::kFLOAT;
    default: return false;
    }
}

int32_t MoePlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
    DynamicPluginTensorDesc const* /* out */, int32_t /* nbOutputs */) noexcept
{
    return validate("configurePlugin", in, nbInputs);
}

size_t MoePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /* nbInputs */,
    DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    // Sized for the profile's largest token count; the size does not depend on the scale groups.
    return compressor_moe_workspace_size(shapeOf(mFields, tokensOf(inputs[kHidden].max), 1, 1));
}

int32_t MoePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /* out */, int32_t /* nbOutputs */) noexcept
{
    return validate("onShapeChange", in, nbInputs);
}

template <typename Desc>
int32_t MoePlugin::validate(char const* where, Desc const* descs, int32_t nbInputs) const noexcept
{
    try
    {
        std::vector<Dims> dims;
        for (int32_t k = 0; k < nbInputs; ++k)
        {
            dims.push_back(dimsOf(descs[k]));
        }
        std::string const problem = checkDims(dims.data(), nbInputs);
        if (problem.empty())
        {
            return 0;
        }
        logError(std::string(where) + ": " + problem);
    }
    catch (std::exception const& e)
    {
        logError(std::string(where) + " failed: " + e.what());
    }
    return -1;
}

int32_t MoePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /* outputDesc */,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    bool const quantized = expectedInputs() == 6;
    int32_t const g1 = quantized ? static_cast<int32_t>(inputDesc[kSGateUp].dims.d[2]) : 1;
    int32_t const g2 = quantized ? static_cast<int32_t>(inputDesc[kSDown].dims.d[2]) : 1;
    CompressorMoeShape const shape = shapeOf(mFields, tokensOf(inputDesc[kHidden].dims), g1, g2);
    auto const* logits = static_cast<float const*>(inputs[kRouterLogits]);
    auto const* sGateUp = quantized ? static_cast<float const*>(inputs[kSGateUp]) : nullptr;
    auto const* sDown = quantized ? static_cast<float const*>(inputs[kSDown]) : nullptr;
    cudaError_t const err = compressor_moe_forward(shape, inputs[kHidden], logits, inputs[kWGateUp], inputs[kWDown],
        sGateUp, sDown, outputs[0], workspace, compressor_moe_workspace_size(shape), stream);
    if (err != cudaSuccess)
    {
        logError(std::string("enqueue failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

IPluginV3* MoePlugin::attachToContext(IPluginResourceContext* /* context */) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* MoePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.clear();
        for (FieldSpec const& spec : kMoeFieldSpecs)
        {
            mSerialized.emplace_back(spec.name, &(mFields.*spec.member), PluginFieldType::kINT32, 1);
        }
        mSerializedFc.nbFields = static_cast<int32_t>(mSerialized.size());
        mSerializedFc.fields = mSerialized.data();
        return &mSerializedFc;
    }
    catch (std::exception const& e)
    {
        logError(std::string("getFieldsToSerialize failed: ") + e.what());
    }
    return nullptr;
}

// ---------------------------------------------------------------------------------------- MoePluginCreator

MoePluginCreator::MoePluginCreator()
{
    for (FieldSpec const& spec : kMoeFieldSpecs)
    {
        mFieldNames.emplace_back(spec.name, nullptr, PluginFieldType::kINT32, 1);
    }
    mFieldNamesFc.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldNamesFc.fields = mFieldNames.data();
}

IPluginV3* MoePluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /* phase */) noexcept
{
    try
    {
        std::string const node = name ? name : "<unnamed>";
        MoeFields fields;
        bool seen[kNbFields] = {};
        for (int32_t k = 0; fc != nullptr && k < fc->nbFields; ++k)
        {
            PluginField const& f = fc->fields[k];
            int32_t s = 0;
            while (s < kNbFields && std::string(kMoeFieldSpecs[s].name) != (f.name ? f.name : ""))
            {
                ++s;
            }
            if (s == kNbFields)
            {
                std::string const field = f.name ? f.name : "<null>";
                log(ILogger::Severity::kWARNING, node + ": unknown field " + field + " ignored");
                continue;
            }
            if (!readInt(f, fields.*kMoeFieldSpecs[s].member))
            {
                logError(node + ": field " + kMoeFieldSpecs[s].name + " must be one int32 value");
                return nullptr;
            }
            seen[s] = true;
        }
        for (int32_t s = 0; s < kNbFields; ++s)
        {
            if (kMoeFieldSpecs[s].required && !seen[s])
            {
                logError(node + ": missing field " + kMoeFieldSpecs[s].name);
                return nullptr;
            }
        }
        std::string const problem = checkFields(fields);
        if (!problem.empty())
        {
            logError(node + ": " + problem);
            return nullptr;
        }
        return new MoePlugin(fields);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

PluginFieldCollection const* MoePluginCreator::getFieldNames() noexcept
{
    return &mFieldNamesFc;
}

char const* MoePluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MoePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace trt
} // namespace compressor

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    compressor::trt::gLoggerFinder.store(finder);
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static compressor::trt::MoePluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
