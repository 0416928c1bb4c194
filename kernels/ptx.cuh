// Every inline-PTX instruction the kernels use, each behind a small function. Host emulation
// (emu/cuda_emu.h, TRT_EMULATE) defines the same functions in C++ instead of this file.
#pragma once

__device__ __forceinline__ float cvt_f32_f16(unsigned short h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even.
__device__ __forceinline__ unsigned short cvt_rn_f16_f32(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ unsigned short cvt_rn_bf16_f32(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// d += A(16 × 32, s8, row-major) · B(32 × 8, s8, column-major) on the tensor cores, one warp.
// Lane 4g + t holds A rows {g, g + 8} × k {4t..4t+3, 16 + 4t..} in a[0..4] (row g, g + 8, g,
// g + 8), B column g × k {4t.., 16 + 4t..} in b[0..2], and D (row g | g + 8, column 2t | 2t + 1)
// in d[0..4].
__device__ __forceinline__ void mma_s8_16x8x32(int* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#if __CUDA_ARCH__ >= 890
// As mma_s8_16x8x32 over FP8 E4M3 codes with f32 accumulation (sm_89+).
__device__ __forceinline__ void mma_e4m3_16x8x32(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
