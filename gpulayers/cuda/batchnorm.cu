// Batch normalization over the channels of an NCHW tensor: statistics, normalization
// and gradients, for T = float, double and __half (statistics in acc_t<T>: float for
// float and __half, double for double).
//
// Two layouts of the same tensor, chosen by the launcher (gpulayers/cuda/bn_kernels.py):
//
// * planes: channel c is N contiguous planes of HW elements, plane n at (n*C + c)*HW.
//   Grid (S, C): block (b, c) walks chunk b of the channel's N*HW elements, read as
//   vectors of V elements (V > 1 only when HW % V == 0 and pointers are 16-byte
//   aligned), plane index by multiply-shift division. Used when HW is large.
// * columns: the tensor is a row-major (N, W) matrix, W = C*HW, column j in channel
//   j / HW. Grid (S, tiles): block (b, t) covers a tile of TX*V consecutive columns and
//   chunk b of the rows; a thread owns V consecutive columns (its channels and
//   per-channel constants are fixed) and walks rows. Used when HW is small (HW = 1 is
//   plain batch norm on (N, D)); a channel then touches at most two tiles.
//
// Statistics are two-level: every block writes partial sums to `part`, a small merge
// kernel adds them per channel and writes one (kStatRows, C) block `stats`: mean, biased
// var, invstd, mean_lo and the updated running mean and var (see bn::StatRow). Sums are shifted by K = the channel's first element
// (x[0, c, 0, 0]), so a large mean does not cancel the variance: var = E[(x-K)^2] -
// E[x-K]^2. Partial layout: part[s][c][k] for s = 0 (sum), 1 (sum of squares or of
// dout*(x - mean)), k < slots (slots = S for planes, 2*S for columns).
//
// Elementwise kernels visit blocks in reverse order, so the data that the preceding
// reduction read last (still in L2) is read first.

#ifndef GPULAYERS_CPU_SHIM
#include <cuda_fp16.h>
#endif

namespace bn {

constexpr int kThreads = 256;  // every kernel but the merges runs 256-thread blocks,
                               // declared with __launch_bounds__(kThreads, 2): without the
                               // occupancy hint NVRTC 13's ptxas spilled a few bytes in
                               // some __half kernels at 48-64 registers
constexpr int kUnroll = 4;     // loads in flight per thread and input
// Columns kernels hold V accumulators or constants per thread: fewer loads in flight for
// V = 8 (__half) keep them spill-free (2 x 16 bytes per input are still plenty).
template <int V> constexpr int kColumnUnroll = V >= 8 ? 2 : kUnroll;

// Rows of the merge's output block stats[row * C + c] (gpulayers/cuda/bn_kernels.py names
// them too): batch mean, biased batch var, invstd = 1/sqrt(var + eps), mean_lo (what
// rounding the mean to acc_t<T> lost), new running mean, new running var.
enum StatRow { kMean = 0, kVar, kInvstd, kMeanLo, kRunMean, kRunVar, kStatRows };

template <typename T> struct AccType { using type = T; };
#ifndef GPULAYERS_CPU_SHIM
template <> struct AccType<__half> { using type = float; };
#endif
template <typename T> using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void from_acc(float& d, float v) { d = v; }
__device__ __forceinline__ void from_acc(double& d, double v) { d = v; }
#ifndef GPULAYERS_CPU_SHIM
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ void from_acc(__half& d, float v) { d = __float2half_rn(v); }
#endif

// V elements loaded or stored as one (16-byte when V*sizeof(T) == 16) access.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

// Vector j (< 2**31) of a channel in the planes layout: plane n = j / hwv found by
// multiply and shift (magic and shift from the host), offset in vectors of T*V.
struct PlaneIndex {
    unsigned long long plane;  // C * hwv: distance between planes n and n + 1
    unsigned long long base;   // c * hwv: plane (0, c)
    unsigned hwv, magic, shift;

