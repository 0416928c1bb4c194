// The NCCL calls trtllm makes (cudarc's nccl module: a group per tensor-parallel set of ranks, and
// its all-reduce), emulated for ranks in separate processes on one machine: a group is a POSIX
// shared-memory segment named by its unique id, holding a barrier and one staging slot per rank.
// An all-reduce copies into the rank's slot, meets the others at the barrier and sums the slots in
// rank order (so every rank gets the same bits), then meets them again before a slot is reused;
// large buffers go through in slot-sized pieces. Everything is synchronous on the calling thread, as the emulated streams are. Included
// by driver.cpp, so the emulated libcuda.so also answers as libnccl.so.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>

namespace {

typedef int ncclResult_t;
const ncclResult_t NCCL_OK = 0, NCCL_SYSTEM_ERROR = 2, NCCL_INVALID_ARGUMENT = 4;
const int NCCL_FLOAT32 = 7, NCCL_SUM = 0;
const size_t SLOT = size_t(16) << 20;  // bytes per rank
const int MAX_RANKS = 16;

struct Header {
    std::atomic<int> arrived;
    std::atomic<int> generation;
};

struct Group {
    int rank, nranks;
    char* base;
    size_t bytes;
    Header* header() { return reinterpret_cast<Header*>(base); }
    char* slot(int r) { return base + 4096 + size_t(r) * SLOT; }
};

size_t group_bytes(int n) { return 4096 + size_t(n) * SLOT; }

// Waits until `done()`; a peer that never comes (it died) ends this process after five minutes
// rather than leaving it spinning.
template <typename F>
void wait_for(F done) {
    auto start = std::chrono::steady_clock::now();
    for (int spins = 0; !done(); ++spins) {
        if (spins < 1000) {
            sched_yield();
            continue;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        if (std::chrono::steady_clock::now() - start > std::chrono::minutes(5)) {
            std::fprintf(stderr, "emulated NCCL: a peer did not arrive in 5 minutes\n");
            std::abort();
        }
    }
}

void barrier(Group* g) {
    Header* h = g->header();
    int gen = h->generation.load(std::memory_order_acquire);
    if (h->arrived.fetch_add(1, std::memory_order_acq_rel) == g->nranks - 1) {
        h->arrived.store(0, std::memory_order_relaxed);
        h->generation.fetch_add(1, std::memory_order_acq_rel);
    } else {
        wait_for([&] { return h->generation.load(std::memory_order_acquire) != gen; });
    }
}

std::string segment_name(const char* id) { return std::string("/") + std::string(id, strnlen(id, 100)); }

}  // namespace

extern "C" {

typedef struct { char internal[128]; } ncclUniqueId;
typedef Group* ncclComm_t;

ncclResult_t ncclGetVersion(int* v) { *v = 22300; return NCCL_OK; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    static std::atomic<int> counter{0};
    std::memset(id->internal, 0, sizeof id->internal);
    auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    std::snprintf(id->internal, sizeof id->internal, "trtllm-emu-nccl-%d-%d-%lld", int(getpid()),
                  counter.fetch_add(1), static_cast<long long>(now));
    return NCCL_OK;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks) return NCCL_INVALID_ARGUMENT;
    std::string name = segment_name(id.internal);
    int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) return NCCL_SYSTEM_ERROR;
    size_t bytes = group_bytes(nranks);
    // Every rank sizes it the same; the pages are untouched (and so not allocated) until used.
    if (ftruncate(fd, off_t(bytes)) != 0) {
        close(fd);
        return NCCL_SYSTEM_ERROR;
    }
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return NCCL_SYSTEM_ERROR;
    Group* g = new Group{rank, nranks, static_cast<char*>(base), bytes};
    barrier(g);
    // Every rank has it mapped: the name can go, so nothing is left behind in /dev/shm.
    if (rank == 0) shm_unlink(name.c_str());
    *comm = g;
    return NCCL_OK;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm) {
        munmap(comm->base, comm->bytes);
        delete comm;
    }
    return NCCL_OK;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
ncclResult_t ncclCommFinalize(ncclComm_t) { return NCCL_OK; }

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op,
                           ncclComm_t g, void*) {
    if (type != NCCL_FLOAT32 || op != NCCL_SUM) return NCCL_INVALID_ARGUMENT;
    const float* in = static_cast<const float*>(send);
    float* out = static_cast<float*>(recv);
    const size_t per = SLOT / sizeof(float);
    for (size_t at = 0; at < count; at += per) {
        size_t n = std::min(per, count - at);
        std::memcpy(g->slot(g->rank), in + at, n * sizeof(float));
        barrier(g);
        for (size_t i = 0; i < n; ++i) {
            float acc = reinterpret_cast<const float*>(g->slot(0))[i];
            for (int r = 1; r < g->nranks; ++r) acc += reinterpret_cast<const float*>(g->slot(r))[i];
            out[at + i] = acc;
        }
        barrier(g);
    }
    return NCCL_OK;
}

}  // extern "C"
