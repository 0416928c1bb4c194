// Elementwise and layout kernels the decoder's glue needs: residual add, bias broadcast,
// per-column activation scaling, FP8 activation quantize-dequantize, column-range copies, f32 to
// bf16 / f16 (the activations of a half-precision cuBLAS GEMM).
#include "common.cuh"

#define GRID_STRIDE(i, total) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (total); i += (size_t)gridDim.x * blockDim.x)

// x += y, elementwise (the residual add where it is not fused into a norm).
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, int n) {
    GRID_STRIDE(i, (size_t)n) x[i] += y[i];
}

// y[r] = bias for each of `rows` rows of `n` (the C of a GEMM that then accumulates into it).
extern "C" __global__ void bias_rows_f32(float* __restrict__ y, const float* __restrict__ bias, int rows, int n) {
    GRID_STRIDE(i, (size_t)rows * n) y[i] = bias[i % n];
}

// x[r][c] *= s[c] (AWQ / SmoothQuant pre_quant_scale), in place.
extern "C" __global__ void scale_cols_f32(float* __restrict__ x, const float* __restrict__ s, int rows, int cols) {
    GRID_STRIDE(i, (size_t)rows * cols) x[i] *= s[i % cols];
}

// out[r][j] = x[r][perm[j]]: the activations in the column order of an act-order GPTQ weight.
extern "C" __global__ void gather_cols_f32(const float* __restrict__ x, const unsigned* __restrict__ perm,
                                           float* __restrict__ out, int rows, int cols) {
    GRID_STRIDE(i, (size_t)rows * cols) out[i] = x[(i / cols) * cols + perm[i % cols]];
}

// x = e4m3(x / scale) · scale: activations through FP8 with a static scale, as the CPU's fp8_qdq.
extern "C" __global__ void fp8_qdq_f32(float* __restrict__ x, float scale, int n) {
    GRID_STRIDE(i, (size_t)n) x[i] = e4m3_to_f32(f32_to_e4m3(x[i] / scale)) * scale;
}

// dst[r][c] = src[r][col0 + c] for c < cols: one part of a fused projection (q, k or v of qkv).
extern "C" __global__ void copy_cols_f32(const float* __restrict__ src, float* __restrict__ dst, int rows,
                                         int src_cols, int col0, int cols) {
    GRID_STRIDE(i, (size_t)rows * cols) dst[i] = src[(i / cols) * src_cols + col0 + i % cols];
}

// out = x rounded to nearest even in bf16 (BF16 = true) or f16.
template <bool BF16>
__device__ void to_half(const float* __restrict__ x, unsigned short* __restrict__ out, int n) {
    GRID_STRIDE(i, (size_t)n) out[i] = BF16 ? cvt_rn_bf16_f32(x[i]) : cvt_rn_f16_f32(x[i]);
}
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* out, int n) { to_half<true>(x, out, n); }
extern "C" __global__ void f32_to_f16(const float* x, unsigned short* out, int n) { to_half<false>(x, out, n); }

// out[rows[i]] += w[i] · x[i] for the n rows of x (width wide; rows distinct within a launch): a
// mixture-of-experts layer adding one expert's outputs back to its tokens.
extern "C" __global__ void add_rows_scaled_f32(const float* __restrict__ x, const unsigned* __restrict__ rows,
                                               const float* __restrict__ w, float* __restrict__ out, int n,
                                               int width) {
    const size_t total = (size_t)n * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / width, c = i % width;
        out[(size_t)rows[r] * width + c] += w[r] * x[i];
    }
}
