// Rotary position embedding, "rotate half" layout (dimension j pairs with j + half), in place.
#include "common.cuh"

// x: [tokens × n_heads × head_dim]; token t is at positions[t] and rotates by row sets[t] of
// inv_freq ([sets × half]: sequences whose scaling follows their length carry their own row);
// cos and sin are multiplied by scale (YaRN's and LongRoPE's attention factor).
// Grid: (tokens, n_heads); block: any size, threads stride over the half pairs. The angle is
// formed in f32 and its sine and cosine taken in f64, as the CPU kernel does, so that long
// positions agree to the last bits.
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ positions,
                                    const unsigned* __restrict__ sets,
                                    const float* __restrict__ inv_freq, int n_heads, int head_dim,
                                    int half, float scale) {
    const int t = blockIdx.x, h = blockIdx.y;
    float* head = x + ((size_t)t * n_heads + h) * head_dim;
    const float pos = (float)positions[t];
    const float* freq = inv_freq + (size_t)sets[t] * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const float angle = pos * freq[j];
        double s, c;
        sincos((double)angle, &s, &c);
        const float cs = (float)c * scale, sn = (float)s * scale;
        const float a = head[j], b = head[j + half];
        head[j] = a * cs - b * sn;
        head[j + half] = b * cs + a * sn;
    }
}
