// Host shim: lets a plain C++17 compiler build a CUDA kernel source (.cu) unchanged, so its
// kernels run on the CPU and the tests can compare them with NumPy without a GPU.
//
// What it provides:
// - __global__, __device__, __host__, __forceinline__, __launch_bounds__ defined away;
// - gridDim, blockDim (globals) and blockIdx, threadIdx (thread_local) that cuda_shim::launch
//   sets while it runs the grid. Blocks run one after another, in order (x fastest). Within a
//   block, a kernel that synchronises runs every thread as an OS thread (std::thread), so:
//   * __shared__ is `static`: one variable per kernel (or device function) instantiation,
//     shared by the threads of the running block and reused by the next block (like CUDA, its
//     contents are undefined at block start; `extern __shared__` is not supported);
//   * __syncthreads() is a barrier of the block's threads; a thread that has returned from the
//     kernel no longer counts (as on current GPUs);
//   * __shfl_sync, __shfl_down_sync, __shfl_up_sync, __shfl_xor_sync (any width that divides
//     32) and __syncwarp are exchanges through a slot array per warp of 32 consecutive threads
//     (threadIdx.x fastest), synchronised by a warp barrier. Assumption, which our kernels keep
//     and CUDA requires for a full mask: every lane of the warp calls the same shuffles in the
//     same order (mask = all lanes of the warp; another mask is reported as a fault).
//   A barrier that waits 30 s (CUDA_SHIM_DEADLOCK_SECONDS) without progress, e.g. half a warp
//   in a shuffle and the other half in __syncthreads, gives the launch up with a fault instead
//   of hanging.
//   Kernels that never synchronise take a fast path: every thread of a block called one after
//   another on the caller's thread. The first launch of each exported kernel runs its first
//   block threaded; if no thread synchronised there, the rest of that grid and every later
//   launch of the kernel take the fast path. A kernel that synchronises on the fast path (only
//   in some blocks, or on some arguments) is reported as a fault (and its later launches run
//   threaded); CUDA_SHIM_THREADS=1 in the environment runs every launch threaded.
// - atomicAdd under one global mutex (threads may run at once), __ldg as a plain load;
// - isnan/isinf/fabs/sqrt/... from <cmath>, and __half as the compiler's _Float16 with the usual
//   conversions (compilers without _Float16 get a storage-only __half whose conversions abort),
//   and __nv_bfloat16 as 16-bit storage with __bfloat162float and __float2bfloat16_rn (round
//   to nearest even, NaN kept as a NaN), so bfloat16 kernels run with any compiler;
// - GPULAYERS_CPU_SHIM, which a .cu uses to skip its CUDA-only includes:
//       #ifndef GPULAYERS_CPU_SHIM
//       #include <cuda_fp16.h>
//       #include <cuda_bf16.h>
//       #endif
// - CUDA_SHIM_EXPORT(name, kernel<...>): extern "C" entry points for ctypes (see __init__.py);
// - faults: cuda_shim::fault(message) records the first fault of a launch (what a GPU would
//   report as an error, e.g. cudaErrorMisalignedAddress), and Library.launch raises it as
//   cuda_shim.KernelFault; it is thread-safe. cuda_shim::check_aligned(p, bytes) records a fault
//   when p is not a multiple of bytes: a .cu calls it, under #ifdef GPULAYERS_CPU_SHIM, in every
//   helper that makes a vector (multi-element) load or store, so CI catches a misaligned vector
//   access (such a helper should then copy with memcpy: the host compiler may use aligned
//   instructions for an over-aligned type).
// One launch at a time per process (the grid state is global).
#pragma once

#define GPULAYERS_CPU_SHIM 1

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::isinf;
using std::isnan;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 gridDim, blockDim;
inline thread_local dim3 blockIdx, threadIdx;

#ifdef __FLT16_MAX__
typedef _Float16 __half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return static_cast<__half>(f); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
#else
struct __half {
    unsigned short bits;
};
inline float __half2float(__half) { std::abort(); }
inline __half __float2half(float) { std::abort(); }
inline __half __float2half_rn(float) { std::abort(); }
#endif

// __nv_bfloat16 (cuda_bf16.h) as 16-bit storage: the top half of a float32. Conversions as
// CUDA's: to float exact; from float rounded to nearest even, a NaN becomes the canonical
// NaN 0x7fff (what __float2bfloat16_rn gives on a GPU), infinities and signed zeros kept.
struct __nv_bfloat16 {
    unsigned short bits;
};
inline float __bfloat162float(__nv_bfloat16 h)
{
    const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};
    u += 0x7fffu + ((u >> 16) & 1u);  // to nearest, ties to even; large values round to inf
    return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

