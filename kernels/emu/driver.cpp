// An emulated NVIDIA driver and cuBLAS: a shared library exporting the CUDA driver API and cuBLAS
// functions cudarc calls, backed by host memory and the kernels compiled for the host
// (cuda_emu.h). Put on LD_LIBRARY_PATH as libcuda.so and libcublas.so, it lets the Rust CUDA
// path — launchers, device matrices, the CUDA decoder, the device KV pool — run unchanged on a
// machine without a GPU (`cargo xtask emulate-gpu`). It reports two sm_90 devices named "trtllm
// host emulation", and everything runs synchronously on the calling thread's stream. As libnccl.so
// it runs the all-reduce of ranks in separate processes (nccl.cpp).
// Nothing measured through it says anything about GPU speed.
#include "../activation.cu"
#include "../attention.cu"
#include "../elementwise.cu"
#include "../embedding.cu"
#include "../gemm_8bit.cu"
#include "../lora.cu"
#include "../norm.cu"
#include "../rope.cu"
#include "../softmax.cu"
#include "../weight_only.cu"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>

namespace {

typedef int CUresult;
const CUresult OK = 0, INVALID_VALUE = 1, NOT_FOUND = 500;
typedef unsigned long long CUdeviceptr;

// A kernel's host function behind its name, called with cuLaunchKernel's `void** params`.
struct Kernel {
    std::function<void(void**)> call;
};

template <typename... A, size_t... I>
void invoke(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}

template <typename... A>
Kernel kernel(void (*k)(A...)) {
    return Kernel{[k](void** p) { invoke(k, p, std::index_sequence_for<A...>{}); }};
}

const std::map<std::string, Kernel>& kernels() {
#define K(name) {#name, kernel(name)}
    static const std::map<std::string, Kernel> all = {
        K(silu_mul_f32), K(gelu_tanh_mul_f32), K(gelu_tanh_f32),
        K(paged_attention_f32), K(paged_attention_bf16), K(paged_attention_f16),
        K(paged_attention_int8), K(paged_attention_fp8),
        K(paged_attention_tiled_f32), K(paged_attention_tiled_bf16), K(paged_attention_tiled_f16),
        K(paged_attention_tiled_int8), K(paged_attention_tiled_fp8),
        K(kv_write_f32), K(kv_write_bf16), K(kv_write_f16), K(kv_write_int8), K(kv_write_fp8),
        K(add_f32), K(add_rows_scaled_f32), K(bias_rows_f32), K(scale_cols_f32), K(gather_cols_f32), K(fp8_qdq_f32),
        K(copy_cols_f32),
        K(f32_to_bf16), K(f32_to_f16),
        K(embedding_f32), K(embedding_bf16), K(embedding_f16), K(embedding_int8),
        K(quantize_rows_int8), K(quantize_fp8), K(gemv_w8a8), K(gemm_w8a8), K(gemm_fp8_e4m3),
        K(rms_norm_f32), K(add_rms_norm_f32), K(layer_norm_f32), K(add_layer_norm_f32),
        K(rope_f32), K(softmax_f32),
        K(gemv_int8), K(gemm_int8), K(gemv_int4), K(gemm_int4), K(gemv_fp8), K(gemm_fp8),
        K(gemv_nvfp4), K(gemm_nvfp4), K(gemv_bf16), K(gemv_f16), K(gemv_f32),
        K(lora_bgmv_f32),
    };
#undef K
    return all;
}

// A loaded module: the entries its PTX declares, each resolved to a host kernel.
struct Module {
    std::map<std::string, const Kernel*> entries;
};

void* ptr(CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

}  // namespace

extern "C" {

// ---- driver: device and context ----

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 12090; return OK; }
// Two devices, so that two ranks of a split engine each have one (`mpirun -np 2 ... --device cuda`);
// every process's memory is its own, as two GPUs' are.
const int DEVICES = 2;
CUresult cuDeviceGetCount(int* n) { *n = DEVICES; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) { *d = ordinal; return ordinal >= 0 && ordinal < DEVICES ? OK : INVALID_VALUE; }
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "trtllm host emulation");
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
        case 75: *v = 9; break;  // compute capability major
        case 76: *v = 0; break;  // minor
        default: *v = 0;         // no memory pools: cudarc allocates synchronously
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = size_t(1) << 34; return OK; }
CUresult cuMemGetInfo_v2(size_t* free, size_t* total) { *free = *total = size_t(1) << 34; return OK; }

static int context_token;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &context_token; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &context_token; return OK; }
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = &context_token; return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuCtxGetDevice(int* d) { *d = 0; return OK; }

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == OK ? "no error" : e == NOT_FOUND ? "named symbol not found" : "invalid value";
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == OK ? "CUDA_SUCCESS" : e == NOT_FOUND ? "CUDA_ERROR_NOT_FOUND" : "CUDA_ERROR_INVALID_VALUE";
    return OK;
}

// ---- streams and events: everything is already complete when a call returns ----

