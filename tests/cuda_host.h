// The CUDA C that kernels/*.cu use, mapped to host C++ so the tests can run those kernels on a CPU.
//
// A launch runs the blocks of the grid one after another; the threads of a block are real
// concurrent std::threads, and __syncthreads() is a barrier among them, so a missing barrier
// races here as it does on a GPU. __shared__ variables become statics in one linker section that
// every block of the launch shares; before each block the launcher fills that section with a
// 0xA5 pattern, as a GPU leaves shared memory holding whatever was there, so a read of shared
// memory that no thread of the block has written yet gives a visibly wrong value.
//
// Launch rules a GPU enforces are enforced here too: every grid and block dimension >= 1, at most
// 1024 threads a block. A barrier that some threads of a block reach while the others have left
// the kernel, or one that no thread passes within a minute, fails the launch with a message.
#pragma once

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace cuda_host {

inline thread_local dim3 thread_index;
inline thread_local dim3 block_index;
inline dim3 block_dimensions;
inline dim3 grid_dimensions;

// One barrier for the threads of a block: __syncthreads() and the end of a block both wait on it;
// a phase in which some threads called __syncthreads() and others finished the block is an error.
class BlockBarrier {
  public:
    explicit BlockBarrier(unsigned threads) : threads_(threads) {}

    // kind 0: __syncthreads(); kind 1: the thread finished the block. Runs `between_blocks` once
    // when a phase of kind 1 completes, before any thread goes on.
    template <class Between>
    void wait(int kind, Between&& between_blocks) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (broken_) return;
        kinds_seen_ |= 1 << kind;
        if (++arrived_ == threads_) {
            if (kinds_seen_ == 3) fail("__syncthreads() reached by only some threads of a block");
            if (kind == 1) between_blocks();
            arrived_ = 0;
            kinds_seen_ = 0;
            ++generation_;
            lock.unlock();
            released_.notify_all();
            return;
        }
        const unsigned long long generation = generation_;
        if (!released_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation || broken_; })) {
            fail("a barrier was not passed within 60 s (a __syncthreads() that not every thread reaches?)");
            released_.notify_all();
        }
    }

    bool broken() {
        std::lock_guard<std::mutex> lock(mutex_);
        return broken_;
    }
    std::string error() {
        std::lock_guard<std::mutex> lock(mutex_);
        return error_;
    }

  private:
    void fail(const char* why) {  // called with the mutex held; later waits return at once
        if (!broken_) error_ = why;
        broken_ = true;
    }

    const unsigned threads_;
    unsigned arrived_ = 0;
    int kinds_seen_ = 0;
    unsigned long long generation_ = 0;
    bool broken_ = false;
    std::string error_;
    std::mutex mutex_;
    std::condition_variable released_;
};

inline BlockBarrier* current_barrier = nullptr;

}  // namespace cuda_host

// Bounds of the section holding every __shared__ variable of this shared library (GNU ld defines
// __start_/__stop_ symbols for sections whose names are C identifiers).
extern "C" char __start_cuda_host_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_cuda_host_shared[] __attribute__((weak, visibility("hidden")));

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("cuda_host_shared")))
#define threadIdx (::cuda_host::thread_index)
#define blockIdx (::cuda_host::block_index)
#define blockDim (::cuda_host::block_dimensions)
#define gridDim (::cuda_host::grid_dimensions)

inline void __syncthreads() { ::cuda_host::current_barrier->wait(0, [] {}); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }

namespace cuda_host {

inline void scribble_shared_memory() {
    if (__start_cuda_host_shared != nullptr)
        std::memset(__start_cuda_host_shared, 0xA5, static_cast<std::size_t>(__stop_cuda_host_shared - __start_cuda_host_shared));
}

template <class... Params, std::size_t... I>
void call_kernel(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
}

// Runs kernel<<<grid, block>>>(args...): args[i] points at the value of parameter i, as in
// cudaLaunchKernel. Returns 0, or -1 with a message in error.
template <class... Params>
int launch(void (*kernel)(Params...), const unsigned* grid, const unsigned* block, void** args, char* error, std::size_t error_size) {
    const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
    auto refuse = [&](const char* why) {
        std::snprintf(error, error_size, "%s", why);
        return -1;
    };
    if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
        return refuse("invalid configuration argument: a grid or block dimension is 0");
    const unsigned threads = b.x * b.y * b.z;
    if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) return refuse("invalid configuration argument: more than 1024 threads a block");
    if (g.y > 65535 || g.z > 65535) return refuse("invalid configuration argument: gridDim.y or gridDim.z above 65535");
    block_dimensions = b;
    grid_dimensions = g;
    BlockBarrier barrier(threads);
    current_barrier = &barrier;
    scribble_shared_memory();
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            thread_index = dim3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
            for (unsigned z = 0; z < g.z; ++z)
                for (unsigned y = 0; y < g.y; ++y)
                    for (unsigned x = 0; x < g.x; ++x) {
                        block_index = dim3{x, y, z};
                        if (!barrier.broken()) call_kernel(kernel, args, std::index_sequence_for<Params...>{});
                        barrier.wait(1, scribble_shared_memory);
                    }
        });
    }
    for (std::thread& thread : pool) thread.join();
    current_barrier = nullptr;
    if (barrier.broken()) return refuse(barrier.error().c_str());
    return 0;
}

// The parameter list as "p8,i4,u8,f4": pointer, signed or unsigned integer, floating point; bytes.
template <class... Params>
const char* signature(void (*)(Params...)) {
    static const std::string text = [] {
        std::string s;
        auto add = [&s](char kind, std::size_t bytes) { s += (s.empty() ? "" : ",") + std::string(1, kind) + std::to_string(bytes); };
        (add(std::is_pointer_v<Params> ? 'p' : std::is_floating_point_v<Params> ? 'f' : std::is_signed_v<Params> ? 'i' : 'u', sizeof(Params)), ...);
        return s;
    }();
    return text.c_str();
}

}  // namespace cuda_host

// Exports kernel `name` as cuda_host_launch_<name> and cuda_host_signature_<name> (extern "C").
#define CUDA_HOST_EXPORT(name)                                                                                           \
    extern "C" int cuda_host_launch_##name(const unsigned* grid, const unsigned* block, void** args, char* error,       \
                                           std::size_t error_size) {                                                    \
        return ::cuda_host::launch(name, grid, block, args, error, error_size);                                         \
    }                                                                                                                    \
    extern "C" const char* cuda_host_signature_##name() { return ::cuda_host::signature(name); }
