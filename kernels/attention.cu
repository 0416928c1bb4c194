// Causal attention over a paged KV cache (MHA, GQA, MQA): a block per (row, head) for decode
// rows, tiles of rows sharing key tiles for prefill chunks; and the write of new keys/values into
// the pool.
//
// Pools are [num_blocks × block_size × n_kv_heads × head_dim]; a position's slot is
// `block_table[pos / block_size] · block_size + pos % block_size`. Quantized pools keep one f32
// scale per (slot, KV head) at `scales[slot · n_kv_heads + head]`: value = code · scale. 16-bit
// pools hold bf16 or f16 bit patterns, rounded to nearest even when written.
#include "common.cuh"

#define ATTN_WARPS 4
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_PER_LANE (ATTN_MAX_HEAD_DIM / TRT_WARP)

struct KvF32 {
    const float* p;
    __device__ float get(size_t i, float) const { return p[i]; }
    __device__ float scale(size_t, int, int) const { return 1.0f; }
};
struct KvBf16 {
    const unsigned short* p;
    __device__ float get(size_t i, float) const { return bf16_to_f32(p[i]); }
    __device__ float scale(size_t, int, int) const { return 1.0f; }
};
struct KvF16 {
    const unsigned short* p;
    __device__ float get(size_t i, float) const { return f16_to_f32(p[i]); }
    __device__ float scale(size_t, int, int) const { return 1.0f; }
};
struct KvInt8 {
    const signed char* p;
    const float* s;
    __device__ float get(size_t i, float sc) const { return (float)p[i] * sc; }
    __device__ float scale(size_t slot, int n_kv, int h) const { return s[slot * n_kv + h]; }
};
struct KvFp8 {
    const unsigned char* p;
    const float* s;
    __device__ float get(size_t i, float sc) const { return e4m3_to_f32(p[i]) * sc; }
    __device__ float scale(size_t slot, int n_kv, int h) const { return s[slot * n_kv + h]; }
};

struct AttnArgs {
    const float* q;          // [rows × n_heads × head_dim]
    float* out;              // same layout as q
    const int* row_seq;      // [rows]: the sequence of each query row
    const int* row_pos;      // [rows]: its position; it attends to 0..=row_pos
    const int* tables;       // every sequence's block table, back to back
    const int* table_start;  // [seqs]: where each sequence's table begins in `tables`
    int n_heads, n_kv_heads, head_dim, block_size;
    float scale;
    int window;              // keys seen per query (sliding window); 0: all earlier ones
    float softcap;           // scores become softcap · tanh(score / softcap); 0: none
};

__device__ __forceinline__ float capped(const AttnArgs& a, float s) {
    return a.softcap > 0.0f ? a.softcap * tanhf(s / a.softcap) : s;
}

// The first position a query at `pos` sees.
__device__ __forceinline__ int first_key(const AttnArgs& a, int pos) {
    return a.window > 0 ? max(0, pos + 1 - a.window) : 0;
}