static int stream_token, event_token;
CUresult cuStreamCreate(void** s, unsigned) { *s = &stream_token; return OK; }
CUresult cuStreamDestroy_v2(void*) { return OK; }
CUresult cuStreamSynchronize(void*) { return OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
CUresult cuEventCreate(void** e, unsigned) { *e = &event_token; return OK; }
CUresult cuEventRecord(void*, void*) { return OK; }
CUresult cuEventRecordWithFlags(void*, void*, unsigned) { return OK; }
CUresult cuEventSynchronize(void*) { return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventDestroy_v2(void*) { return OK; }

// ---- memory: host allocations standing in for device memory ----

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (!m) return INVALID_VALUE;
    // All-ones bytes (f32 NaN): an output a kernel forgets to write shows up in every test.
    std::memset(m, 0xff, bytes);
    *p = reinterpret_cast<uintptr_t>(m);
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) { std::free(ptr(p)); return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { std::memcpy(ptr(d), s, n); return OK; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { std::memcpy(d, ptr(s), n); return OK; }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { std::memmove(ptr(d), ptr(s), n); return OK; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoD_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { std::memset(ptr(d), v, n); return OK; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }

// ---- modules and launches ----

CUresult cuModuleLoadData(void** module, const void* image) {
    auto* m = new Module;
    const std::string ptx(static_cast<const char*>(image));
    const std::string marker = ".visible .entry ";
    for (size_t at = ptx.find(marker); at != std::string::npos; at = ptx.find(marker, at + 1)) {
        const size_t start = at + marker.size();
        const std::string name = ptx.substr(start, ptx.find('(', start) - start);
        auto k = kernels().find(name);
        if (k == kernels().end()) {
            std::fprintf(stderr, "emulated driver: no host build of kernel %s\n", name.c_str());
            delete m;
            return NOT_FOUND;
        }
        m->entries[name] = &k->second;
    }
    *module = m;
    return OK;
}
CUresult cuModuleUnload(void* module) { delete static_cast<Module*>(module); return OK; }
CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    auto& entries = static_cast<Module*>(module)->entries;
    auto e = entries.find(name);
    if (e == entries.end()) return NOT_FOUND;
    *f = const_cast<Kernel*>(e->second);
    return OK;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void*, void** params, void** extra) {
    if (by != 1 || bz != 1 || bx == 0 || bx > 1024 || shared_bytes != 0 || extra) return INVALID_VALUE;
    const Kernel* k = static_cast<const Kernel*>(f);
    emu::launch({gx, gy, gz}, {bx, 1, 1}, [&] { k->call(params); });
    return OK;
}

// ---- cuBLAS: column-major C = α·op(A)·op(B) + β·C with f32 accumulation ----

typedef int cublasStatus_t;
static int blas_token;
cublasStatus_t cublasCreate_v2(void** h) { *h = &blas_token; return 0; }
cublasStatus_t cublasDestroy_v2(void*) { return 0; }
cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }

static float load(const void* base, int type, size_t i) {
    switch (type) {
        case 0: return static_cast<const float*>(base)[i];                           // CUDA_R_32F
        case 2: return cvt_f32_f16(static_cast<const unsigned short*>(base)[i]);     // CUDA_R_16F
        case 14: return bf16_to_f32(static_cast<const unsigned short*>(base)[i]);    // CUDA_R_16BF
        default: std::abort();
    }
}

// op(A) as m rows of k values (or op(B)ᵀ as n rows): the buffer itself when it is f32 and
// k-contiguous, else a widened copy in `scratch`.
static const float* rows_of(const void* base, int type, bool k_contiguous, int rows, int k, int ld,
                            std::vector<float>& scratch) {
    if (type == 0 && k_contiguous && ld == k) return static_cast<const float*>(base);
    scratch.resize((size_t)rows * k);
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < k; ++p)
            scratch[(size_t)r * k + p] = load(base, type, k_contiguous ? (size_t)r * ld + p : (size_t)p * ld + r);
    return scratch.data();
}

static cublasStatus_t gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
                           const void* b, int bt, int ldb, float beta, float* c, int ldc) {
    std::vector<float> sa, sb;
    const float* ar = rows_of(a, at, ta != 0, m, k, lda, sa);
    const float* bc = rows_of(b, bt, tb == 0, n, k, ldb, sb);
    std::atomic<int> next{0};
    const std::function<void()> work = [&] {
        for (int j; (j = next.fetch_add(1)) < n;)
            for (int i = 0; i < m; ++i) {
                // Eight partial sums: a vectorizable dot product, in f32 as cuBLAS accumulates.
                float part[8] = {};
                const float *x = ar + (size_t)i * k, *y = bc + (size_t)j * k;
                int p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int l = 0; l < 8; ++l) part[l] += x[p + l] * y[p + l];
                float s = 0.0f;
                for (; p < k; ++p) s += x[p] * y[p];
                for (float v : part) s += v;
                float& out = c[(size_t)j * ldc + i];
                out = alpha * s + (beta != 0.0f ? beta * out : 0.0f);
            }
    };
    emu::Helpers::get().run(work);
    return 0;
}

cublasStatus_t cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                               const float* b, int ldb, const float* beta, float* c, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, a, 0, lda, b, 0, ldb, *beta, c, ldc);
}

cublasStatus_t cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                            int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    if (ct != 0 || compute != 68) return 7;  // f32 output with CUBLAS_COMPUTE_32F only
    return gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha), a, at, lda, b, bt, ldb,
                *static_cast<const float*>(beta), static_cast<float*>(c), ldc);
}

}  // extern "C"

// NCCL's all-reduce between the emulated GPUs of ranks in separate processes (libnccl.so).
#include "nccl.cpp"
