// Host-only smoke test of libcompressor_moe_plugin.so through its two exported entry points and TensorRT's
// plugin interfaces, as TensorRT's builder would drive them: creator lookup, fields as the ONNX parser passes
// them (int64), serialization round trip, type/format negotiation, shape checks, workspace size, field errors.
// Needs TensorRT headers and a CUDA toolkit, not libnvinfer and not a GPU. Built by kernels/CMakeLists.txt.
#include "moe_plugin.h"

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

using namespace nvinfer1;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "moe_plugin_smoke: FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);                 \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

namespace
{

class CountingLogger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        std::printf("  [plugin log %d] %s\n", static_cast<int>(severity), msg);
        errors += severity <= Severity::kERROR ? 1 : 0;
    }
    int errors{0};
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    CountingLogger logger;
};

Dims makeDims(std::initializer_list<int64_t> values)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int32_t i = 0;
    for (int64_t v : values)
    {
        d.d[i++] = v;
    }
    return d;
}

void setDesc(DynamicPluginTensorDesc& io, DataType type, Dims dims, Dims min, Dims max)
{
    io.desc.type = type;
    io.desc.format = TensorFormat::kLINEAR;
    io.desc.dims = dims;
    io.min = min;
    io.opt = max;
    io.max = max;
}

int32_t fieldValue(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0)
        {
            return *static_cast<int32_t const*>(fc->fields[i].data);
        }
    }
    return -999;
}

} // namespace

