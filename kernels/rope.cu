// Rotary position embedding, "rotate half" layout (dimension j pairs with j + half), in place.
#include "common.cuh"

// x: [tokens × n_heads × head_dim]; token t is at positions[t]; inv_freq: [half].
// Grid: (tokens, n_heads); block: any size, threads stride over the half pairs. The angle is
// formed in f32 and its sine and cosine taken in f64, as the CPU kernel does, so that long
// positions agree to the last bits.
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ positions,
                                    const float* __restrict__ inv_freq, int n_heads, int head_dim,
                                    int half) {
    const int t = blockIdx.x, h = blockIdx.y;
    float* head = x + ((size_t)t * n_heads + h) * head_dim;
    const float pos = (float)positions[t];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const float angle = pos * inv_freq[j];
        double s, c;
        sincos((double)angle, &s, &c);
        const float a = head[j], b = head[j + half];
        head[j] = a * (float)c - b * (float)s;
        head[j + half] = b * (float)c + a * (float)s;
    }
}
