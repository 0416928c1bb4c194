// Weight-only linear layers, y[m × n] = x[m × k] · Wᵀ (+ bias), reading the stored weights
// directly: int8 (per-group scales), int4 (GGML block layout, with or without zero point), FP8
// E4M3 (per-row scale), NVFP4 (E2M1, E4M3 scale per 16, f32 global scale), and for decode bf16 /
// f16 (half the bytes of widening them; larger batches of those go through cuBLAS).
//
// Each format exposes `load4(row, c, out)`: values c..c+3 of a row, dequantized exactly as the
// CPU format's scalar `row_to_f32` (the definition). k is a multiple of 32 (checked by the
// launcher), so four values never straddle a block or a group.
#include "common.cuh"

struct Int8W {
    const signed char* q;
    const float* scales;
    const float* offsets;  // null: none
    int k, group, groups;
    __device__ void load4(int r, int c, float* o) const {
        const char4 v = *reinterpret_cast<const char4*>(q + (size_t)r * k + c);
        const size_t g = (size_t)r * groups + c / group;
        const float s = scales[g];
        o[0] = v.x * s; o[1] = v.y * s; o[2] = v.z * s; o[3] = v.w * s;
        if (offsets) {
#pragma unroll
            for (int j = 0; j < 4; ++j) o[j] += offsets[g];
        }
    }
};

// Byte i of a 32-value block holds value i (low nibble) and value i + 16 (high nibble).
struct Int4W {
    const unsigned char* q;
    const float* scales;
    const float* offsets;  // null: symmetric, value = scale · (code − 8)
    int k, group, groups;
    __device__ void load4(int r, int c, float* o) const {
        const int i = c % 32, hi = i >= 16;
        const unsigned char* block = q + ((size_t)r * k + c - i) / 2;
        const unsigned bytes = *reinterpret_cast<const unsigned*>(block + (i & 15));
        const size_t g = (size_t)r * groups + c / group;
        const float s = scales[g], off = offsets ? offsets[g] : -8.0f * s;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = s * (float)((bytes >> (8 * j + 4 * hi)) & 0xf) + off;
    }
};

struct Fp8W {
    const unsigned char* q;
    const float* scales;  // one per row
    int k;
    __device__ void load4(int r, int c, float* o) const {
        const unsigned bytes = *reinterpret_cast<const unsigned*>(q + (size_t)r * k + c);
        const float s = scales[r];
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = e4m3_to_f32((bytes >> (8 * j)) & 0xff) * s;
    }
};

// Per 16-value block, byte i holds value i (low) and value i + 8 (high).
struct Nvfp4W {
    const unsigned char* q;
    const unsigned char* block_scales;  // E4M3, one per 16 values
    float global_scale;
    int k;
    __device__ void load4(int r, int c, float* o) const {
        const int i = c % 16, hi = i >= 8;
        const unsigned char* block = q + ((size_t)r * k + c - i) / 2;
        const unsigned bytes = *reinterpret_cast<const unsigned*>(block + (i & 7));
        const float s = e4m3_to_f32(block_scales[((size_t)r * k + c) / 16]) * global_scale;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = e2m1_to_f32((bytes >> (8 * j + 4 * hi)) & 0xf) * s;
    }
};

// bf16 or f16 bits, converted as the CPU's Bf16Bits / F16Bits.
template <bool BF16>
struct HalfW {
    const unsigned short* w;
    int k;
    __device__ void load4(int r, int c, float* o) const {
        const uint2 v = *reinterpret_cast<const uint2*>(w + (size_t)r * k + c);
        const unsigned short h[4] = {(unsigned short)(v.x & 0xffff), (unsigned short)(v.x >> 16),
                                     (unsigned short)(v.y & 0xffff), (unsigned short)(v.y >> 16)};
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = BF16 ? bf16_to_f32(h[j]) : f16_to_f32(h[j]);
    }
};

// Dense f32 rows: decode goes through cuBLAS; batch-invariant mode takes the matrix-vector kernel
// at every row count, whose order per output does not depend on the batch (cuBLAS picks its
// algorithm, and with it the order, by shape).
struct F32W {
    const float* w;
    int k;
    __device__ void load4(int r, int c, float* o) const {
        const float* p = w + (size_t)r * k + c;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = p[j];
    }
};

// ---- decode: matrix-vector, a warp per output feature, up to GEMV_ROWS activation rows ----