namespace cuda_shim {

// First fault of the current launch ("" when none); guarded, so threads may report at once.
inline std::mutex fault_mutex;
inline char fault_message[512] = "";

inline void fault(const char* message)
{
    std::lock_guard<std::mutex> lock(fault_mutex);
    if (fault_message[0] == 0) std::snprintf(fault_message, sizeof fault_message, "%s", message);
}

// Records a misaligned-address fault unless p is a multiple of `bytes`.
inline void check_aligned(const void* p, std::size_t bytes, const char* what = "vector access")
{
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    if (bytes > 1 && address % bytes != 0) {
        char message[256];
        std::snprintf(message, sizeof message,
                      "misaligned address: %s of %zu bytes at 0x%llx (address %% %zu = %llu)",
                      what, bytes, static_cast<unsigned long long>(address), bytes,
                      static_cast<unsigned long long>(address % bytes));
        fault(message);
    }
}

inline std::mutex atomic_mutex;  // atomicAdd

// ------------------------------------------------------------------ threads of a block

struct Aborted {};  // thrown out of a barrier when the launch is given up

inline std::atomic<bool> launch_aborted{false};
inline std::atomic<bool> launch_synchronised{false};  // some thread of this launch synchronised
inline std::chrono::seconds deadlock_timeout{30};
inline void abort_launch();

// Barrier of `expected` threads; arrive_and_drop leaves it for good (a returned thread).
class Barrier {
public:
    void reset(unsigned n)
    {
        expected_ = n;
        arrived_ = 0;
    }

    // Waits until every expected thread arrived; the last one runs done() before releasing.
    template <typename F>
    void arrive_and_wait(const char* what, F done)
    {
        std::unique_lock<std::mutex> lock(mutex_);
        if (launch_aborted.load()) throw Aborted{};
        const unsigned long long generation = generation_;
        if (++arrived_ >= expected_) {
            done();
            release();
            return;
        }
        while (generation_ == generation) {
            if (launch_aborted.load()) throw Aborted{};
            if (cv_.wait_for(lock, deadlock_timeout) == std::cv_status::timeout
                    && generation_ == generation && !launch_aborted.load()) {
                char message[256];
                std::snprintf(message, sizeof message,
                              "deadlock: %s waited %lld s for %u of %u threads (block %u,%u,%u; "
                              "a barrier not reached by every thread?)", what,
                              static_cast<long long>(deadlock_timeout.count()),
                              expected_ - arrived_, expected_, blockIdx.x, blockIdx.y,
                              blockIdx.z);
                lock.unlock();
                fault(message);
                abort_launch();
                throw Aborted{};
            }
        }
    }
    void arrive_and_wait(const char* what) { arrive_and_wait(what, [] {}); }

    void arrive_and_drop()
    {
        std::lock_guard<std::mutex> lock(mutex_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) release();
    }