    __device__ __forceinline__ unsigned long long operator()(unsigned j) const {
        const unsigned hi = (unsigned)(((unsigned long long)j * magic) >> 32);
        const unsigned n = (hi + j) >> shift;
        return (unsigned long long)n * plane + base + (j - n * hwv);
    }
};

#ifndef GPULAYERS_CPU_SHIM
// Sums a and b over the block; the totals are valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
    __shared__ A sm[2][kThreads / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sm[0][warp] = a;
        sm[1][warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < kThreads / 32 ? sm[0][lane] : A(0);
        b = lane < kThreads / 32 ? sm[1][lane] : A(0);
#pragma unroll
        for (int o = kThreads / 64; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
    }
}

// Columns layout: sums the per-thread column sums s1, s2 (V columns per thread, shared
// arrays sm1/sm2 of kThreads*V) over the TY rows of threads, then adds the columns of
// each channel in the tile and writes its two partial slots (slot 0 from the tile
// holding the channel's first column, slot 1 from the next tile or zero).
template <typename A, int V>
__device__ __forceinline__ void columns_partials(
        const A (&s1)[V], const A (&s2)[V], A* sm1, A* sm2, A* __restrict__ part,
        int C, unsigned hw, unsigned W, int tx_log2, int S, int b, unsigned tile) {
    const int TX = 1 << tx_log2;
#pragma unroll
    for (int q = 0; q < V; ++q) {
        sm1[threadIdx.x * V + q] = s1[q];
        sm2[threadIdx.x * V + q] = s2[q];
    }
    __syncthreads();
    for (int s = (kThreads >> tx_log2) / 2; s > 0; s >>= 1) {
        if ((int)(threadIdx.x >> tx_log2) < s) {
            const int other = (threadIdx.x + s * TX) * V;
#pragma unroll
            for (int q = 0; q < V; ++q) {
                sm1[threadIdx.x * V + q] += sm1[other + q];
                sm2[threadIdx.x * V + q] += sm2[other + q];
            }
        }
        __syncthreads();
    }
    const unsigned t0 = tile * TX * V;
    const unsigned t1 = t0 + TX * V < W ? t0 + TX * V : W;
    const unsigned c = t0 / hw + threadIdx.x;
    if (c > (t1 - 1) / hw) return;
    const unsigned lo = c * hw > t0 ? c * hw : t0;
    const unsigned hi = (c + 1) * hw < t1 ? (c + 1) * hw : t1;
    A a = A(0), q2 = A(0);
    for (unsigned j = lo; j < hi; ++j) {
        a += sm1[j - t0];
        q2 += sm2[j - t0];
    }
    const int which = c * hw >= t0 ? 0 : 1;
    const unsigned long long slot = ((unsigned long long)c * S + b) * 2;
    const unsigned long long second = 2ull * C * S;
    part[slot + which] = a;
    part[second + slot + which] = q2;
    if (which == 0 && (c + 1) * hw <= t1) {
        part[slot + 1] = A(0);
        part[second + slot + 1] = A(0);
    }
}
#endif  // !GPULAYERS_CPU_SHIM

}  // namespace bn

using bn::acc_t;
using bn::kThreads;
using bn::kUnroll;
using bn::Vec;

#ifndef GPULAYERS_CPU_SHIM

// Planes, block (b, c): each thread adds (x - K) and (x - K)^2 over its strided vectors
// of chunk b of channel c; the block writes part[0/1][c][b].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_stats_planes(
        const T* __restrict__ x, acc_t<T>* __restrict__ part, int C, unsigned hwv,
        unsigned magic, unsigned shift, unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    const int c = blockIdx.y, b = blockIdx.x, S = gridDim.x;
    const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x);
    const A k = bn::to_acc(x[at.base * V]);
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    A s1 = A(0), s2 = A(0);
    for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
        Vec<T, V> r[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) r[u] = xv[at(i + u * kThreads)];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
#pragma unroll
                for (int q = 0; q < V; ++q) {
                    const A d = bn::to_acc(r[u].v[q]) - k;
                    s1 += d;
                    s2 += d * d;
                }
            }
    }
    bn::block_sum2(s1, s2);
    if (threadIdx.x == 0) {
        part[(unsigned long long)c * S + b] = s1;
        part[(unsigned long long)C * S + (unsigned long long)c * S + b] = s2;
    }
}

