// 8-bit × 8-bit linear layers, y[m × n] = (xq[m × k] · Wqᵀ) · scales (+ bias), on the tensor cores:
//
// - W8A8 (SmoothQuant): activations quantized per row to int8 with a dynamic scale (amax / 127),
//   int8 weights with one scale per output channel, exact int32 accumulation. The arithmetic is the
//   CPU's (`cpu::quant::w8a8`) step for step, so the results agree bit for bit.
// - FP8: activations quantized to E4M3 with the layer's static input scale, E4M3 weights with one
//   scale per output channel, f32 accumulation. Needs sm_89+, so the sm_80 PTX leaves it out and
//   the launcher falls back to the weight-only FP8 kernels there.
//
// The tensor-core kernels use mma.sync.m16n8k32 (ptx.cuh: row-major A, column-major B, so both
// operands are read k-contiguous, which is how activations and weights are stored).
#include "common.cuh"

// ---- activation quantization ----

// One block per row: q = clamp(round(x / s), ±127) with s = amax / 127 (1 for an all-zero row).
extern "C" __global__ void quantize_rows_int8(const float* __restrict__ x, signed char* __restrict__ q,
                                              float* __restrict__ scales, int k) {
    __shared__ float scratch[TRT_WARP];
    const float* row = x + (size_t)blockIdx.x * k;
    float amax = 0.0f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) amax = fmaxf(amax, fabsf(row[c]));
    amax = block_max(amax, scratch);
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
    if (threadIdx.x == 0) scales[blockIdx.x] = s;
    for (int c = threadIdx.x; c < k; c += blockDim.x)
        q[(size_t)blockIdx.x * k + c] = (signed char)fminf(fmaxf(roundf(row[c] * inv), -127.0f), 127.0f);
}

// codes = e4m3(x / scale), the quantizing half of fp8_qdq_f32.
extern "C" __global__ void quantize_fp8(const float* __restrict__ x, unsigned char* __restrict__ codes,
                                        float scale, int n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        codes[i] = f32_to_e4m3(x[i] / scale);
}

// y = ((acc · sx) · sw) + b in that order and without FMA contraction: the CPU's expression.
__device__ __forceinline__ float w8a8_out(int acc, float sx, float sw, float b) {
    return __fadd_rn(__fmul_rn(__fmul_rn((float)acc, sx), sw), b);
}

// ---- decode: int8 matrix-vector with dp4a, a warp per output feature ----

#define GEMV_WARPS 4

// grid ceil(n / GEMV_WARPS), block GEMV_WARPS · 32; k a multiple of 4.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * TRT_WARP)
    gemv_w8a8(const signed char* __restrict__ xq, const float* __restrict__ xscales,
              const signed char* __restrict__ wq, const float* __restrict__ wscales,
              const float* __restrict__ bias, float* __restrict__ y, int m, int n, int k) {
    const int lane = threadIdx.x % TRT_WARP;
    const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / TRT_WARP;
    if (j >= n) return;
    const int* w = reinterpret_cast<const int*>(wq + (size_t)j * k);
    const float b = bias ? bias[j] : 0.0f;
    for (int r = 0; r < m; ++r) {
        const int* xr = reinterpret_cast<const int*>(xq + (size_t)r * k);
        int acc = 0;
        for (int c = lane; c < k / 4; c += TRT_WARP) acc = __dp4a(xr[c], w[c], acc);
#pragma unroll
        for (int o = TRT_WARP / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) y[(size_t)r * n + j] = w8a8_out(acc, xscales[r], wscales[j], b);
    }
}

// ---- prefill: 64 × 64 output tiles, four warps of 32 × 32, k staged through shared memory ----

#define MMA_TILE 64
#define MMA_K 64
// Row pitch in shared memory: the 16-byte pad spreads a fragment load (8 rows × 4 words) over
// all 32 banks.
#define MMA_PITCH (MMA_K + 16)

struct MmaInt8 {
    typedef int Acc;
    __device__ static void run(int* d, const unsigned* a, const unsigned* b) { mma_s8_16x8x32(d, a, b); }
};

#if __CUDA_ARCH__ >= 890
struct MmaE4m3 {
    typedef float Acc;
    __device__ static void run(float* d, const unsigned* a, const unsigned* b) { mma_e4m3_16x8x32(d, a, b); }
};
#endif