    void wake()
    {
        std::lock_guard<std::mutex> lock(mutex_);
        cv_.notify_all();
    }

private:
    void release()
    {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable cv_;
    unsigned expected_ = 0, arrived_ = 0;
    unsigned long long generation_ = 0;
};

// One warp: its barrier and two rounds of exchange slots (a lane writes round k + 2 only after
// every lane passed the barrier of round k + 1, so after every lane read round k).
struct Warp {
    Barrier barrier;
    unsigned size = 32;
    alignas(16) unsigned char slot[2][32][16];
};

struct Block {
    Barrier sync;                              // __syncthreads
    Barrier done;                              // end of a block, before the next
    std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* running_block = nullptr;  // the threaded launch in progress, else nullptr
inline thread_local Warp* my_warp = nullptr;
inline thread_local unsigned my_lane = 0, my_round = 0;

inline void abort_launch()
{
    launch_aborted = true;
    if (Block* b = running_block) {
        b->sync.wake();
        b->done.wake();
        for (auto& w : b->warps) w->barrier.wake();
    }
}

// Called by every synchronising primitive: false (with a fault) on the fast path.
inline bool synchronising(const char* what)
{
    launch_synchronised = true;
    if (running_block != nullptr) return true;
    char message[256];
    std::snprintf(message, sizeof message,
                  "%s in a kernel that earlier launches ran without threads; run with "
                  "CUDA_SHIM_THREADS=1", what);
    fault(message);
    return false;
}

inline void warp_check(unsigned mask, const char* what)
{
    const unsigned full = my_warp->size == 32 ? 0xffffffffu : (1u << my_warp->size) - 1;
    if (mask != full) {
        char message[256];
        std::snprintf(message, sizeof message,
                      "%s with mask 0x%x: the shim supports whole-warp masks only (0x%x)",
                      what, mask, full);
        fault(message);
    }
}

// Every lane publishes v and reads lane src's (its own when src < 0).
template <typename T>
T exchange(unsigned mask, T v, int src, const char* what)
{
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value,
                  "shuffles of at most 16 trivially copyable bytes");
    if (!synchronising(what)) return v;
    warp_check(mask, what);
    Warp& w = *my_warp;
    unsigned char (&slots)[32][16] = w.slot[my_round];
    my_round ^= 1;
    std::memcpy(slots[my_lane], &v, sizeof v);
    w.barrier.arrive_and_wait(what);
    if (src < 0 || static_cast<unsigned>(src) == my_lane) return v;
    if (static_cast<unsigned>(src) >= w.size) {
        fault("shuffle reads a lane past the end of a partial warp");
        return v;
    }
    T out;
    std::memcpy(&out, slots[src], sizeof out);
    return out;
}

}  // namespace cuda_shim

inline void __syncthreads()
{
    if (cuda_shim::synchronising("__syncthreads"))
        cuda_shim::running_block->sync.arrive_and_wait("__syncthreads");
}

inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    if (!cuda_shim::synchronising("__syncwarp")) return;
    cuda_shim::warp_check(mask, "__syncwarp");
    cuda_shim::my_warp->barrier.arrive_and_wait("__syncwarp");
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32)
{
    const int lane = static_cast<int>(cuda_shim::my_lane);
    return cuda_shim::exchange(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)),
                               "__shfl_sync");
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    const int lane = static_cast<int>(cuda_shim::my_lane), src = lane + static_cast<int>(delta);
    return cuda_shim::exchange(mask, v, src < (lane | (width - 1)) + 1 ? src : -1,
                               "__shfl_down_sync");
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    const int lane = static_cast<int>(cuda_shim::my_lane), src = lane - static_cast<int>(delta);
    return cuda_shim::exchange(mask, v, src >= (lane & ~(width - 1)) ? src : -1,
                               "__shfl_up_sync");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    const int lane = static_cast<int>(cuda_shim::my_lane), src = lane ^ lane_mask;
    return cuda_shim::exchange(mask, v, src < (lane | (width - 1)) + 1 ? src : -1,
                               "__shfl_xor_sync");
}

template <typename T>
inline T atomicAdd(T* address, T value)
{
    std::lock_guard<std::mutex> lock(cuda_shim::atomic_mutex);
    const T old = *address;
    *address = old + value;
    return old;
}

template <typename T>
inline T __ldg(const T* address) { return *address; }