// Columns, block (b, tile): each thread adds (x - K_c) and its square for its V columns
// over its rows of chunk b; the block writes the two slots of each channel in the tile.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_stats_columns(
        const T* __restrict__ x, acc_t<T>* __restrict__ part, int C, unsigned hw,
        int tx_log2, unsigned n, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    __shared__ A sm1[kThreads * V], sm2[kThreads * V];
    const unsigned W = C * hw, tile = blockIdx.y;
    const int b = blockIdx.x, S = gridDim.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    A s1[V], s2[V], k[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        s1[q] = s2[q] = A(0);
        k[q] = j0 < W ? bn::to_acc(x[(j0 + q) / hw * hw]) : A(0);
    }
    if (j0 < W) {
        const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x + j0);
        const unsigned wv = W / V;
        for (unsigned r = begin + ty; r < end; r += U * TY) {
            Vec<T, V> v[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) v[u] = xv[(unsigned long long)(r + u * TY) * wv];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
#pragma unroll
                    for (int q = 0; q < V; ++q) {
                        const A d = bn::to_acc(v[u].v[q]) - k[q];
                        s1[q] += d;
                        s2[q] += d * d;
                    }
                }
        }
    }
    bn::columns_partials<A, V>(s1, s2, sm1, sm2, part, C, hw, W, tx_log2, S, b, tile);
}

// Planes, block (b, c): each thread adds dout and dout*(x - mean) over its strided vectors
// of chunk b of channel c (and, if WRITE_DX, writes dx = dout*gamma*invstd: the test-mode
// gradient); the block writes part[0/1][c][b].
template <typename T, int V, bool WRITE_DX>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_reduce_planes(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
        acc_t<T>* __restrict__ part, T* __restrict__ dx, int C, unsigned hwv,
        unsigned magic, unsigned shift, unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    const int c = blockIdx.y, b = blockIdx.x, S = gridDim.x;
    const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
    const Vec<T, V>* gv = reinterpret_cast<const Vec<T, V>*>(dout);
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x);
    Vec<T, V>* dxv = reinterpret_cast<Vec<T, V>*>(dx);
    const A m = mean[c];
    const A scale = WRITE_DX ? gamma[c] * invstd[c] : A(0);
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    A s1 = A(0), s2 = A(0);
    for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
        Vec<T, V> g[kUnroll], v[kUnroll];
        unsigned long long o[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                o[u] = at(i + u * kThreads);
                g[u] = gv[o[u]];
                v[u] = xv[o[u]];
            }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q) {
                    const A gq = bn::to_acc(g[u].v[q]);
                    s1 += gq;
                    s2 += gq * (bn::to_acc(v[u].v[q]) - m);
                    if constexpr (WRITE_DX) bn::from_acc(out.v[q], gq * scale);
                }
                if constexpr (WRITE_DX) dxv[o[u]] = out;
            }
    }
    bn::block_sum2(s1, s2);
    if (threadIdx.x == 0) {
        part[(unsigned long long)c * S + b] = s1;
        part[(unsigned long long)C * S + (unsigned long long)c * S + b] = s2;
    }
}

// Columns, block (b, tile): each thread adds dout and dout*(x - mean_c) for its V columns
// over its rows of chunk b (and, if WRITE_DX, writes dx = dout*gamma*invstd); the block
// writes the two slots of each channel in the tile.
template <typename T, int V, bool WRITE_DX>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_reduce_columns(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
        acc_t<T>* __restrict__ part, T* __restrict__ dx, int C, unsigned hw,
        int tx_log2, unsigned n, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    __shared__ A sm1[kThreads * V], sm2[kThreads * V];
    const unsigned W = C * hw, tile = blockIdx.y;
    const int b = blockIdx.x, S = gridDim.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    A s1[V], s2[V], m[V], scale[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        s1[q] = s2[q] = A(0);
        const unsigned cq = j0 < W ? (j0 + q) / hw : 0;
        m[q] = mean[cq];
        scale[q] = WRITE_DX ? gamma[cq] * invstd[cq] : A(0);
    }
    if (j0 < W) {
        const Vec<T, V>* gv = reinterpret_cast<const Vec<T, V>*>(dout + j0);
        const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x + j0);
        Vec<T, V>* dxv = reinterpret_cast<Vec<T, V>*>(dx + j0);
        const unsigned wv = W / V;
        for (unsigned r = begin + ty; r < end; r += U * TY) {
            Vec<T, V> g[U], v[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
                    g[u] = gv[(unsigned long long)(r + u * TY) * wv];
                    v[u] = xv[(unsigned long long)(r + u * TY) * wv];
                }
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
                    Vec<T, V> out;
#pragma unroll
                    for (int q = 0; q < V; ++q) {
                        const A gq = bn::to_acc(g[u].v[q]);
                        s1[q] += gq;
                        s2[q] += gq * (bn::to_acc(v[u].v[q]) - m[q]);
                        if constexpr (WRITE_DX) bn::from_acc(out.v[q], gq * scale[q]);
                    }
                    if constexpr (WRITE_DX) dxv[(unsigned long long)(r + u * TY) * wv] = out;
                }
        }
    }
    bn::columns_partials<A, V>(s1, s2, sm1, sm2, part, C, hw, W, tx_log2, S, b, tile);
}

