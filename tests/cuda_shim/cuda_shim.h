// Host shim: lets a plain C++17 compiler build a CUDA kernel source (.cu) unchanged, so its
// kernels run on the CPU and the tests can compare them with NumPy without a GPU.
//
// What it provides:
// - __global__, __device__, __host__, __forceinline__, __launch_bounds__ defined away;
// - gridDim, blockDim, blockIdx, threadIdx as globals that cuda_shim::launch sets while it runs
//   every thread of every block one after another (grid-stride kernels see the same coverage as
//   on a GPU; __shared__ and __syncthreads are NOT emulated and fail to compile);
// - atomicAdd as a plain add (threads run one at a time), __ldg as a plain load;
// - isnan/isinf/fabs/sqrt/... from <cmath>, and __half as the compiler's _Float16 with the usual
//   conversions (compilers without _Float16 get a storage-only __half whose conversions abort);
// - GPULAYERS_CPU_SHIM, which a .cu uses to skip its CUDA-only includes:
//       #ifndef GPULAYERS_CPU_SHIM
//       #include <cuda_fp16.h>
//       #endif
// - CUDA_SHIM_EXPORT(name, kernel<...>): extern "C" entry points for ctypes (see __init__.py);
// - faults: cuda_shim::fault(message) records the first fault of a launch (what a GPU would
//   report as an error, e.g. cudaErrorMisalignedAddress), and Library.launch raises it as
//   cuda_shim.KernelFault. cuda_shim::check_aligned(p, bytes) records a fault when p is not
//   a multiple of bytes: a .cu calls it, under #ifdef GPULAYERS_CPU_SHIM, in every helper that
//   makes a vector (multi-element) load or store, so CI catches a misaligned vector access.
#pragma once

#define GPULAYERS_CPU_SHIM 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::isinf;
using std::isnan;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 gridDim, blockDim, blockIdx, threadIdx;

template <typename T>
inline T atomicAdd(T* address, T value)
{
    const T old = *address;
    *address = old + value;
    return old;
}

template <typename T>
inline T __ldg(const T* address) { return *address; }

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

// Calls kernel with the arguments that args[i] point to, like cuLaunchKernel's kernelParams.
template <typename... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** args, std::index_sequence<I...>)
{
    kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// Runs every thread of grid x block (each given as 3 unsigned), one after another.
template <typename... Args>
void launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, void** args)
{
    fault_message[0] = 0;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    for (unsigned bz = 0; bz < grid[2]; ++bz)
        for (unsigned by = 0; by < grid[1]; ++by)
            for (unsigned bx = 0; bx < grid[0]; ++bx)
                for (unsigned tz = 0; tz < block[2]; ++tz)
                    for (unsigned ty = 0; ty < block[1]; ++ty)
                        for (unsigned tx = 0; tx < block[0]; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            call(kernel, args, std::index_sequence_for<Args...>{});
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

// Exports kernel instantiation KERNEL (may contain commas) as two C functions:
//   void NAME(const unsigned grid[3], const unsigned block[3], void** args)
//   int NAME_signature(char* kinds, int* sizes, int cap)
// The fault message of the last launch ("" when none), for ctypes.
extern "C" const char* cuda_shim_fault() { return cuda_shim::fault_message; }

#define CUDA_SHIM_EXPORT(NAME, ...)                                                       \
    extern "C" void NAME(const unsigned* grid, const unsigned* block, void** args)      \
    {                                                                                     \
        cuda_shim::launch(&__VA_ARGS__, grid, block, args);                              \
    }                                                                                     \
    extern "C" int NAME##_signature(char* kinds, int* sizes, int cap)                    \
    {                                                                                     \
        return cuda_shim::signature(&__VA_ARGS__, kinds, sizes, cap);                    \
    }