namespace cuda_shim {

// Calls kernel with the arguments that args[i] point to, like cuLaunchKernel's kernelParams.
template <typename... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** args, std::index_sequence<I...>)
{
    kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// Block `linear` of the grid (x fastest).
inline dim3 block_index(unsigned long long linear, const unsigned* grid)
{
    return {static_cast<unsigned>(linear % grid[0]),
            static_cast<unsigned>(linear / grid[0] % grid[1]),
            static_cast<unsigned>(linear / (static_cast<unsigned long long>(grid[0]) * grid[1]))};
}

// The fast path: every thread of blocks first, first + 1, ... called one after another on
// this thread.
template <typename... Args>
void run_sequential(void (*kernel)(Args...), const unsigned* grid, const unsigned* block,
                    void** args, unsigned long long first)
{
    const unsigned long long blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    for (unsigned long long linear = first; linear < blocks; ++linear)
        for (unsigned tz = 0; tz < block[2]; ++tz)
            for (unsigned ty = 0; ty < block[1]; ++ty)
                for (unsigned tx = 0; tx < block[0]; ++tx) {
                    blockIdx = block_index(linear, grid);
                    threadIdx = {tx, ty, tz};
                    call(kernel, args, std::index_sequence_for<Args...>{});
                }
}

// One OS thread per thread of a block; they run the blocks one after another together.
// probe: stop after the first block unless a thread synchronised in it; returns how many
// blocks ran.
template <typename... Args>
unsigned long long run_threaded(void (*kernel)(Args...), const unsigned* grid,
                                const unsigned* block, void** args, bool probe)
{
    const unsigned threads = block[0] * block[1] * block[2];
    const unsigned long long blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    Block b;
    bool stop = false;
    unsigned long long ran = 0;
    const auto next = [&] {  // the last thread at the end of a block, before the next
        ++ran;
        stop = probe && !launch_synchronised;
        b.sync.reset(threads);
        for (auto& w : b.warps) w->barrier.reset(w->size);
    };
    for (unsigned first = 0; first < threads; first += 32) {
        b.warps.emplace_back(new Warp);
        b.warps.back()->size = threads - first < 32 ? threads - first : 32;
        b.warps.back()->barrier.reset(b.warps.back()->size);
    }
    b.sync.reset(threads);
    b.done.reset(threads);
    running_block = &b;
    const auto worker = [&](unsigned t) {
        threadIdx = {t % block[0], t / block[0] % block[1], t / (block[0] * block[1])};
        my_warp = b.warps[t / 32].get();
        my_lane = t % 32;
        try {
            for (unsigned long long linear = 0; linear < blocks; ++linear) {
                blockIdx = block_index(linear, grid);
                my_round = 0;
                call(kernel, args, std::index_sequence_for<Args...>{});
                b.sync.arrive_and_drop();
                my_warp->barrier.arrive_and_drop();
                b.done.arrive_and_wait("the end of a block", next);
                if (stop) break;
            }
        } catch (const Aborted&) {
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    try {
        for (unsigned t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    } catch (const std::exception& e) {
        char message[256];
        std::snprintf(message, sizeof message, "could not start %u threads: %s", threads,
                      e.what());
        fault(message);
        abort_launch();
    }
    for (auto& t : pool) t.join();
    running_block = nullptr;
    return ran;
}

// Per exported kernel: whether its launches synchronise (0 not known yet, 1 no, 2 yes).
using SyncState = std::atomic<int>;

// Runs grid x block (each given as 3 unsigned): threaded unless the kernel is known not to
// synchronise. A kernel's first launch runs its first block threaded; when no thread
// synchronised there, the rest of the grid and later launches take the fast path.
template <typename... Args>
void launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, void** args,
            SyncState& state)
{
    fault_message[0] = 0;
    launch_aborted = false;
    launch_synchronised = false;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const char* env = std::getenv("CUDA_SHIM_THREADS");
    const bool always = env != nullptr && env[0] == '1';
    const char* timeout = std::getenv("CUDA_SHIM_DEADLOCK_SECONDS");
    deadlock_timeout = std::chrono::seconds(timeout != nullptr && std::atoi(timeout) > 0
                                            ? std::atoi(timeout) : 30);
    unsigned long long ran = 0;
    if (always || state.load() != 1) {
        ran = run_threaded(kernel, grid, block, args, !always && state.load() == 0);
        if (launch_aborted) return;
        if (launch_synchronised) {
            state = 2;
            return;
        }
    }
    if (!always) {
        state = 1;
        run_sequential(kernel, grid, block, args, ran);
        if (launch_synchronised) state = 2;
    }
}

// Kind of a parameter as NumPy spells it: 'p' pointer, 'i' signed, 'u' unsigned integer,
// 'V' class/enum, 'f' any other (float, double, _Float16).
template <typename T>
constexpr char kind()
{
    if (std::is_pointer<T>::value) return 'p';
    if (std::is_integral<T>::value) return std::is_signed<T>::value ? 'i' : 'u';
    if (std::is_class<T>::value || std::is_enum<T>::value || std::is_union<T>::value) return 'V';
    return 'f';
}

// Size of a parameter, or of what it points to for a pointer.
template <typename T>
constexpr int size()
{
    return static_cast<int>(sizeof(std::conditional_t<std::is_pointer<T>::value,
                                                      std::remove_pointer_t<T>, T>));
}

// Writes the kernel's parameter kinds and sizes (at most cap) and returns how many there are.
template <typename... Args>
int signature(void (*)(Args...), char* kinds, int* sizes, int cap)
{
    const char k[] = {kind<Args>()..., 0};
    const int s[] = {size<Args>()..., 0};
    for (int i = 0; i < static_cast<int>(sizeof...(Args)) && i < cap; ++i) {
        kinds[i] = k[i];
        sizes[i] = s[i];
    }
    return static_cast<int>(sizeof...(Args));
}

}  // namespace cuda_shim

// The fault message of the last launch ("" when none), for ctypes.
extern "C" const char* cuda_shim_fault() { return cuda_shim::fault_message; }

// Exports kernel instantiation KERNEL (may contain commas) as two C functions:
//   void NAME(const unsigned grid[3], const unsigned block[3], void** args)
//   int NAME_signature(char* kinds, int* sizes, int cap)
#define CUDA_SHIM_EXPORT(NAME, ...)                                                       \
    extern "C" void NAME(const unsigned* grid, const unsigned* block, void** args)      \
    {                                                                                     \
        static cuda_shim::SyncState state{0};                                            \
        cuda_shim::launch(&__VA_ARGS__, grid, block, args, state);                       \
    }                                                                                     \
    extern "C" int NAME##_signature(char* kinds, int* sizes, int cap)                    \
    {                                                                                     \
        return cuda_shim::signature(&__VA_ARGS__, kinds, sizes, cap);                    \
    }