#endif  // !GPULAYERS_CPU_SHIM

// One thread per channel c: adds the `slots` partial sums of c and writes column c of the
// (kStatRows, C) block `stats`: mean, var (biased), invstd = 1/sqrt(var + eps), mean_lo (the
// part of the mean that rounding to acc_t<T> lost: a float32 mean of 1e4 is off by up to
// 5e-4) and the running statistics updated in double precision,
//   running_mean' = keep*running_mean + take*mean
//   running_var'  = keep*running_var  + take*var*var_factor
// where running_mean (running_var) is read only when bit 0 (bit 1) of `given` is set, else
// taken as 0 (var_default). Reads K = x[c*hw].
template <typename T>
__global__ void bn_stats_merge(
        const T* __restrict__ x, const acc_t<T>* __restrict__ part, int C, int slots,
        long long hw, double count, double eps, const acc_t<T>* __restrict__ running_mean,
        const acc_t<T>* __restrict__ running_var, int given, double keep, double take,
        double var_factor, double var_default, acc_t<T>* __restrict__ stats) {
    using A = acc_t<T>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const A* p1 = part + (unsigned long long)c * slots;
    const A* p2 = p1 + (unsigned long long)C * slots;
    double s1[4] = {0.0, 0.0, 0.0, 0.0}, s2[4] = {0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 4 <= slots; k += 4)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            s1[u] += (double)p1[k + u];
            s2[u] += (double)p2[k + u];
        }
    for (; k < slots; ++k) {
        s1[0] += (double)p1[k];
        s2[0] += (double)p2[k];
    }
    const double d = ((s1[0] + s1[1]) + (s1[2] + s1[3])) / count;
    double v = ((s2[0] + s2[1]) + (s2[2] + s2[3])) / count - d * d;
    v = v > 0.0 ? v : 0.0;
    const double pivot = (double)bn::to_acc(x[c * hw]);
    const A m = (A)(pivot + d);
    const double rm = (given & 1) ? (double)running_mean[c] : 0.0;
    const double rv = (given & 2) ? (double)running_var[c] : var_default;
    stats[bn::kMean * C + c] = m;
    stats[bn::kVar * C + c] = (A)v;
    stats[bn::kInvstd * C + c] = (A)(1.0 / sqrt(v + eps));
    stats[bn::kMeanLo * C + c] = (A)((pivot - (double)m) + d);
    stats[bn::kRunMean * C + c] = (A)(keep * rm + take * (pivot + d));
    stats[bn::kRunVar * C + c] = (A)(keep * rv + take * (v * var_factor));
}

// One thread per channel c: adds the `slots` partial sums of c and writes
// dbeta[c] = sum(dout) and dgamma[c] = invstd[c] * sum(dout*(x - mean)).
template <typename A>
__global__ void bn_backward_merge(
        const A* __restrict__ part, int C, int slots, const A* __restrict__ invstd,
        A* __restrict__ dgamma, A* __restrict__ dbeta) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const A* p1 = part + (unsigned long long)c * slots;
    const A* p2 = p1 + (unsigned long long)C * slots;
    double s1[4] = {0.0, 0.0, 0.0, 0.0}, s2[4] = {0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 4 <= slots; k += 4)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            s1[u] += (double)p1[k + u];
            s2[u] += (double)p2[k + u];
        }
    for (; k < slots; ++k) {
        s1[0] += (double)p1[k];
        s2[0] += (double)p2[k];
    }
    dbeta[c] = (A)((s1[0] + s1[1]) + (s1[2] + s1[3]));
    dgamma[c] = (A)((double)invstd[c] * ((s2[0] + s2[1]) + (s2[2] + s2[3])));
}

