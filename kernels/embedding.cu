// Embedding gather: out[t] = table[ids[t]], widened to f32 from the table's storage.
#include "common.cuh"

// Grid: one block per token. An id outside the table writes zeros: the runtime validates ids
// before launch, so this only keeps a bad launch from reading out of bounds.
#define GATHER(NAME, T, WIDEN)                                                                    \
    extern "C" __global__ void NAME(const T* __restrict__ table, const unsigned* __restrict__ ids, \
                                    float* __restrict__ out, int vocab, int cols) {               \
        const unsigned id = ids[blockIdx.x];                                                      \
        float* o = out + (size_t)blockIdx.x * cols;                                               \
        const T* row = table + (size_t)id * cols;                                                 \
        for (int c = threadIdx.x; c < cols; c += blockDim.x)                                      \
            o[c] = id < (unsigned)vocab ? WIDEN(row[c]) : 0.0f;                                   \
    }

#define AS_F32(v) (v)
GATHER(embedding_f32, float, AS_F32)
GATHER(embedding_bf16, unsigned short, bf16_to_f32)
GATHER(embedding_f16, unsigned short, f16_to_f32)

// Int8 table with one scale per `group` values of a row (a quantized tied LM head).
extern "C" __global__ void embedding_int8(const signed char* __restrict__ table,
                                          const float* __restrict__ scales,
                                          const unsigned* __restrict__ ids, float* __restrict__ out,
                                          int vocab, int cols, int group) {
    const unsigned id = ids[blockIdx.x];
    const int groups = (cols + group - 1) / group;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        o[c] = id < (unsigned)vocab
                   ? (float)table[(size_t)id * cols + c] * scales[(size_t)id * groups + c / group]
                   : 0.0f;
}