__device__ __forceinline__ unsigned ld32(const unsigned char* p) { return *reinterpret_cast<const unsigned*>(p); }

// Copies 64 rows × MMA_K bytes from row `row0` of a `rows × k` matrix at depth k0, zeros past the end.
__device__ __forceinline__ void stage(unsigned char* dst, const unsigned char* __restrict__ src, int row0,
                                      int rows, int k, int k0) {
    for (int i = threadIdx.x; i < MMA_TILE * MMA_K / 16; i += blockDim.x) {
        const int r = i / (MMA_K / 16), c = (i % (MMA_K / 16)) * 16;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < rows && k0 + c < k) v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * k + k0 + c);
        *reinterpret_cast<uint4*>(dst + r * MMA_PITCH + c) = v;
    }
}

// acc[i][j][e] becomes y[row0 + wm + 16i + g + 8(e / 2)][col0 + wn + 8j + 2t + e % 2] through
// `out(acc, row, col)`. Block 128 threads, grid (ceil(n / 64), ceil(m / 64)); k a multiple of 16.
template <typename Mma, typename Out>
__device__ void gemm_mma(const unsigned char* __restrict__ xq, const unsigned char* __restrict__ wq, int m,
                         int n, int k, const Out& out) {
    __shared__ __align__(16) unsigned char xs[MMA_TILE * MMA_PITCH];
    __shared__ __align__(16) unsigned char ws[MMA_TILE * MMA_PITCH];
    const int row0 = blockIdx.y * MMA_TILE, col0 = blockIdx.x * MMA_TILE;
    const int warp = threadIdx.x / TRT_WARP, lane = threadIdx.x % TRT_WARP;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32, g = lane / 4, t = lane % 4;
    typename Mma::Acc acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
    for (int k0 = 0; k0 < k; k0 += MMA_K) {
        stage(xs, xq, row0, m, k, k0);
        stage(ws, wq, col0, n, k, k0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 32) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const unsigned char* p = xs + (wm + 16 * i + g) * MMA_PITCH + kk + 4 * t;
                a[i][0] = ld32(p);
                a[i][1] = ld32(p + 8 * MMA_PITCH);
                a[i][2] = ld32(p + 16);
                a[i][3] = ld32(p + 8 * MMA_PITCH + 16);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const unsigned char* p = ws + (wn + 8 * j + g) * MMA_PITCH + kk + 4 * t;
                b[j][0] = ld32(p);
                b[j][1] = ld32(p + 16);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) Mma::run(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = row0 + wm + 16 * i + g + 8 * (e / 2), c = col0 + wn + 8 * j + 2 * t + e % 2;
                if (r < m && c < n) out(acc[i][j][e], r, c);
            }
}

struct W8A8Out {
    const float *xscales, *wscales, *bias;
    float* y;
    int n;
    __device__ void operator()(int acc, int r, int c) const {
        y[(size_t)r * n + c] = w8a8_out(acc, xscales[r], wscales[c], bias ? bias[c] : 0.0f);
    }
};

extern "C" __global__ void __launch_bounds__(128)
    gemm_w8a8(const signed char* xq, const float* xscales, const signed char* wq, const float* wscales,
              const float* bias, float* y, int m, int n, int k) {
    gemm_mma<MmaInt8>(reinterpret_cast<const unsigned char*>(xq), reinterpret_cast<const unsigned char*>(wq),
                      m, n, k, W8A8Out{xscales, wscales, bias, y, n});
}

#if __CUDA_ARCH__ >= 890
struct Fp8Out {
    float input_scale;
    const float *wscales, *bias;
    float* y;
    int n;
    __device__ void operator()(float acc, int r, int c) const {
        y[(size_t)r * n + c] = acc * (input_scale * wscales[c]) + (bias ? bias[c] : 0.0f);
    }
};

// xq: E4M3 codes of x / input_scale (quantize_fp8); wq, wscales: the FP8 weight format.
extern "C" __global__ void __launch_bounds__(128)
    gemm_fp8_e4m3(const unsigned char* xq, float input_scale, const unsigned char* wq, const float* wscales,
                  const float* bias, float* y, int m, int n, int k) {
    gemm_mma<MmaE4m3>(xq, wq, m, n, k, Fp8Out{input_scale, wscales, bias, y, n});
}
#endif
