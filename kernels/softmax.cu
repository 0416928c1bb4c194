// Row-wise softmax in place (logits to probabilities), max-subtracted.
#include "common.cuh"

extern "C" __global__ void softmax_f32(float* __restrict__ x, int cols) {
    __shared__ float scratch[32];
    float* r = x + (size_t)blockIdx.x * cols;
    float m = TRT_NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, r[c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = expf(r[c] - m);
        r[c] = e;
        s += e;
    }
    const float inv = 1.0f / block_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) r[c] *= inv;
}
