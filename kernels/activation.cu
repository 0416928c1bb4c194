// Gated and plain activations of the MLP.
#include "common.cuh"

__device__ __forceinline__ float gelu_tanh(float v) {
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(inner));
}

struct Silu {
    __device__ float operator()(float g) const { return g / (1.0f + expf(-g)); }
};
struct GeluTanh {
    __device__ float operator()(float g) const { return gelu_tanh(g); }
};

// gate_up: [rows × 2·inter] (gate columns, then up columns); out: [rows × inter] = act(gate)·up.
template <typename Act>
__device__ void gated(const float* __restrict__ gate_up, float* __restrict__ out, int rows, int inter, Act act) {
    const size_t n = (size_t)rows * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i % inter;
        out[i] = act(gate_up[r * 2 * inter + c]) * gate_up[r * 2 * inter + inter + c];
    }
}

extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out,
                                        int rows, int inter) {
    gated(gate_up, out, rows, inter, Silu{});
}

// Gemma's GeGLU.
extern "C" __global__ void gelu_tanh_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out,
                                             int rows, int inter) {
    gated(gate_up, out, rows, inter, GeluTanh{});
}

// GELU, tanh approximation (GPT-2's "gelu_new"), in place.
extern "C" __global__ void gelu_tanh_f32(float* __restrict__ x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = gelu_tanh(x[i]);
    }
}
