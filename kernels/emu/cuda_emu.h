// Runs the CUDA kernels on the host, so they execute (and are tested) where no GPU is.
//
// A block's threads are fibers on one OS thread, switched by a small x86-64 context switch at
// every barrier; blocks are spread over the machine's cores, and `__shared__` is a function-static
// `thread_local`, so each core's current block has its own copy. `__syncthreads` and the warp
// collectives (shuffles, `mma.sync`, which exchange through a per-warp buffer) are barriers over the
// block's or warp's live fibers: a thread that returns early stops counting, as an exited CUDA
// thread does, and a barrier nobody can complete aborts with the kernel's launch shape instead of
// hanging. The PTX helpers of ptx.cuh get C++ definitions here with the instructions' documented
// semantics. Compiled with -DTRT_EMULATE -x c++ (see `cargo xtask emulate-kernels`).
#pragma once

#if !defined(__x86_64__)
#error "the kernel emulation's context switch is written for x86-64"
#endif

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 900

using std::max;
using std::min;

// emu_switch(save, load): saves the callee-saved registers and FP control words on the current
// stack, stores its pointer in *save, and resumes the context whose stack pointer is `load`.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};

// Fibers waiting for `arrived` to reach `live`; each completion bumps `generation`.
struct Sync {
    int live = 0, arrived = 0;
    unsigned generation = 0;
    void release_if_complete() {
        if (arrived > 0 && arrived >= live) {
            arrived = 0;
            ++generation;
        }
    }
};

struct Fiber {
    void* sp = nullptr;
    Dim threadIdx;
    unsigned lane = 0, warp = 0;
    bool done = false;
};

constexpr size_t kStack = 128 * 1024, kMaxThreads = 1024;