int main()
{
    Finder finder;
    setLoggerFinder(&finder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    CHECK(nbCreators == 1 && creators[0] != nullptr);
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::string(creator->getPluginName()) == "MoE");
    CHECK(std::string(creator->getPluginVersion()) == "1");
    CHECK(std::string(creator->getPluginNamespace()) == "compressor");
    CHECK(creator->getFieldNames()->nbFields == 6);

    // int4, E = 8, H = 64, I = 128, k = 2; normalize left to its default (1). ONNX INT attributes are int64.
    int64_t topK = 2, experts = 8, hidden = 64, inter = 128, format = 2;
    std::vector<PluginField> fields = {{"top_k", &topK, PluginFieldType::kINT64, 1},
        {"num_experts", &experts, PluginFieldType::kINT64, 1}, {"hidden", &hidden, PluginFieldType::kINT64, 1},
        {"inter", &inter, PluginFieldType::kINT64, 1}, {"weight_format", &format, PluginFieldType::kINT64, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("moe0", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core && build && runtime && std::string(core->getPluginName()) == "MoE");
    CHECK(build->getNbOutputs() == 1);

    // Serialization round trip: what the engine stores recreates the same plugin.
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    CHECK(ser != nullptr && ser->nbFields == 6);
    CHECK(fieldValue(ser, "top_k") == 2 && fieldValue(ser, "inter") == 128 && fieldValue(ser, "normalize") == 1);
    IPluginV3* restored = creator->createPlugin("moe0", ser, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    auto* restoredRt
        = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser2 = restoredRt->getFieldsToSerialize();
    for (char const* name : {"top_k", "num_experts", "hidden", "inter", "weight_format", "normalize"})
    {
        CHECK(fieldValue(ser, name) == fieldValue(ser2, name));
    }

    // Inputs hidden, logits, w_gate_up, w_down, s_gate_up, s_down; output. Dynamic token dim, group size 16.
    DynamicPluginTensorDesc io[7];
    setDesc(io[0], DataType::kBF16, makeDims({-1, 64}), makeDims({1, 64}), makeDims({2048, 64}));
    setDesc(io[1], DataType::kFLOAT, makeDims({-1, 8}), makeDims({1, 8}), makeDims({2048, 8}));
    setDesc(io[2], DataType::kINT8, makeDims({8, 256, 32}), makeDims({8, 256, 32}), makeDims({8, 256, 32}));
    setDesc(io[3], DataType::kINT8, makeDims({8, 64, 64}), makeDims({8, 64, 64}), makeDims({8, 64, 64}));
    setDesc(io[4], DataType::kFLOAT, makeDims({8, 256, 4}), makeDims({8, 256, 4}), makeDims({8, 256, 4}));
    setDesc(io[5], DataType::kFLOAT, makeDims({8, 64, 8}), makeDims({8, 64, 8}), makeDims({8, 64, 8}));
    setDesc(io[6], DataType::kBF16, makeDims({-1, 64}), makeDims({1, 64}), makeDims({2048, 64}));
    for (int32_t pos = 0; pos < 7; ++pos)
    {
        CHECK(build->supportsFormatCombination(pos, io, 6, 1));
    }
    io[2].desc.type = DataType::kBF16; // int4 weights must be bytes
    CHECK(!build->supportsFormatCombination(2, io, 6, 1));
    io[2].desc.type = DataType::kINT8;
    io[0].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(0, io, 6, 1));
    io[0].desc.type = DataType::kBF16;

    DataType outType = DataType::kFLOAT;
    DataType const inTypes[6]
        = {DataType::kBF16, DataType::kFLOAT, DataType::kINT8, DataType::kINT8, DataType::kFLOAT, DataType::kFLOAT};
    CHECK(build->getOutputDataTypes(&outType, 1, inTypes, 6) == 0 && outType == DataType::kBF16);

    CHECK(build->configurePlugin(io, 6, io + 6, 1) == 0);
    size_t const ws = build->getWorkspaceSize(io, 6, io + 6, 1);
    size_t const pairs = 2048 * 2;
    CHECK(ws >= pairs * (128 * 2 + 64 * 4) && ws < 2 * pairs * (128 * 2 + 64 * 4) + (1 << 16));

    int const errorsBefore = finder.logger.errors;
    io[3].desc.dims = makeDims({8, 64, 128}); // int4 w_down not packed: rejected with a logged reason
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);
    io[3].desc.dims = makeDims({8, 64, 64});
    io[5].desc.dims = makeDims({8, 64, 5}); // 5 groups do not divide inter = 128
    CHECK(build->configurePlugin(io, 6, io + 6, 1) != 0);
    io[5].desc.dims = makeDims({8, 64, 8});
    CHECK(build->configurePlugin(io, 4, io + 6, 1) != 0); // int4 needs the two scale inputs
    CHECK(finder.logger.errors == errorsBefore + 3);

    // No tokens: enqueue does nothing and succeeds (no GPU is touched).
    PluginTensorDesc rtIn[6];
    for (int32_t i = 0; i < 6; ++i)
    {
        rtIn[i] = io[i].desc;
    }
    rtIn[0].dims = makeDims({0, 64});
    rtIn[1].dims = makeDims({0, 8});
    CHECK(runtime->onShapeChange(rtIn, 6, &io[6].desc, 1) == 0);
    void const* inputs[6] = {};
    void* outputs[1] = {};
    CHECK(runtime->enqueue(rtIn, &io[6].desc, inputs, outputs, nullptr, nullptr) == 0);

    // Bad fields are refused with a message, not a plugin.
    int64_t badFormat = 3;
    fields[4].data = &badFormat;
    CHECK(creator->createPlugin("bad", &fc, TensorRTPhase::kBUILD) == nullptr);
    fields[4].data = &format;
    PluginFieldCollection missing{4, fields.data() + 1}; // no top_k
    CHECK(creator->createPlugin("bad", &missing, TensorRTPhase::kBUILD) == nullptr);
    int64_t bigK = 9;
    fields[0].data = &bigK; // top_k > num_experts
    CHECK(creator->createPlugin("bad", &fc, TensorRTPhase::kBUILD) == nullptr);

    IPluginV3* cloned = plugin->clone();
    CHECK(cloned != nullptr);
    delete cloned;
    delete restored;
    delete plugin;
    std::printf("moe_plugin_smoke: ok\n");
    return 0;
}