// Grid: (rows, n_heads); block: ATTN_WARPS warps. Each warp walks every ATTN_WARPS-th position
// with an online softmax (lanes split head_dim); the warps' partial results are merged at the end.
template <typename Kv>
__device__ void attention_row(const AttnArgs& a, Kv k, Kv v) {
    __shared__ float q_s[ATTN_MAX_HEAD_DIM];
    __shared__ float acc_s[ATTN_WARPS][ATTN_MAX_HEAD_DIM];
    __shared__ float m_s[ATTN_WARPS], l_s[ATTN_WARPS];
    const int row = blockIdx.x, h = blockIdx.y, hd = a.head_dim;
    const int kvh = h / (a.n_heads / a.n_kv_heads);
    const int lane = threadIdx.x % TRT_WARP, warp = threadIdx.x / TRT_WARP;
    const float* q = a.q + ((size_t)row * a.n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q_s[d] = q[d] * a.scale;
    __syncthreads();
    const int* table = a.tables + a.table_start[a.row_seq[row]];
    const int last = a.row_pos[row];
    const size_t kv_row = (size_t)a.n_kv_heads * hd;
    float m = TRT_NEG_INF, l = 0.0f, acc[ATTN_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) acc[i] = 0.0f;
    for (int pos = first_key(a, last) + warp; pos <= last; pos += ATTN_WARPS) {
        const size_t slot = (size_t)table[pos / a.block_size] * a.block_size + pos % a.block_size;
        const size_t base = slot * kv_row + (size_t)kvh * hd;
        const float ks = k.scale(slot, a.n_kv_heads, kvh);
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) {
            const int d = lane + i * TRT_WARP;
            if (d < hd) dot += q_s[d] * k.get(base + d, ks);
        }
        dot = capped(a, warp_sum(dot));
        const float m_new = fmaxf(m, dot);
        const float correction = expf(m - m_new), p = expf(dot - m_new);
        l = l * correction + p;
        const float vs = v.scale(slot, a.n_kv_heads, kvh);
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) {
            const int d = lane + i * TRT_WARP;
            acc[i] = acc[i] * correction + (d < hd ? p * v.get(base + d, vs) : 0.0f);
        }
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) {
        const int d = lane + i * TRT_WARP;
        if (d < hd) acc_s[warp][d] = acc[i];
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    __syncthreads();
    float mx = TRT_NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, m_s[w]);
    float denom = 0.0f, wt[ATTN_WARPS];
    for (int w = 0; w < ATTN_WARPS; ++w) {
        // A warp that saw no position (m = -inf) contributes nothing.
        wt[w] = m_s[w] == TRT_NEG_INF ? 0.0f : expf(m_s[w] - mx);
        denom += wt[w] * l_s[w];
    }
    float* o = a.out + ((size_t)row * a.n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) s += wt[w] * acc_s[w][d];
        o[d] = s / denom;
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_f32(AttnArgs a, const float* k, const float* v) {
    attention_row(a, KvF32{k}, KvF32{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_bf16(AttnArgs a, const unsigned short* k, const unsigned short* v) {
    attention_row(a, KvBf16{k}, KvBf16{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_f16(AttnArgs a, const unsigned short* k, const unsigned short* v) {
    attention_row(a, KvF16{k}, KvF16{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_int8(AttnArgs a, const signed char* k, const float* ks, const signed char* v,
                         const float* vs) {
    attention_row(a, KvInt8{k, ks}, KvInt8{v, vs});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_fp8(AttnArgs a, const unsigned char* k, const float* ks, const unsigned char* v,
                        const float* vs) {
    attention_row(a, KvFp8{k, ks}, KvFp8{v, vs});
}

// ---- prefill: tiles of up to ATTN_TILE_ROWS rows of one sequence share each key tile ----
//
// A block takes `count` rows of one sequence (tiles[2·b], tiles[2·b + 1]: first row, count) for
// one head, and walks that sequence's keys ATTN_TILE_KEYS at a time through shared memory, so a
// prefill chunk reads each key and value once per tile of rows instead of once per row. Warp w
// owns rows w, w + 4, ...; in a key tile lane j scores key j, the row's online softmax advances by
// one warp max and one warp sum, and each lane accumulates its head dimensions. head_dim ≤
// ATTN_TILE_MAX_HEAD_DIM (the launcher falls back to attention_row above it).
#define ATTN_TILE_ROWS 16
#define ATTN_TILE_KEYS 32
#define ATTN_TILE_MAX_HEAD_DIM 128
#define ATTN_TILE_ROWS_PER_WARP (ATTN_TILE_ROWS / ATTN_WARPS)
#define ATTN_TILE_DIMS_PER_LANE (ATTN_TILE_MAX_HEAD_DIM / TRT_WARP)

template <typename Kv>
__device__ void attention_tile(const AttnArgs& a, const int* tiles, Kv k, Kv v) {
    __shared__ float q_s[ATTN_TILE_ROWS][ATTN_TILE_MAX_HEAD_DIM];
    __shared__ float k_s[ATTN_TILE_KEYS][ATTN_TILE_MAX_HEAD_DIM + 1];  // +1: lanes read rows
    __shared__ float v_s[ATTN_TILE_KEYS][ATTN_TILE_MAX_HEAD_DIM + 1];
    __shared__ float p_s[ATTN_WARPS][ATTN_TILE_KEYS];
    const int first = tiles[2 * blockIdx.x], count = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hd = a.head_dim, kvh = h / (a.n_heads / a.n_kv_heads);
    const int lane = threadIdx.x % TRT_WARP, warp = threadIdx.x / TRT_WARP;
    for (int i = threadIdx.x; i < count * hd; i += blockDim.x) {
        const int r = i / hd, d = i % hd;
        q_s[r][d] = a.q[((size_t)(first + r) * a.n_heads + h) * hd + d] * a.scale;
    }
    const int* table = a.tables + a.table_start[a.row_seq[first]];
    const size_t kv_row = (size_t)a.n_kv_heads * hd;
    int last = 0, lo = a.row_pos[first], pos[ATTN_TILE_ROWS_PER_WARP], from[ATTN_TILE_ROWS_PER_WARP];
    float m[ATTN_TILE_ROWS_PER_WARP], l[ATTN_TILE_ROWS_PER_WARP];
    float acc[ATTN_TILE_ROWS_PER_WARP][ATTN_TILE_DIMS_PER_LANE];
    for (int r = 0; r < count; ++r) {
        last = max(last, a.row_pos[first + r]);
        lo = min(lo, first_key(a, a.row_pos[first + r]));
    }
#pragma unroll
    for (int j = 0; j < ATTN_TILE_ROWS_PER_WARP; ++j) {
        const int r = warp + ATTN_WARPS * j;
        pos[j] = r < count ? a.row_pos[first + r] : -1;
        from[j] = r < count ? first_key(a, pos[j]) : 0;
        m[j] = TRT_NEG_INF;
        l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_TILE_DIMS_PER_LANE; ++i) acc[j][i] = 0.0f;
    }
    for (int t0 = lo / ATTN_TILE_KEYS * ATTN_TILE_KEYS; t0 <= last; t0 += ATTN_TILE_KEYS) {
        __syncthreads();  // q_s written, or the previous tile consumed
        for (int i = threadIdx.x; i < ATTN_TILE_KEYS * hd; i += blockDim.x) {
            const int key = i / hd, d = i % hd, p = t0 + key;
            float kv = 0.0f, vv = 0.0f;
            if (p <= last) {
                const size_t slot = (size_t)table[p / a.block_size] * a.block_size + p % a.block_size;
                const size_t at = slot * kv_row + (size_t)kvh * hd + d;
                kv = k.get(at, k.scale(slot, a.n_kv_heads, kvh));
                vv = v.get(at, v.scale(slot, a.n_kv_heads, kvh));
            }
            k_s[key][d] = kv;
            v_s[key][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < ATTN_TILE_ROWS_PER_WARP; ++j) {
            // Warp-uniform: no key of this tile is visible to the row.
            if (pos[j] < t0 || from[j] >= t0 + ATTN_TILE_KEYS) continue;
            const float* q = q_s[warp + ATTN_WARPS * j];
            float s = TRT_NEG_INF;
            if (t0 + lane <= pos[j] && t0 + lane >= from[j]) {
                s = 0.0f;
                for (int d = 0; d < hd; ++d) s += q[d] * k_s[lane][d];
                s = capped(a, s);
            }
            // Some key of [from, pos] lies in the tile, so the tile maximum and m_new are finite.
            const float m_new = fmaxf(m[j], warp_max(s));
            const float correction = expf(m[j] - m_new);
            const float p = s == TRT_NEG_INF ? 0.0f : expf(s - m_new);
            l[j] = l[j] * correction + warp_sum(p);
            p_s[warp][lane] = p;
            __syncwarp();
#pragma unroll
            for (int i = 0; i < ATTN_TILE_DIMS_PER_LANE; ++i) {
                const int d = lane + i * TRT_WARP;
                if (d >= hd) break;
                float sum = 0.0f;
                for (int key = 0; key < ATTN_TILE_KEYS; ++key) sum += p_s[warp][key] * v_s[key][d];
                acc[j][i] = acc[j][i] * correction + sum;
            }
            __syncwarp();  // p_s is rewritten for the warp's next row
            m[j] = m_new;
        }
    }
#pragma unroll
    for (int j = 0; j < ATTN_TILE_ROWS_PER_WARP; ++j) {
        const int r = warp + ATTN_WARPS * j;
        if (r >= count) break;
        float* o = a.out + ((size_t)(first + r) * a.n_heads + h) * hd;
#pragma unroll
        for (int i = 0; i < ATTN_TILE_DIMS_PER_LANE; ++i) {
            const int d = lane + i * TRT_WARP;
            if (d < hd) o[d] = acc[j][i] / l[j];
        }
    }
}

// Grid: (tiles, n_heads); block: ATTN_WARPS warps.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_tiled_f32(AttnArgs a, const int* tiles, const float* k, const float* v) {
    attention_tile(a, tiles, KvF32{k}, KvF32{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_tiled_bf16(AttnArgs a, const int* tiles, const unsigned short* k,
                               const unsigned short* v) {
    attention_tile(a, tiles, KvBf16{k}, KvBf16{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_tiled_f16(AttnArgs a, const int* tiles, const unsigned short* k,
                              const unsigned short* v) {
    attention_tile(a, tiles, KvF16{k}, KvF16{v});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_tiled_int8(AttnArgs a, const int* tiles, const signed char* k, const float* ks,
                               const signed char* v, const float* vs) {
    attention_tile(a, tiles, KvInt8{k, ks}, KvInt8{v, vs});
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * TRT_WARP)
    paged_attention_tiled_fp8(AttnArgs a, const int* tiles, const unsigned char* k, const float* ks,
                              const unsigned char* v, const float* vs) {
    attention_tile(a, tiles, KvFp8{k, ks}, KvFp8{v, vs});
}

// New keys or values into the pool: x is [rows × n_kv_heads × head_dim], row r goes to slots[r].
// Grid: (rows, n_kv_heads); block: one warp or more.
template <typename T, typename Convert>
__device__ void kv_write_float(const float* x, const int* slots, T* pool, int n_kv_heads, int head_dim,
                               Convert convert) {
    const size_t src = ((size_t)blockIdx.x * n_kv_heads + blockIdx.y) * head_dim;
    const size_t dst = ((size_t)slots[blockIdx.x] * n_kv_heads + blockIdx.y) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) pool[dst + d] = convert(x[src + d]);
}

struct Identity {
    __device__ float operator()(float v) const { return v; }
};
struct ToBf16 {
    __device__ unsigned short operator()(float v) const { return cvt_rn_bf16_f32(v); }
};
struct ToF16 {
    __device__ unsigned short operator()(float v) const { return cvt_rn_f16_f32(v); }
};

extern "C" __global__ void kv_write_f32(const float* __restrict__ x, const int* __restrict__ slots,
                                        float* __restrict__ pool, int n_kv_heads, int head_dim) {
    kv_write_float(x, slots, pool, n_kv_heads, head_dim, Identity{});
}

extern "C" __global__ void kv_write_bf16(const float* __restrict__ x, const int* __restrict__ slots,
                                         unsigned short* __restrict__ pool, int n_kv_heads, int head_dim) {
    kv_write_float(x, slots, pool, n_kv_heads, head_dim, ToBf16{});
}

extern "C" __global__ void kv_write_f16(const float* __restrict__ x, const int* __restrict__ slots,
                                        unsigned short* __restrict__ pool, int n_kv_heads, int head_dim) {
    kv_write_float(x, slots, pool, n_kv_heads, head_dim, ToF16{});
}

// Quantized pools: per (slot, head) scale = amax / max code (1 for an all-zero head), as the
// CPU pool writes them; int8 rounds half away from zero, FP8 to nearest even.
template <typename Store>
__device__ void kv_write_quant(const float* x, const int* slots, float* scales, int n_kv_heads,
                               int head_dim, float max_code, Store store) {
    __shared__ float scratch[32];
    const size_t src = ((size_t)blockIdx.x * n_kv_heads + blockIdx.y) * head_dim;
    const size_t slot = (size_t)slots[blockIdx.x];
    const size_t dst = (slot * n_kv_heads + blockIdx.y) * head_dim;
    float amax = 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) amax = fmaxf(amax, fabsf(x[src + d]));
    amax = block_max(amax, scratch);
    const float s = amax > 0.0f ? amax / max_code : 1.0f;
    if (threadIdx.x == 0) scales[slot * n_kv_heads + blockIdx.y] = s;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) store(dst + d, x[src + d] / s);
}

struct StoreInt8 {
    signed char* p;
    __device__ void operator()(size_t i, float v) const { p[i] = (signed char)fminf(fmaxf(roundf(v), -127.0f), 127.0f); }
};
struct StoreFp8 {
    unsigned char* p;
    __device__ void operator()(size_t i, float v) const { p[i] = f32_to_e4m3(v); }
};

extern "C" __global__ void kv_write_int8(const float* __restrict__ x, const int* __restrict__ slots,
                                         signed char* __restrict__ pool, float* __restrict__ scales,
                                         int n_kv_heads, int head_dim) {
    kv_write_quant(x, slots, scales, n_kv_heads, head_dim, 127.0f, StoreInt8{pool});
}

extern "C" __global__ void kv_write_fp8(const float* __restrict__ x, const int* __restrict__ slots,
                                        unsigned char* __restrict__ pool, float* __restrict__ scales,
                                        int n_kv_heads, int head_dim) {
    kv_write_quant(x, slots, scales, n_kv_heads, head_dim, 448.0f, StoreFp8{pool});
}
