// CUDA kernels of the MoE forward; the contract is in moe_kernels.h, the oracle in kernels/python/moe_ref.py.
//
// Steps, all on one stream:
//   1. route_topk:      one warp per token: softmax over E logits, k rounds of warp arg-max, optional renorm;
//                       counts tokens per expert.
//   2. expert_offsets:  prefix sums of the counts (rows per expert) and of their 64-row tiles.
//   3. scatter_rows:    every (token, slot) pair gets a row in the expert-sorted order.
//   4. expert_gemm<gated>:   rows of one expert x [gate; up] columns -> bf16 SiLU(gate) * up      [T*k, I]
//   5. expert_gemm<!gated>:  the same rows x down columns            -> fp32 expert outputs      [T*k, H]
//   6. combine:         out[t] = sum over slots j of weight[t, j] * y[row(t, j)], in slot order.
// The GEMMs are classic shared-memory tiled SIMT GEMMs (64x64 tile, 32-deep k step, 4x4 outputs a thread,
// fp32 accumulation). Weights are dequantized to fp32 while they are staged in shared memory, so the three
// formats share one kernel body; the block grid is the list of (expert, 64-row tile) pairs, so no block works
// on an expert that received no tokens.

#include "moe_kernels.h"

#include <cfloat>
#include <climits>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace
{

constexpr int kBM = 64;        // rows (routed tokens) per GEMM tile
constexpr int kBN = 64;        // output columns per GEMM tile
constexpr int kBK = 32;        // reduction depth staged in shared memory per step
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kRouteWarps = 4; // tokens per routing block
constexpr size_t kAlign = 256;

using Fmt = CompressorMoeWeightFormat;

__device__ __forceinline__ float warpMax(float v)
{
    for (int off = 16; off > 0; off >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int off = 16; off > 0; off >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// Larger probability wins; on a tie the lower expert id (a deterministic choice).
__device__ __forceinline__ bool beats(float p, int e, float bestP, int bestE)
{
    return p > bestP || (p == bestP && e < bestE);
}

__global__ void routeTopkKernel(float const* __restrict__ logits, int64_t tokens, int numExperts, int topK,
    bool normalize, int* __restrict__ topkExpert, float* __restrict__ topkWeight, int* __restrict__ expertCounts)
{
    int const lane = threadIdx.x % 32;
    int64_t const t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
    if (t >= tokens)
    {
        return; // whole warps leave together: t is uniform within a warp
    }
    float const* row = logits + t * numExperts;

    float m = -FLT_MAX;
    for (int e = lane; e < numExperts; e += 32)
    {
        m = fmaxf(m, row[e]);
    }
    m = warpMax(m);
    float s = 0.f;
    for (int e = lane; e < numExperts; e += 32)
    {
        s += expf(row[e] - m);
    }
    s = warpSum(s);

    int chosen[kCompressorMoeMaxTopK];
    float weight[kCompressorMoeMaxTopK];
    float total = 0.f;
    for (int j = 0; j < topK; ++j)
    {
        // -2 is below every probability and below the -1 a NaN maps to, so some unchosen expert always wins
        // and the expert id stays in range whatever the logits hold.
        float bestP = -2.f;
        int bestE = INT_MAX;
        for (int e = lane; e < numExperts; e += 32)
        {
            bool taken = false;
            for (int i = 0; i < j; ++i)
            {
                taken |= chosen[i] == e;
            }
            float p = expf(row[e] - m) / s;
            p = (p == p) ? p : -1.f;
            if (!taken && beats(p, e, bestP, bestE))
            {
                bestP = p;
                bestE = e;
            }
        }
        for (int off = 16; off > 0; off >>= 1)
        {
            float const p = __shfl_xor_sync(0xffffffffu, bestP, off);
            int const e = __shfl_xor_sync(0xffffffffu, bestE, off);
            if (beats(p, e, bestP, bestE))
            {
                bestP = p;
                bestE = e;
            }
        }
        chosen[j] = bestE; // the same on every lane after the butterfly
        weight[j] = bestP;
        total += bestP;
    }
    if (lane == 0)
    {
        for (int j = 0; j < topK; ++j)
        {
            topkExpert[t * topK + j] = chosen[j];
            topkWeight[t * topK + j] = normalize ? weight[j] / total : weight[j];
            atomicAdd(&expertCounts[chosen[j]], 1);
        }
    }
}

// Serial over experts (E is at most a few hundred): offsets[e] = first sorted row of expert e,
// tileOffsets[e] = its first 64-row tile. Both have E + 1 entries.
__global__ void expertOffsetsKernel(int const* __restrict__ counts, int numExperts, int* __restrict__ offsets,
    int* __restrict__ tileOffsets)
{
    if (blockIdx.x != 0 || threadIdx.x != 0)
    {
        return;
    }
    int rows = 0;
    int tiles = 0;
    for (int e = 0; e < numExperts; ++e)
    {
        offsets[e] = rows;
        tileOffsets[e] = tiles;
        rows += counts[e];
        tiles += (counts[e] + kBM - 1) / kBM;
    }
    offsets[numExperts] = rows;
    tileOffsets[numExperts] = tiles;
}

// Pair i = t * k + j goes to a row of its expert's range. The order inside a range depends on the atomics,
// which changes nothing: every row is computed on its own and combine reads rows by pair.
__global__ void scatterRowsKernel(int const* __restrict__ topkExpert, int64_t pairs, int topK,
    int const* __restrict__ offsets, int* __restrict__ cursor, int* __restrict__ sortedToken, int* __restrict__ pairRow)
{
    int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= pairs)
    {
        return;
    }
    int const e = topkExpert[i];
    int const row = offsets[e] + atomicAdd(&cursor[e], 1);
    sortedToken[row] = static_cast<int>(i / topK);
    pairRow[i] = row;
}

// Weight element (row n, column k) of one expert as fp32. `rowBase` = expert * rows + n.
template <Fmt F>
__device__ __forceinline__ float loadWeight(
    void const* w, float const* scales, int64_t rowBase, int k, int kDim, int groups, int groupSize)
{
    if constexpr (F == Fmt::kBF16)
    {
        return __bfloat162float(static_cast<__nv_bfloat16 const*>(w)[rowBase * kDim + k]);
    }
    else if constexpr (F == Fmt::kFP8)
    {
        __nv_fp8_e4m3 v;
        v.__x = static_cast<uint8_t const*>(w)[rowBase * kDim + k];
        return static_cast<float>(v) * scales[rowBase]; // one scale per output channel (G = 1)
    }
    else
    {
        uint8_t const byte = static_cast<uint8_t const*>(w)[rowBase * (kDim / 2) + k / 2];
        int const code = (k & 1) ? (byte >> 4) : (byte & 15); // low nibble = even column
        return static_cast<float>(code - 8) * scales[rowBase * groups + k / groupSize];
    }
}

// acc[i][j] += a[i] * b[j]: one 4 x 4 register tile, one k step.
__device__ __forceinline__ void outerProductAdd(float (&acc)[4][4], float const (&a)[4], float const (&b)[4])
{
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    }
}

// One block: 64 sorted rows of one expert x 64 output columns.
//   gated:  A = hidden rows gathered through sortedToken, K = H; weight rows n (gate) and N + n (up) of
//           [E, 2N, K]; writes act[row, n] = bf16(silu(gate) * up), N = I.
//   !gated: A = act rows, K = I; weight rows n of [E, N, K]; writes y[row, n] (fp32), N = H.
template <Fmt F, bool kGated>
__global__ void __launch_bounds__(kThreads) expertGemmKernel(__nv_bfloat16 const* __restrict__ a,
    int const* __restrict__ sortedToken, void const* __restrict__ w, float const* __restrict__ scales, int groups,
    int nDim, int kDim, int numExperts, int const* __restrict__ offsets, int const* __restrict__ tileOffsets,
    __nv_bfloat16* __restrict__ act, float* __restrict__ y)
{
    int const tile = blockIdx.x;
    if (tile >= tileOffsets[numExperts])
    {
        return; // the grid is sized for the worst case; the real tile count is only known on the device
    }
    // The expert owning this tile: the largest e with tileOffsets[e] <= tile (experts without rows own none).
    int lo = 0;
    int hi = numExperts - 1;
    while (lo < hi)
    {
        int const mid = (lo + hi + 1) / 2;
        if (tileOffsets[mid] <= tile)
        {
            lo = mid;
        }
        else
        {
            hi = mid - 1;
        }
    }
    int const e = lo;
    int const row0 = offsets[e] + (tile - tileOffsets[e]) * kBM;
    int const rowEnd = offsets[e + 1];
    int const n0 = blockIdx.y * kBN;
    int const wRows = kGated ? 2 * nDim : nDim;
    int const groupSize = kDim / groups;

    // +1 column: the stores below walk k fastest, and 65 floats apart lands each k in its own bank.
    __shared__ float sA[kBK][kBM + 1];
    __shared__ float sG[kBK][kBN + 1];
    __shared__ float sU[kGated ? kBK : 1][kBN + 1];
    __shared__ int64_t sRowSrc[kBM]; // A row each tile row reads, -1 past the expert's rows

    int const tx = threadIdx.x % 16;
    int const ty = threadIdx.x / 16;
    if (threadIdx.x < kBM)
    {
        int const r = row0 + threadIdx.x;
        sRowSrc[threadIdx.x] = r < rowEnd ? (kGated ? static_cast<int64_t>(sortedToken[r]) : r) : -1;
    }
    __syncthreads();

    float accG[4][4] = {};
    float accU[4][4] = {};
    for (int k0 = 0; k0 < kDim; k0 += kBK)
    {
        for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads)
        {
            int const m = idx / kBK;
            int const kk = idx % kBK;
            int64_t const src = sRowSrc[m];
            int const k = k0 + kk;
            sA[kk][m] = (src >= 0 && k < kDim) ? __bfloat162float(a[src * kDim + k]) : 0.f;
        }
        for (int idx = threadIdx.x; idx < kBN * kBK; idx += kThreads)
        {
            int const n = idx / kBK;
            int const kk = idx % kBK;
            int const k = k0 + kk;
            bool const in = n0 + n < nDim && k < kDim;
            int64_t const rowBase = static_cast<int64_t>(e) * wRows + n0 + n;
            sG[kk][n] = in ? loadWeight<F>(w, scales, rowBase, k, kDim, groups, groupSize) : 0.f;
            if constexpr (kGated)
            {
                sU[kk][n] = in ? loadWeight<F>(w, scales, rowBase + nDim, k, kDim, groups, groupSize) : 0.f;
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kBK; ++kk)
        {
            float av[4];
            float gv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                av[i] = sA[kk][ty + 16 * i];
                gv[i] = sG[kk][tx + 16 * i];
            }
            outerProductAdd(accG, av, gv);
            if constexpr (kGated)
            {
                float uv[4];
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    uv[j] = sU[kk][tx + 16 * j];
                }
                outerProductAdd(accU, av, uv);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int const r = row0 + ty + 16 * i;
        if (r >= rowEnd)
        {
            continue;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            int const n = n0 + tx + 16 * j;
            if (n >= nDim)
            {
                continue;
            }
            if constexpr (kGated)
            {
                float const g = accG[i][j];
                act[static_cast<int64_t>(r) * nDim + n] = __float2bfloat16(g / (1.f + expf(-g)) * accU[i][j]);
            }
            else
            {
                y[static_cast<int64_t>(r) * nDim + n] = accG[i][j];
            }
        }
    }
}

__global__ void combineKernel(float const* __restrict__ y, float const* __restrict__ topkWeight,
    int const* __restrict__ pairRow, int topK, int hidden, __nv_bfloat16* __restrict__ out)
{
    __shared__ float sW[kCompressorMoeMaxTopK];
    __shared__ int64_t sRow[kCompressorMoeMaxTopK];
    int64_t const t = blockIdx.x;
    if (threadIdx.x < topK)
    {
        sW[threadIdx.x] = topkWeight[t * topK + threadIdx.x];
        sRow[threadIdx.x] = pairRow[t * topK + threadIdx.x];
    }
    __syncthreads();
    for (int h = threadIdx.x; h < hidden; h += blockDim.x)
    {
        float acc = 0.f;
        for (int j = 0; j < topK; ++j)
        {
            acc = fmaf(sW[j], y[sRow[j] * hidden + h], acc);
        }
        out[t * hidden + h] = __float2bfloat16(acc);
    }
}

// Workspace regions in order; each starts on a 256-byte boundary.
struct Workspace
{
    int* counts;      // [E] tokens per expert
    int* cursor;      // [E]
    int* offsets;     // [E + 1]
    int* tileOffsets; // [E + 1]
    int* topkExpert;  // [T * k]
    float* topkWeight; // [T * k]
    int* sortedToken; // [T * k]
    int* pairRow;     // [T * k]
    __nv_bfloat16* act; // [T * k, I]
    float* y;         // [T * k, H]
    size_t bytes;
};

size_t alignUp(size_t n)
{
    return (n + kAlign - 1) / kAlign * kAlign;
}

Workspace carve(CompressorMoeShape const& s, char* base)
{
    size_t const pairs = static_cast<size_t>(s.tokens) * s.top_k;
    size_t const e = static_cast<size_t>(s.num_experts);
    size_t at = 0;
    auto take = [&](size_t bytes) {
        char* p = base ? base + at : nullptr;
        at += alignUp(bytes);
        return p;
    };
    Workspace w{};
    w.counts = reinterpret_cast<int*>(take(2 * e * sizeof(int))); // counts and cursor: one memset
    w.cursor = w.counts ? w.counts + e : nullptr;
    w.offsets = reinterpret_cast<int*>(take((e + 1) * sizeof(int)));
    w.tileOffsets = reinterpret_cast<int*>(take((e + 1) * sizeof(int)));
    w.topkExpert = reinterpret_cast<int*>(take(pairs * sizeof(int)));
    w.topkWeight = reinterpret_cast<float*>(take(pairs * sizeof(float)));
    w.sortedToken = reinterpret_cast<int*>(take(pairs * sizeof(int)));
    w.pairRow = reinterpret_cast<int*>(take(pairs * sizeof(int)));
    w.act = reinterpret_cast<__nv_bfloat16*>(take(pairs * s.inter * sizeof(__nv_bfloat16)));
    w.y = reinterpret_cast<float*>(take(pairs * s.hidden * sizeof(float)));
    w.bytes = at;
    return w;
}

template <Fmt F>
void launchGemms(CompressorMoeShape const& s, Workspace const& ws, void const* hidden, void const* wGateUp,
    void const* wDown, float const* sGateUp, float const* sDown, cudaStream_t stream)
{
    int64_t const pairs = s.tokens * s.top_k;
    // Upper bound on (expert, tile) pairs: sum_e ceil(c_e / BM) <= pairs / BM + E.
    unsigned const tileSlots = static_cast<unsigned>((pairs + kBM - 1) / kBM + s.num_experts);
    auto const* x = static_cast<__nv_bfloat16 const*>(hidden);
    dim3 const gridUp(tileSlots, (s.inter + kBN - 1) / kBN);
    expertGemmKernel<F, true><<<gridUp, kThreads, 0, stream>>>(x, ws.sortedToken, wGateUp, sGateUp,
        s.groups_gate_up, s.inter, s.hidden, s.num_experts, ws.offsets, ws.tileOffsets, ws.act, nullptr);
    dim3 const gridDown(tileSlots, (s.hidden + kBN - 1) / kBN);
    expertGemmKernel<F, false><<<gridDown, kThreads, 0, stream>>>(ws.act, nullptr, wDown, sDown, s.groups_down,
        s.hidden, s.inter, s.num_experts, ws.offsets, ws.tileOffsets, nullptr, ws.y);
}

} // namespace

