// LoRA's batched update (Punica's BGMV): one block per adapted row adds (x·Aᵀ)·Bᵀ with the
// factors of the row's slot, every adapter of the pass in one launch. The block's warps first
// take A's rows (a dot product over `inputs` each, into shared memory), then its threads take
// B's non-zero blocks output by output, reading Bᵀ's rows coalesced. A row's sums run in one
// order whatever the batch, so the update is batch invariant.
#include "common.cuh"

#define LORA_THREADS 256
#define LORA_MAX_SLOTS 8
#define LORA_MAX_BLOCKS 3
#define LORA_MAX_RANK 1024

// One adapter's factors of one module: A [rank × inputs], Bᵀ [rank × outputs], and B's
// non-zero blocks as {first output, outputs, first rank, ranks}. rank 0: module not adapted.
struct LoraSlot {
    const float* a;
    const float* bt;
    int rank;
    int n_blocks;
    int blocks[LORA_MAX_BLOCKS][4];
};

// rows: (row, slot) pairs; a row whose slot lies outside [slot_base, slot_base + LORA_MAX_SLOTS)
// is another launch's.
struct LoraArgs {
    const float* x;
    float* y;
    const unsigned* rows;
    int n_rows;
    int inputs;
    int outputs;
    int slot_base;
    LoraSlot slots[LORA_MAX_SLOTS];
};

extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_bgmv_f32(LoraArgs args) {
    __shared__ float t_s[LORA_MAX_RANK];
    const unsigned row = args.rows[2 * blockIdx.x];
    const int s = (int)args.rows[2 * blockIdx.x + 1] - args.slot_base;
    if (s < 0 || s >= LORA_MAX_SLOTS || args.slots[s].rank == 0) return;
    const LoraSlot& slot = args.slots[s];
    const float* x = args.x + (size_t)row * args.inputs;
    const int lane = threadIdx.x % TRT_WARP, warp = threadIdx.x / TRT_WARP;
    for (int r = warp; r < slot.rank; r += LORA_THREADS / TRT_WARP) {
        const float* a = slot.a + (size_t)r * args.inputs;
        float acc = 0.0f;
        for (int i = lane; i < args.inputs; i += TRT_WARP) acc += x[i] * a[i];
        acc = warp_sum(acc);
        if (lane == 0) t_s[r] = acc;
    }
    __syncthreads();
    float* y = args.y + (size_t)row * args.outputs;
    for (int b = 0; b < slot.n_blocks; ++b) {
        const int o0 = slot.blocks[b][0], on = slot.blocks[b][1];
        const int r0 = slot.blocks[b][2], rn = slot.blocks[b][3];
        for (int o = threadIdx.x; o < on; o += LORA_THREADS) {
            const float* bt = slot.bt + (size_t)r0 * args.outputs + o0 + o;
            float acc = 0.0f;
            for (int r = 0; r < rn; ++r) acc += t_s[r0 + r] * bt[(size_t)r * args.outputs];
            y[o0 + o] += acc;
        }
    }
}
