// Shared device helpers: reductions, FP8/FP4 codecs and launch conventions.
//
// Conventions every kernel follows (the Rust launchers in trtllm-kernels/src/cuda rely on them):
// activations are f32 row-major, sizes are `int` (the runtime checks they fit), and a kernel that
// reduces over a row runs one block of `blockDim.x` threads (a multiple of 32, at most 1024) per row.
#pragma once

#ifdef TRT_EMULATE
#include "emu/cuda_emu.h"
#else
#include "ptx.cuh"
#endif

#define TRT_WARP 32
// -inf without <math.h> (NVRTC compiles without the host headers).
#define TRT_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = TRT_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = TRT_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction with `warp_op`, `identity` for absent warps; `scratch` holds 32 floats of
// shared memory. Every thread gets the result.
template <typename WarpOp>
__device__ __forceinline__ float block_reduce(float v, float* scratch, float identity, WarpOp warp_op) {
    const int lane = threadIdx.x % TRT_WARP, warp = threadIdx.x / TRT_WARP;
    const int warps = (blockDim.x + TRT_WARP - 1) / TRT_WARP;
    v = warp_op(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_op(lane < warps ? scratch[lane] : identity);
}

struct WarpSum {
    __device__ float operator()(float v) const { return warp_sum(v); }
};
struct WarpMax {
    __device__ float operator()(float v) const { return warp_max(v); }
};

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, 0.0f, WarpSum{}); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce(v, scratch, TRT_NEG_INF, WarpMax{}); }

// FP8 E4M3 (the `fn` variant: no infinities, 0x7f/0xff NaN) to f32, as the CPU's `e4m3_to_f32`.
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    const int exp = (b >> 3) & 0xf, man = b & 7;
    float v;
    if ((b & 0x7f) == 0x7f) {
        v = __int_as_float(0x7fc00000);
    } else if (exp == 0) {
        v = (float)man * 0.001953125f;  // 2^-9
    } else {
        v = __int_as_float(((exp - 7 + 127) << 23) | (man << 20));
    }
    return (b & 0x80) ? -v : v;
}

// f32 to E4M3, round to nearest even, saturating at ±448, as trtllm-quant's `f32_to_e4m3`.
__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    if (x != x) return 0;  // NaN
    const unsigned char sign = (__float_as_uint(x) >> 24) & 0x80;
    const float a = fabsf(x);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0.015625f) return sign | (unsigned char)rintf(a * 512.0f);
    const unsigned bits = __float_as_uint(a);
    const unsigned r = (bits + 0x7ffffu + ((bits >> 20) & 1u)) >> 20;
    const unsigned exp = (r >> 3) + 7 - 127;
    return sign | (unsigned char)((exp << 3) | (r & 7));
}

// FP4 E2M1 code (bit 3 is the sign) to f32.
__device__ __forceinline__ float e2m1_to_f32(unsigned code) {
    const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float v = mag[code & 7];
    return (code & 8) ? -v : v;
}

// bf16 / f16 bit patterns to f32 without the fp16 headers.
__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned)h << 16); }

__device__ __forceinline__ float f16_to_f32(unsigned short h) { return cvt_f32_f16(h); }