char const* compressor_moe_check(CompressorMoeShape const& s)
{
    if (s.tokens < 0 || s.hidden <= 0 || s.inter <= 0 || s.num_experts <= 0)
    {
        return "tokens must be >= 0 and hidden, inter, num_experts > 0";
    }
    if (s.top_k < 1 || s.top_k > s.num_experts || s.top_k > kCompressorMoeMaxTopK)
    {
        return "top_k must be in [1, min(num_experts, 32)]";
    }
    if (s.tokens * s.top_k > INT_MAX)
    {
        return "tokens * top_k must fit in int32";
    }
    switch (s.weight_format)
    {
    case Fmt::kBF16: return nullptr;
    case Fmt::kFP8:
        return (s.groups_gate_up == 1 && s.groups_down == 1) ? nullptr
                                                             : "fp8 scales are per output channel: [E, out, 1]";
    case Fmt::kINT4:
        if (s.hidden % 2 != 0 || s.inter % 2 != 0)
        {
            return "int4 needs even hidden and inter (two codes per byte)";
        }
        if (s.groups_gate_up < 1 || s.groups_down < 1 || s.hidden % s.groups_gate_up != 0
            || s.inter % s.groups_down != 0)
        {
            return "int4 scale groups must divide the input dimension: [E, 2I, H/g] and [E, H, I/g]";
        }
        return nullptr;
    }
    return "weight_format must be 0 (bf16), 1 (fp8) or 2 (int4)";
}

