// Token selection from logits: argmax and temperature / top-k / top-p / min-p sampling with the
// CPU sampler's semantics (candidates in descending logit order, ties to the lower id; top-k,
// then top-p over the renormalised top-k, then min-p; inverse CDF with a host-drawn uniform).
#include "common.cuh"

// Larger logit first; on ties the lower id, as torch.argmax and the CPU sampler do.
__device__ __forceinline__ bool before(float v, unsigned id, float bv, unsigned bid) {
    return v > bv || (v == bv && id < bid);
}

__device__ __forceinline__ void warp_best(float& v, unsigned& id) {
#pragma unroll
    for (int o = TRT_WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const unsigned oid = __shfl_xor_sync(0xffffffffu, id, o);
        if (before(ov, oid, v, id)) {
            v = ov;
            id = oid;
        }
    }
}

// The block's first candidate; every thread gets it. `sv`/`sid` hold 32 entries of shared memory.
__device__ void block_best(float& v, unsigned& id, float* sv, unsigned* sid) {
    const int lane = threadIdx.x % TRT_WARP, warp = threadIdx.x / TRT_WARP;
    const int warps = (blockDim.x + TRT_WARP - 1) / TRT_WARP;
    warp_best(v, id);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        sid[warp] = id;
    }
    __syncthreads();
    v = lane < warps ? sv[lane] : TRT_NEG_INF;
    id = lane < warps ? sid[lane] : 0xffffffffu;
    warp_best(v, id);
}

// out[r] = argmax(logits[r]). Grid: one block per row.
extern "C" __global__ void argmax_f32(const float* __restrict__ logits, unsigned* __restrict__ out,
                                      int vocab) {
    __shared__ float sv[32];
    __shared__ unsigned sid[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float v = TRT_NEG_INF;
    unsigned id = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (before(row[i], i, v, id)) {
            v = row[i];
            id = i;
        }
    block_best(v, id, sv, &sid[0]);
    if (threadIdx.x == 0) out[blockIdx.x] = id < (unsigned)vocab ? id : 0;
}

#define SAMPLE_MAX_K 1024

struct SampleParams {
    float temperature;  // > 0 (greedy rows go through argmax)
    int top_k;          // 1..=SAMPLE_MAX_K (the launcher caps a disabled top-k at the maximum)
    float top_p;        // (0, 1]
    float min_p;        // [0, 1)
};

// One row per block: params[r], uniform[r] in [0, 1). The top-k candidates are selected one
// round at a time (each round the block's best among those after the previous pick in candidate
// order), so selection is exact and needs no sort; thread 0 then walks the ≤ 1024 candidates in
// f64 as the CPU sampler does.
extern "C" __global__ void sample_top_k_top_p_f32(const float* __restrict__ logits,
                                                  const SampleParams* __restrict__ params,
                                                  const float* __restrict__ uniform,
                                                  unsigned* __restrict__ out, int vocab) {
    __shared__ float cand_v[SAMPLE_MAX_K];
    __shared__ unsigned cand_id[SAMPLE_MAX_K];
    __shared__ float sv[32];
    __shared__ unsigned sid[32];
    __shared__ int n_cand;
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const SampleParams p = params[blockIdx.x];
    const int k = min(max(p.top_k, 1), SAMPLE_MAX_K);
    float last_v = __int_as_float(0x7f800000);  // +inf: nothing picked yet
    unsigned last_id = 0;
    if (threadIdx.x == 0) n_cand = 0;
    for (int round = 0; round < k; ++round) {
        float v = TRT_NEG_INF;
        unsigned id = 0xffffffffu;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float x = row[i];
            const bool after = x < last_v || (x == last_v && (unsigned)i > last_id);
            if (after && x > TRT_NEG_INF && before(x, i, v, id)) {
                v = x;
                id = i;
            }
        }
        block_best(v, id, sv, sid);
        if (id == 0xffffffffu) break;  // fewer finite logits than k
        if (threadIdx.x == 0) {
            cand_v[round] = v;
            cand_id[round] = id;
            n_cand = round + 1;
        }
        last_v = v;
        last_id = id;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    const int n = n_cand;
    if (n == 0) {
        out[blockIdx.x] = 0;
        return;
    }
    const float inv_tf = 1.0f / p.temperature;
    const float top = cand_v[0] * inv_tf;
    double total = 0.0;
    for (int i = 0; i < n; ++i) total += exp((double)(cand_v[i] * inv_tf - top));
    // Candidate i's probability within the top-k, in f64 as the CPU sampler computes it.
    auto prob = [&](int i) { return exp((double)(cand_v[i] * inv_tf - top)) / total; };
    // top-p: the shortest prefix whose mass reaches top_p.
    int keep = n;
    if (p.top_p < 1.0f) {
        double acc = 0.0;
        for (int i = 0; i < n; ++i) {
            acc += prob(i);
            if (acc >= (double)p.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (p.min_p > 0.0f) {
        const double floor = prob(0) * (double)p.min_p;
        int m = 0;
        while (m < keep && prob(m) >= floor) ++m;
        keep = max(m, 1);
    }
    double kept = 0.0;
    for (int i = 0; i < keep; ++i) kept += prob(i);
    double r = (double)uniform[blockIdx.x] * kept;
    unsigned pick = cand_id[keep - 1];
    for (int i = 0; i < keep; ++i) {
        r -= prob(i);
        if (r <= 0.0) {
            pick = cand_id[i];
            break;
        }
    }
    out[blockIdx.x] = pick;
}