#define GEMV_WARPS 4
#define GEMV_ROWS 4

template <typename W>
__device__ void gemv(const W& w, const float* __restrict__ x, const float* __restrict__ bias,
                     float* __restrict__ y, int m, int n, int k) {
    const int lane = threadIdx.x % TRT_WARP;
    const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / TRT_WARP;
    if (j >= n) return;
    for (int r0 = 0; r0 < m; r0 += GEMV_ROWS) {
        float acc[GEMV_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int c = lane * 4; c < k; c += TRT_WARP * 4) {
            float wv[4];
            w.load4(j, c, wv);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                if (r0 + r < m) {
                    const float4 xv = *reinterpret_cast<const float4*>(x + (size_t)(r0 + r) * k + c);
                    acc[r] += xv.x * wv[0] + xv.y * wv[1] + xv.z * wv[2] + xv.w * wv[3];
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && r0 + r < m) y[(size_t)(r0 + r) * n + j] = s + (bias ? bias[j] : 0.0f);
        }
    }
}

// ---- prefill: 64 × 64 output tiles, weights dequantized into shared memory per 32-deep slice ----

#define TILE 64
#define TILE_K 32

template <typename W>
__device__ void gemm(const W& w, const float* __restrict__ x, const float* __restrict__ bias,
                     float* __restrict__ y, int m, int n, int k) {
    __shared__ float xs[TILE_K][TILE + 1];
    __shared__ float ws[TILE_K][TILE + 1];
    const int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 256 threads: 4 × 4 outputs each
    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += TILE_K) {
        // 64 rows × 32 depth of x and of W: 512 groups of 4 values, two per thread.
        for (int t = threadIdx.x; t < TILE * TILE_K / 4; t += blockDim.x) {
            const int r = t / (TILE_K / 4), c = (t % (TILE_K / 4)) * 4;
            float4 xv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (row0 + r < m) xv = *reinterpret_cast<const float4*>(x + (size_t)(row0 + r) * k + k0 + c);
            xs[c][r] = xv.x; xs[c + 1][r] = xv.y; xs[c + 2][r] = xv.z; xs[c + 3][r] = xv.w;
            float wv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (col0 + r < n) w.load4(col0 + r, k0 + c, wv);
            ws[c][r] = wv[0]; ws[c + 1][r] = wv[1]; ws[c + 2][r] = wv[2]; ws[c + 3][r] = wv[3];
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = xs[kk][ty + 16 * i];
                b[i] = ws[kk][tx + 16 * i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (r < m && c < n) y[(size_t)r * n + c] = acc[i][j] + (bias ? bias[c] : 0.0f);
        }
    }
}

// Entry points. gemv_*: grid ceil(n / GEMV_WARPS), block GEMV_WARPS · 32.
// gemm_*: grid (ceil(n / 64), ceil(m / 64)), block 256.
#define GEMV_ENTRY(FMT, MAKE, ...)                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * TRT_WARP)                           \
        gemv_##FMT(__VA_ARGS__, const float* x, const float* bias, float* y, int m, int n, int k) {\
        gemv(MAKE, x, bias, y, m, n, k);                                                          \
    }
#define ENTRY(FMT, MAKE, ...)                                                                     \
    GEMV_ENTRY(FMT, MAKE, __VA_ARGS__)                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        gemm_##FMT(__VA_ARGS__, const float* x, const float* bias, float* y, int m, int n, int k) {\
        gemm(MAKE, x, bias, y, m, n, k);                                                          \
    }

ENTRY(int8, (Int8W{q, scales, offsets, k, group, (k + group - 1) / group}), const signed char* q,
      const float* scales, const float* offsets, int group)
ENTRY(int4, (Int4W{q, scales, offsets, k, group, (k + group - 1) / group}), const unsigned char* q,
      const float* scales, const float* offsets, int group)
ENTRY(fp8, (Fp8W{q, scales, k}), const unsigned char* q, const float* scales)
ENTRY(nvfp4, (Nvfp4W{q, block_scales, global_scale, k}), const unsigned char* q, const unsigned char* block_scales,
      float global_scale)
GEMV_ENTRY(f32, (F32W{w, k}), const float* w)
GEMV_ENTRY(bf16, (HalfW<true>{w, k}), const unsigned short* w)
GEMV_ENTRY(f16, (HalfW<false>{w, k}), const unsigned short* w)