// Per-channel constants of the apply kernels, y = (x - m - lo)*scale + shift. Train mode
// (batch_stats != 0): mean, mean_lo and invstd from the merge's block `stats`. Test mode:
// mean = run_mean[c], lo = 0, invstd = 1/sqrt(run_var[c] + eps), and the thread that
// `writes` stores that invstd to invstd_out[c] (backward needs it).
namespace bn {
template <typename A>
struct ApplyConstants {
    A m, lo, scale, shift;
    __device__ __forceinline__ ApplyConstants(
            unsigned c, int C, const A* __restrict__ gamma, const A* __restrict__ beta,
            const A* __restrict__ stats, const A* __restrict__ run_mean,
            const A* __restrict__ run_var, int batch_stats, double eps,
            A* __restrict__ invstd_out, bool writes) {
        A inv;
        if (batch_stats) {
            inv = stats[bn::kInvstd * C + c];
            m = stats[bn::kMean * C + c];
            lo = stats[bn::kMeanLo * C + c];
        } else {
            inv = (A)(1.0 / sqrt((double)run_var[c] + eps));
            m = run_mean[c];
            lo = A(0);
            if (writes) invstd_out[c] = inv;
        }
        scale = gamma[c] * inv;
        shift = beta[c];
    }
};
}  // namespace bn

// Planes, block (S-1-b, C-1-c): each thread writes y = (x - mean - mean_lo)*gamma*invstd +
// beta for its strided vectors of chunk b of channel c (constants: ApplyConstants; in test
// mode thread 0 of block b = 0 writes invstd_out[c]).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_apply_planes(
        const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ beta, const acc_t<T>* __restrict__ stats,
        const acc_t<T>* __restrict__ run_mean, const acc_t<T>* __restrict__ run_var,
        int batch_stats, double eps, acc_t<T>* __restrict__ invstd_out, T* __restrict__ y,
        int C, unsigned hwv, unsigned magic, unsigned shift, unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    const int c = C - 1 - (int)blockIdx.y, b = gridDim.x - 1 - blockIdx.x;
    const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x);
    Vec<T, V>* yv = reinterpret_cast<Vec<T, V>*>(y);
    const bn::ApplyConstants<A> k(c, C, gamma, beta, stats, run_mean, run_var, batch_stats, eps,
                                  invstd_out, b == 0 && threadIdx.x == 0);
    const A m = k.m, lo = k.lo, scale = k.scale, shift_c = k.shift;
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
        Vec<T, V> r[kUnroll];
        unsigned long long o[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                o[u] = at(i + u * kThreads);
                r[u] = xv[o[u]];
            }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], (bn::to_acc(r[u].v[q]) - m - lo) * scale + shift_c);
                yv[o[u]] = out;
            }
    }
}

// Columns, block (S-1-b, tiles-1-tile): each thread writes y = (x - mean - mean_lo)*gamma*
// invstd + beta for its V columns over its rows of chunk b (constants: ApplyConstants; in test
// mode the thread of row 0 of block b = 0 holding a channel's first column writes
// invstd_out[c]).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_apply_columns(
        const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ beta, const acc_t<T>* __restrict__ stats,
        const acc_t<T>* __restrict__ run_mean, const acc_t<T>* __restrict__ run_var,
        int batch_stats, double eps, acc_t<T>* __restrict__ invstd_out, T* __restrict__ y,
        int C, unsigned hw, int tx_log2, unsigned n, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    const unsigned W = C * hw, tile = gridDim.y - 1 - blockIdx.y;
    const int b = gridDim.x - 1 - blockIdx.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    if (j0 >= W) return;
    A m[V], lo[V], scale[V], shift_c[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const unsigned cq = (j0 + q) / hw;
        const bn::ApplyConstants<A> k(cq, C, gamma, beta, stats, run_mean, run_var, batch_stats,
                                      eps, invstd_out, b == 0 && ty == 0 && (j0 + q) % hw == 0);
        m[q] = k.m;
        lo[q] = k.lo;
        scale[q] = k.scale;
        shift_c[q] = k.shift;
    }
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x + j0);
    Vec<T, V>* yv = reinterpret_cast<Vec<T, V>*>(y + j0);
    const unsigned wv = W / V;
    for (unsigned r = begin + ty; r < end; r += U * TY) {
        Vec<T, V> v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) v[u] = xv[(unsigned long long)(r + u * TY) * wv];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], (bn::to_acc(v[u].v[q]) - m[q] - lo[q]) * scale[q] + shift_c[q]);
                yv[(unsigned long long)(r + u * TY) * wv] = out;
            }
    }
}