// One OS thread's fibers, and the block they are running.
struct Worker {
    Worker() {
        stacks = static_cast<char*>(
            mmap(nullptr, kStack * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (stacks == MAP_FAILED) std::abort();
        for (size_t i = 0; i < kMaxThreads; ++i) mprotect(stacks + i * kStack, 4096, PROT_NONE);  // guard page
    }
    ~Worker() { munmap(stacks, kStack * kMaxThreads); }
    char* stacks;
    void* scheduler = nullptr;
    Fiber fibers[kMaxThreads];
    const std::function<void()>* kernel = nullptr;
    Dim blockIdx, blockDim, gridDim;
    Sync all, warps[kMaxThreads / 32];
    uint32_t slots[kMaxThreads / 32][32][8];
    unsigned long progress = 0;  // barrier arrivals and exits: what tells a pass from a deadlock
    void run_block(Dim block_idx);
};

inline thread_local Worker* worker = nullptr;
inline thread_local Fiber* current = nullptr;

inline void yield() { emu_switch(&current->sp, worker->scheduler); }

inline void wait(Sync& s) {
    const unsigned g = s.generation;
    ++worker->progress;
    ++s.arrived;
    s.release_if_complete();
    while (s.generation == g) yield();
}

[[noreturn]] inline void fiber_main() {
    (*worker->kernel)();
    current->done = true;
    ++worker->progress;
    --worker->all.live;
    worker->all.release_if_complete();
    Sync& w = worker->warps[current->warp];
    --w.live;
    w.release_if_complete();
    yield();
    std::abort();  // a finished fiber is never resumed
}

inline void Worker::run_block(Dim block_idx) {
    blockIdx = block_idx;
    const unsigned n = blockDim.x;
    all = Sync{(int)n, 0, 0};
    for (unsigned w = 0; w * 32 < n; ++w) warps[w] = Sync{(int)std::min(32u, n - 32 * w), 0, 0};
    for (unsigned t = 0; t < n; ++t) {
        // The first switch "returns" into fiber_main with the stack aligned as after a call.
        char* top = stacks + (t + 1) * kStack;
        auto* sp = reinterpret_cast<uint64_t*>(top - 72);
        const uint32_t fp_control[2] = {0x1f80u, 0x037fu};  // default MXCSR and x87 control word
        std::memcpy(sp, fp_control, 8);
        std::memset(sp + 1, 0, 48);
        sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
        sp[8] = 0;
        fibers[t] = Fiber{sp, {t, 0, 0}, t % 32, t / 32, false};
    }
    for (unsigned live = n; live > 0;) {
        const unsigned long before = progress;
        live = 0;
        for (unsigned t = 0; t < n; ++t) {
            if (fibers[t].done) continue;
            current = &fibers[t];
            emu_switch(&scheduler, fibers[t].sp);
            live += !fibers[t].done;
        }
        if (live > 0 && progress == before) {
            std::fprintf(stderr,
                         "emulated kernel deadlock: block (%u, %u, %u) of %u threads waits at a barrier "
                         "that %u live threads never reach together\n",
                         blockIdx.x, blockIdx.y, blockIdx.z, n, live);
            std::abort();
        }
    }
}

// The other cores: threads that run a job alongside the launching thread, kept for the process.
class Helpers {
public:
    static Helpers& get() {
        static Helpers* h = new Helpers(std::max(1u, std::thread::hardware_concurrency()) - 1);  // never joined
        return *h;
    }
    // Runs `job` on every helper and the calling thread; returns when all are done. Jobs from
    // several host threads take turns.
    void run(const std::function<void()>& job) {
        std::lock_guard<std::mutex> turn(turn_);
        {
            std::lock_guard<std::mutex> l(m_);
            job_ = &job;
            running_ = count_;
            ++generation_;
        }
        start_.notify_all();
        job();
        std::unique_lock<std::mutex> l(m_);
        done_.wait(l, [&] { return running_ == 0; });
    }

private:
    explicit Helpers(unsigned n) : count_(n) {
        for (unsigned i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
    }
    void loop() {
        unsigned long seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> l(m_);
            start_.wait(l, [&] { return generation_ != seen; });
            seen = generation_;
            const std::function<void()>* job = job_;
            l.unlock();
            (*job)();
            l.lock();
            if (--running_ == 0) done_.notify_all();
        }
    }
    std::mutex turn_, m_;
    std::condition_variable start_, done_;
    const std::function<void()>* job_ = nullptr;
    unsigned long generation_ = 0;
    unsigned running_ = 0, count_;
};

// Runs `kernel` (a call of an extern "C" kernel with its arguments) over `grid` × `block`
// (one-dimensional blocks, as every kernel here uses), blocks spread over the cores.
inline void launch(Dim grid, Dim block, const std::function<void()>& kernel) {
    if (block.x == 0 || block.x > kMaxThreads || block.y != 1 || block.z != 1) std::abort();
    const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
    std::atomic<unsigned long> next{0};
    const std::function<void()> work = [&] {
        static thread_local Worker mine;
        worker = &mine;
        mine.kernel = &kernel;
        mine.blockDim = block;
        mine.gridDim = grid;
        for (unsigned long b; (b = next.fetch_add(1)) < blocks;)
            mine.run_block({unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)});
    };
    if (blocks > 1) Helpers::get().run(work);
    else work();
}

// Every lane publishes `n` 32-bit words, then reads the warp's slots through `read`.
template <typename Read>
inline void exchange(const uint32_t* words, int n, Read read) {
    auto& slots = worker->slots[current->warp];
    std::memcpy(slots[current->lane], words, 4 * n);
    wait(worker->warps[current->warp]);
    read(slots);
    wait(worker->warps[current->warp]);
}

}  // namespace emu

#define threadIdx (emu::current->threadIdx)
#define blockIdx (emu::worker->blockIdx)
#define blockDim (emu::worker->blockDim)
#define gridDim (emu::worker->gridDim)

inline void __syncthreads() { emu::wait(emu::worker->all); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::worker->warps[emu::current->warp]); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    uint32_t bits, out;
    std::memcpy(&bits, &v, 4);
    emu::exchange(&bits, 1, [&](const uint32_t (*slots)[8]) { out = slots[emu::current->lane ^ mask][0]; });
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
        const unsigned g = current->lane / 4, t = current->lane % 4;
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
