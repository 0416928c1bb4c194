// Runs the CUDA kernels on the host, so they execute (and are tested) where no GPU is.
//
// Each block's threads are OS threads; blocks run one after another, which makes a function-static
// variable a faithful `__shared__` array. `__syncthreads` is a barrier over the block, warp
// shuffles and `mma.sync` exchange through a per-warp buffer between two warp barriers, and a
// thread that returns early leaves both barriers (as an exited CUDA thread stops counting).
// The PTX helpers of ptx.cuh get C++ definitions here with the instructions' documented
// semantics. Compiled with -DTRT_EMULATE -x c++ (see `cargo xtask emulate-kernels`).
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 900

using std::max;
using std::min;

namespace emu {

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};

struct Warp {
    explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
    std::barrier<> barrier;
    uint32_t slots[32][8] = {};
};

struct Block {
    Block(unsigned threads) : all(threads) {
        for (unsigned w = 0; w * 32 < threads; ++w)
            warps.push_back(std::make_unique<Warp>(std::min(32u, threads - 32 * w)));
    }
    std::barrier<> all;
    std::vector<std::unique_ptr<Warp>> warps;
};

struct Thread {
    Dim threadIdx, blockIdx, blockDim, gridDim;
    Block* block = nullptr;
    unsigned lane = 0;
    Warp& warp() const { return *block->warps[threadIdx.x / 32]; }
};

inline thread_local Thread self;

// Runs `kernel` (a call of an extern "C" kernel with its arguments) over `grid` × `block`
// (one-dimensional blocks, as every kernel here uses).
inline void launch(Dim grid, Dim block, const std::function<void()>& kernel) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b(block.x);
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block.x; ++t)
                    threads.emplace_back([&, t] {
                        self = Thread{{t, 0, 0}, {bx, by, bz}, block, grid, &b, t % 32};
                        kernel();
                        self.warp().barrier.arrive_and_drop();
                        b.all.arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
            }
}

// Every lane publishes `words` 32-bit values, then reads the warp's slots through `read`.
template <typename Read>
inline void exchange(const uint32_t* words, int n, Read read) {
    Warp& w = self.warp();
    std::memcpy(w.slots[self.lane], words, 4 * n);
    w.barrier.arrive_and_wait();
    read(w.slots);
    w.barrier.arrive_and_wait();
}

}  // namespace emu

#define threadIdx (emu::self.threadIdx)
#define blockIdx (emu::self.blockIdx)
#define blockDim (emu::self.blockDim)
#define gridDim (emu::self.gridDim)

inline void __syncthreads() { emu::self.block->all.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    uint32_t bits, out;
    std::memcpy(&bits, &v, 4);
    emu::exchange(&bits, 1, [&](const uint32_t (*slots)[8]) { out = slots[emu::self.lane ^ mask][0]; });
    T r;
    std::memcpy(&r, &out, 4);
    return r;
}

// ---- built-in types and functions ----

struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(4))) char4 { signed char x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <typename To, typename From>
inline To emu_bits(From v) {
    To r;
    std::memcpy(&r, &v, sizeof r);
    return r;
}
inline float __int_as_float(int v) { return emu_bits<float>(v); }
inline float __uint_as_float(unsigned v) { return emu_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return emu_bits<unsigned>(v); }
inline int __float_as_int(float v) { return emu_bits<int>(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}

// ---- ptx.cuh ----

inline float cvt_f32_f16(unsigned short h) {
    const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v;
    if (exp == 0) v = std::ldexp((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((float)(man | 0x400), exp - 25);
    return (h & 0x8000) ? -v : v;
}

// Round to nearest even through the wider type's bits: exact for every finite f32.
inline unsigned short cvt_rn_bf16_f32(float x) {
    const uint32_t b = emu_bits<uint32_t>(x);
    if (std::isnan(x)) return 0x7fff;
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline unsigned short cvt_rn_f16_f32(float x) {
    const unsigned short sign = std::signbit(x) ? 0x8000 : 0;
    const float a = std::fabs(x);
    if (std::isnan(x)) return 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00;  // rounds to infinity
    if (a < std::ldexp(1.0f, -14)) return sign | (unsigned short)std::nearbyint(a * std::ldexp(1.0f, 24));
    int e;
    const float m = std::frexp(a, &e);  // a = m · 2^e, m in [0.5, 1)
    const float scaled = std::nearbyint(std::ldexp(m, 11));  // 11 significant bits, ties to even
    const unsigned bits = (unsigned)((e + 14) << 10) + ((unsigned)scaled - 1024u);
    return sign | (unsigned short)bits;
}

namespace emu {
// One m16n8k32 MMA over the warp: element (row, k) of A and (k, col) of B are found in the lane
// and register ptx.cuh documents; `decode` turns a byte into its value.
template <typename Acc, typename Decode>
inline void mma_16x8x32(Acc* d, const unsigned* a, const unsigned* b, Decode decode) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    Acc out[4];
    exchange(mine, 6, [&](const uint32_t (*slots)[8]) {
        auto byte = [&](int lane, int reg, int k) { return (uint8_t)(slots[lane][reg] >> (8 * (k % 4))); };
        const unsigned g = self.lane / 4, t = self.lane % 4;
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
            Acc sum = 0;
            for (int k = 0; k < 32; ++k) {
                const int kl = (k % 16) / 4, hi = k >= 16;
                const Acc av = decode(byte(4 * (row % 8) + kl, (row >= 8) + 2 * hi, k));
                const Acc bv = decode(byte(4 * col + kl, 4 + hi, k));
                sum += av * bv;
            }
            out[e] = sum;
        }
    });
    for (int e = 0; e < 4; ++e) d[e] += out[e];
}
}  // namespace emu

inline void mma_s8_16x8x32(int* d, const unsigned* a, const unsigned* b) {
    emu::mma_16x8x32(d, a, b, [](uint8_t v) { return (int)(signed char)v; });
}

float e4m3_to_f32(unsigned char b);  // common.cuh

inline void mma_e4m3_16x8x32(float* d, const unsigned* a, const unsigned* b) {
    emu::mma_16x8x32(d, a, b, [](uint8_t v) { return e4m3_to_f32(v); });
}