// Planes, block (S-1-b, C-1-c): each thread writes the train-mode gradient
// dx = a*dout + e*(x - mean) + f (a = gamma*invstd, e = -a*invstd*dgamma/count,
// f = -a*dbeta/count) for its strided vectors of chunk b of channel c.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_dx_planes(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
        const acc_t<T>* __restrict__ dgamma, const acc_t<T>* __restrict__ dbeta, double count,
        T* __restrict__ dx, int C, unsigned hwv, unsigned magic, unsigned shift,
        unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    const int c = C - 1 - (int)blockIdx.y, b = gridDim.x - 1 - blockIdx.x;
    const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
    const Vec<T, V>* gv = reinterpret_cast<const Vec<T, V>*>(dout);
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x);
    Vec<T, V>* dxv = reinterpret_cast<Vec<T, V>*>(dx);
    const A m = mean[c], a = gamma[c] * invstd[c];
    const A e = (A)(-(double)a * (double)invstd[c] * (double)dgamma[c] / count);
    const A f = (A)(-(double)a * (double)dbeta[c] / count);
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
        Vec<T, V> g[kUnroll], v[kUnroll];
        unsigned long long o[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                o[u] = at(i + u * kThreads);
                g[u] = gv[o[u]];
                v[u] = xv[o[u]];
            }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (i + u * kThreads < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], a * bn::to_acc(g[u].v[q])
                                           + e * (bn::to_acc(v[u].v[q]) - m) + f);
                dxv[o[u]] = out;
            }
    }
}

// Columns, block (S-1-b, tiles-1-tile): each thread writes the train-mode gradient (as in
// bn_backward_dx_planes) for its V columns over its rows of chunk b.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_dx_columns(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
        const acc_t<T>* __restrict__ dgamma, const acc_t<T>* __restrict__ dbeta, double count,
        T* __restrict__ dx, int C, unsigned hw, int tx_log2, unsigned n, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    const unsigned W = C * hw, tile = gridDim.y - 1 - blockIdx.y;
    const int b = gridDim.x - 1 - blockIdx.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    if (j0 >= W) return;
    A m[V], a[V], e[V], f[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const unsigned cq = (j0 + q) / hw;
        m[q] = mean[cq];
        a[q] = gamma[cq] * invstd[cq];
        e[q] = (A)(-(double)a[q] * (double)invstd[cq] * (double)dgamma[cq] / count);
        f[q] = (A)(-(double)a[q] * (double)dbeta[cq] / count);
    }
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    const Vec<T, V>* gv = reinterpret_cast<const Vec<T, V>*>(dout + j0);
    const Vec<T, V>* xv = reinterpret_cast<const Vec<T, V>*>(x + j0);
    Vec<T, V>* dxv = reinterpret_cast<Vec<T, V>*>(dx + j0);
    const unsigned wv = W / V;
    for (unsigned r = begin + ty; r < end; r += U * TY) {
        Vec<T, V> g[U], v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                g[u] = gv[(unsigned long long)(r + u * TY) * wv];
                v[u] = xv[(unsigned long long)(r + u * TY) * wv];
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], a[q] * bn::to_acc(g[u].v[q])
                                           + e[q] * (bn::to_acc(v[u].v[q]) - m[q]) + f[q]);
                dxv[(unsigned long long)(r + u * TY) * wv] = out;
            }
    }
}
