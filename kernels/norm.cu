// RMSNorm and LayerNorm over rows, optionally fused with the residual add that precedes them in a
// decoder layer. One block per row; statistics in f32 as the CPU kernels compute them.
#include "common.cuh"

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) * w
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * inv * w[c];
}

// residual[r] += x[r]; out[r] = rms_norm(residual[r]).
extern "C" __global__ void add_rms_norm_f32(const float* __restrict__ x, float* __restrict__ residual,
                                            const float* __restrict__ w, float* __restrict__ out,
                                            int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* rr = residual + (size_t)blockIdx.x * cols;
    float* yr = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = rr[c] + xr[c];
        rr[c] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = rr[c] * inv * w[c];
}

__device__ __forceinline__ void layer_norm_row(const float* xr, const float* w, const float* b,
                                               float* yr, int cols, float eps, float* scratch) {
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, scratch) / cols;
    float v = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] - mean;
        v += d * d;
    }
    const float inv = rsqrtf(block_sum(v, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] - mean) * inv * w[c] + b[c];
}

// out[r] = (x[r] − mean) / sqrt(var + eps) * w + b (two passes: mean first, as the CPU does).
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          int cols, float eps) {
    __shared__ float scratch[32];
    layer_norm_row(x + (size_t)blockIdx.x * cols, w, b, out + (size_t)blockIdx.x * cols, cols, eps,
                   scratch);
}

// residual[r] += x[r]; out[r] = layer_norm(residual[r]).
extern "C" __global__ void add_layer_norm_f32(const float* __restrict__ x, float* __restrict__ residual,
                                              const float* __restrict__ w, const float* __restrict__ b,
                                              float* __restrict__ out, int cols, float eps) {
    __shared__ float scratch[32];
    float* rr = residual + (size_t)blockIdx.x * cols;
    const float* xr = x + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) rr[c] += xr[c];
    __syncthreads();
    layer_norm_row(rr, w, b, out + (size_t)blockIdx.x * cols, cols, eps, scratch);
}