size_t compressor_moe_workspace_size(CompressorMoeShape const& s)
{
    return compressor_moe_check(s) ? 0 : carve(s, nullptr).bytes;
}

cudaError_t compressor_moe_forward(CompressorMoeShape const& s, void const* hidden, float const* routerLogits,
    void const* wGateUp, void const* wDown, float const* sGateUp, float const* sDown, void* out, void* workspace,
    size_t workspaceBytes, cudaStream_t stream)
{
    if (compressor_moe_check(s) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (s.tokens == 0)
    {
        return cudaSuccess;
    }
    bool const quantized = s.weight_format != Fmt::kBF16;
    if (!hidden || !routerLogits || !wGateUp || !wDown || !out || !workspace
        || (quantized && (!sGateUp || !sDown)))
    {
        return cudaErrorInvalidValue;
    }
    Workspace const ws = carve(s, static_cast<char*>(workspace));
    if (workspaceBytes < ws.bytes)
    {
        return cudaErrorInvalidValue;
    }
    int64_t const pairs = s.tokens * s.top_k;

    cudaError_t err = cudaMemsetAsync(ws.counts, 0, 2 * sizeof(int) * s.num_experts, stream);
    if (err != cudaSuccess)
    {
        return err;
    }
    unsigned const routeBlocks = static_cast<unsigned>((s.tokens + kRouteWarps - 1) / kRouteWarps);
    routeTopkKernel<<<routeBlocks, 32 * kRouteWarps, 0, stream>>>(
        routerLogits, s.tokens, s.num_experts, s.top_k, s.normalize, ws.topkExpert, ws.topkWeight, ws.counts);
    expertOffsetsKernel<<<1, 32, 0, stream>>>(ws.counts, s.num_experts, ws.offsets, ws.tileOffsets);
    scatterRowsKernel<<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(
        ws.topkExpert, pairs, s.top_k, ws.offsets, ws.cursor, ws.sortedToken, ws.pairRow);
    switch (s.weight_format)
    {
    case Fmt::kBF16: launchGemms<Fmt::kBF16>(s, ws, hidden, wGateUp, wDown, sGateUp, sDown, stream); break;
    case Fmt::kFP8: launchGemms<Fmt::kFP8>(s, ws, hidden, wGateUp, wDown, sGateUp, sDown, stream); break;
    case Fmt::kINT4: launchGemms<Fmt::kINT4>(s, ws, hidden, wGateUp, wDown, sGateUp, sDown, stream); break;
    }
    combineKernel<<<static_cast<unsigned>(s.tokens), 256, 0, stream>>>(
        ws.y, ws.topkWeight, ws.pairRow, s.top_k, s.hidden, static_cast<__nv_bfloat16*>(out));
    return cudaGetLastError();
}
