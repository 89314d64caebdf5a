// Batch normalization over the channels of an NCHW tensor: statistics, normalization
// and gradients, for T = float, double, __half and __nv_bfloat16 (statistics in acc_t<T>:
// float for float, __half and __nv_bfloat16, double for double; outputs rounded to T to
// nearest even).
//
// Two layouts of the same tensor, chosen by the launcher (gpulayers/cuda/bn_kernels.py):
//
// * planes: channel c is N contiguous planes of HW elements, plane n at (n*C + c)*HW.
//   Grid (S, min(C, 65535)): block (b, y) walks chunk b of channels y, y + gridDim.y, ...
//   (N*HW elements each), read as vectors of V elements (V > 1 only when HW % V == 0 and
//   pointers are 16-byte aligned), plane index by multiply-shift division. Used when HW is
//   large.
// * columns: the tensor is a row-major (N, W) matrix, W = C*HW, column j in channel
//   j / HW. Grid (S, tiles): block (b, t) covers a tile of TX*V consecutive columns and
//   chunk b of the rows; a thread owns V consecutive columns (its channels and
//   per-channel constants are fixed) and walks rows. Used when HW is small (HW = 1 is
//   plain batch norm on (N, D)); a channel then touches at most two tiles, a tile holds at
//   most 256 channels. TX = 32 (8 rows of threads), wider (up to 256) when N has fewer
//   rows than that, so that at least 75% of launched threads have work.
//
// Every vector load and store goes through bn::load / bn::store (alignment-checked on the CPU
// shim).
//
// Statistics are two-level and centred throughout, as PyTorch's Welford
// batch_norm_collect_statistics: no sample is special. Each thread keeps the moments of the
// values it read -- count n, mean = hi + lo (an unevaluated sum of two acc_t<T>, so a float
// mean of 1e4 keeps its low bits) and M2 = sum of squared deviations from the mean. Per loaded
// chunk (up to kUnroll vectors) it computes the chunk's mean and M2 in registers, centred on
// its running mean (the chunk's first value for the first chunk), and merges them by Chan's
// formula
//   delta = mean_b - mean_a,  mean = mean_a + delta*n_b/n,  M2 = M2_a + M2_b + delta^2*n_a*n_b/n
// (bn::chan); threads merge the same way across a warp (shuffles), the warps of a block and,
// in the columns layout, the rows of threads and the columns of a channel. Every block writes
// the moments of its part of a channel to `part`. Partial layout: part[row][c][k] for row =
// bn::PartRow (count, mean hi, mean lo, M2) and k < slots (slots = S for planes, 2*S for
// columns). Counts are exact: the launcher keeps every slot's count below 2**24.
//
// Launches per op: train forward 2 (bn_stats_*, then bn_apply_*<TRAIN = true>), eval forward
// 1 (bn_apply_*<false>), train backward 2 (bn_backward_reduce_*<false>, bn_backward_dx_*),
// test backward 2 (bn_backward_reduce_*<true>, which writes dx, then bn_backward_merge). No
// merge kernel of its own in train mode: every block of the second kernel merges the slots of
// its channels itself, in double, in one fixed order (bn::merge_chains: 4 lanes per channel,
// chain u takes slots u, u + 4, ..., then the chains 0+1, 2+3, (0+1)+(2+3)), so every block
// of a channel -- and the test-mode merge kernel -- gets the same bits, and one designated
// block per channel (b = 0, in the tile of the channel's first column) writes the per-channel
// results: the (kStatRows, C) block `stats` (mean, biased var, invstd, mean_lo and the updated
// running mean and var, bn::StatRow), or dgamma and dbeta. The order of every merge is fixed
// and no kernel uses atomics: results are deterministic, bit for bit.
//
// Synchronized batch norm (a communicator, gpulayers/cuda/bn_kernels.py) adds bn_stats_merge:
// it merges a rank's slots into one (count, mean, mean_lo, M2) record per channel; the ranks'
// gathered records are then the apply kernel's slots (one per rank), and the backward's
// summed shares the dx kernel's single slot.
//
// Backward sums dout and dout*(x - mean - mean_lo) per channel the same two-level way (plain
// sums; part[0/1][c][k]).
//
// Elementwise kernels visit blocks in reverse order, so the data that the preceding
// reduction read last (still in L2) is read first.

#ifndef GPULAYERS_CPU_SHIM
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bn {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks, the big ones
                               // declared with __launch_bounds__(kThreads, 2): without the
                               // occupancy hint NVRTC 13's ptxas spilled a few bytes in
                               // some __half kernels at 48-64 registers
constexpr int kUnroll = 4;     // loads in flight per thread and input
// Columns kernels hold V accumulators or constants per thread: fewer loads in flight for
// V = 8 (__half) keep them spill-free (2 x 16 bytes per input are still plenty).
template <int V> constexpr int kColumnUnroll = V >= 8 ? 2 : kUnroll;

// Rows of the train forward's output block stats[row * C + c] (gpulayers/cuda/bn_kernels.py names
// them too): batch mean, biased batch var, invstd = 1/sqrt(var + eps), mean_lo (what
// rounding the mean to acc_t<T> lost), new running mean, new running var.
enum StatRow { kMean = 0, kVar, kInvstd, kMeanLo, kRunMean, kRunVar, kStatRows };

// Rows of the statistics partials part[(row * C + c) * slots + k]: count, mean (hi + lo), M2.
enum PartRow { kPartCount = 0, kPartHi, kPartLo, kPartM2, kPartRows };

template <typename T> struct AccType { using type = T; };
template <> struct AccType<__half> { using type = float; };
template <> struct AccType<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_acc(float& d, float v) { d = v; }
__device__ __forceinline__ void from_acc(double& d, double v) { d = v; }
__device__ __forceinline__ void from_acc(__half& d, float v) { d = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }

// V elements loaded or stored as one (16-byte when V*sizeof(T) == 16) access.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

// Vector i of p: elements p[i*V .. i*V + V-1] as one access. The CPU shim checks that the
// address is a multiple of the vector's size (a GPU faults otherwise) and copies bytewise.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* __restrict__ p, unsigned long long i) {
    const Vec<T, V>* a = reinterpret_cast<const Vec<T, V>*>(p + i * V);
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(a, sizeof(Vec<T, V>), "bn::load");
    Vec<T, V> r;
    std::memcpy(&r, a, sizeof r);
    return r;
#else
    return *a;
#endif
}

// Stores r as vector i of p (see load).
template <typename T, int V>
__device__ __forceinline__ void store(T* __restrict__ p, unsigned long long i, const Vec<T, V>& r) {
    Vec<T, V>* a = reinterpret_cast<Vec<T, V>*>(p + i * V);
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(a, sizeof(Vec<T, V>), "bn::store");
    std::memcpy(a, &r, sizeof r);
#else
    *a = r;
#endif
}

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

// Moments of some values: mean = hi + lo (|lo| <= ulp(hi)/2 after two_sum), m2 = sum of the
// squared deviations from the mean. The count is kept (or known) by the caller.
template <typename A> struct Moments { A hi, lo, m2; };

// hi + lo = a + b exactly, hi = a + b rounded (Knuth's two-sum).
template <typename A>
__device__ __forceinline__ void two_sum(A a, A b, A& hi, A& lo) {
    const A s = a + b, bb = s - a;
    lo = (a - (s - bb)) + (b - bb);
    hi = s;
}

// Chan's merge of b (n_b values) into a (n_a values), given w = n_b/(n_a + n_b) and
// wn = n_a*w; a_empty (n_a == 0) takes b.
template <typename A>
__device__ __forceinline__ void chan(Moments<A>& a, const Moments<A>& b, bool a_empty, A w, A wn) {
    if (a_empty) {
        two_sum(b.hi, b.lo, a.hi, a.lo);
        a.m2 = b.m2;
        return;
    }
    const A delta = (b.hi - a.hi) + (b.lo - a.lo);
    const A lo = a.lo + delta * w;
    a.m2 = (a.m2 + b.m2) + delta * delta * wn;
    two_sum(a.hi, lo, a.hi, a.lo);
}

// merges (nb, b) into (na, a).
template <typename A>
__device__ __forceinline__ void merge(unsigned& na, Moments<A>& a, unsigned nb, const Moments<A>& b) {
    if (nb == 0) return;
    const A w = A(nb) / A(na + nb);
    chan(a, b, na == 0, w, A(na) * w);
    na += nb;
}

// Values t, t + step, ... below rows: how many there are.
__device__ __forceinline__ unsigned strided_count(unsigned rows, unsigned t, unsigned step) {
    return t < rows ? (rows - 1 - t) / step + 1 : 0u;
}

// Merges (n, s) over the warp by shuffles; the result is valid in lane 0.
template <typename A>
__device__ __forceinline__ void warp_moments(unsigned& n, Moments<A>& s, int width) {
    for (int o = width / 2; o > 0; o >>= 1) {
        const unsigned nb = __shfl_down_sync(0xffffffffu, n, o);
        const Moments<A> b{__shfl_down_sync(0xffffffffu, s.hi, o),
                           __shfl_down_sync(0xffffffffu, s.lo, o),
                           __shfl_down_sync(0xffffffffu, s.m2, o)};
        merge(n, s, nb, b);
    }
}

// Merges (n, s) over the block; the result is valid in thread 0. Every thread calls it
// (also repeatedly: it begins with a barrier).
template <typename A>
__device__ __forceinline__ void block_moments(unsigned& n, Moments<A>& s) {
    __shared__ unsigned smn[kThreads / 32];
    __shared__ A sm[3][kThreads / 32];
    warp_moments(n, s, 32);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's reads of sm are over
    if (lane == 0) {
        smn[warp] = n;
        sm[0][warp] = s.hi;
        sm[1][warp] = s.lo;
        sm[2][warp] = s.m2;
    }
    __syncthreads();
    if (warp == 0) {
        const bool live = lane < kThreads / 32;
        n = live ? smn[lane] : 0u;
        s = live ? Moments<A>{sm[0][lane], sm[1][lane], sm[2][lane]} : Moments<A>{A(0), A(0), A(0)};
        warp_moments(n, s, kThreads / 32);
    }
}

// Writes the moments (n, s) as slot k of channel c in the partials (slots per channel).
template <typename A>
__device__ __forceinline__ void write_moments(A* __restrict__ part, int C, int slots, unsigned c,
                                              int k, unsigned n, const Moments<A>& s) {
    const unsigned long long row = (unsigned long long)C * slots, at = (unsigned long long)c * slots + k;
    part[kPartCount * row + at] = A(n);
    part[kPartHi * row + at] = s.hi;
    part[kPartLo * row + at] = s.lo;
    part[kPartM2 * row + at] = s.m2;
}

// Columns layout: merges the per-thread column moments s (V columns per thread; every
// thread of row ty of the block saw rows ty, ty + TY, ... of the chunk's `rows`) over the TY
// rows of threads in shared sm, then the columns of each channel in the tile, and writes
// its two partial slots (slot 0 from the tile holding the channel's first column, slot 1
// from the next tile or empty).
template <typename A, int V>
__device__ __forceinline__ void columns_moments(
        const Moments<A> (&s)[V], A (&sm)[3][kThreads * V], A* __restrict__ part, int C,
        unsigned hw, unsigned W, int tx_log2, int S, int b, unsigned tile, unsigned rows) {
    const int TX = 1 << tx_log2;
    const unsigned ty = threadIdx.x >> tx_log2;
#pragma unroll
    for (int q = 0; q < V; ++q) {
        sm[0][threadIdx.x * V + q] = s[q].hi;
        sm[1][threadIdx.x * V + q] = s[q].lo;
        sm[2][threadIdx.x * V + q] = s[q].m2;
    }
    __syncthreads();
    // entry ty holds the rows = ty (mod 2h) of the chunk; it takes those of entry ty + h
    for (int h = (kThreads >> tx_log2) / 2; h > 0; h >>= 1) {
        if ((int)ty < h) {
            const unsigned na = strided_count(rows, ty, 2 * h), nb = strided_count(rows, ty + h, 2 * h);
            if (nb > 0) {
                const A w = A(nb) / A(na + nb), wn = A(na) * w;
                const int self = threadIdx.x * V, other = (threadIdx.x + h * TX) * V;
#pragma unroll
                for (int q = 0; q < V; ++q) {
                    Moments<A> a{sm[0][self + q], sm[1][self + q], sm[2][self + q]};
                    chan(a, Moments<A>{sm[0][other + q], sm[1][other + q], sm[2][other + q]},
                         na == 0, w, wn);
                    sm[0][self + q] = a.hi;
                    sm[1][self + q] = a.lo;
                    sm[2][self + q] = a.m2;
                }
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
    // columns lo .. hi-1 of channel c, `rows` values each, merged in order
    Moments<A> a{A(0), A(0), A(0)};
    for (unsigned j = lo; j < hi; ++j) {
        const unsigned k = j - lo;
        chan(a, Moments<A>{sm[0][j - t0], sm[1][j - t0], sm[2][j - t0]}, k == 0,
             A(1) / A(k + 1), A(k) / A(k + 1) * A(rows));
    }
    const int which = c * hw >= t0 ? 0 : 1;
    write_moments(part, C, 2 * S, c, 2 * b + which, rows * (hi - lo), a);
    if (which == 0 && (c + 1) * hw <= t1)
        write_moments(part, C, 2 * S, c, 2 * b + 1, 0u, Moments<A>{A(0), A(0), A(0)});
}

// Sums a and b over the block; the totals are valid in thread 0. Every thread calls it
// (also repeatedly: it begins with a barrier).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
    __shared__ A sm[2][kThreads / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's reads of sm are over
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

}  // namespace bn

using bn::acc_t;
using bn::kThreads;
using bn::kUnroll;
using bn::Vec;

// Planes, block (b, y): for each of its channels c = y, y + gridDim.y, ..., each thread merges
// the moments of its strided vectors of chunk b of channel c, one chunk of up to kUnroll
// vectors at a time; the block writes their moments to slot b of c in `part`.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_stats_planes(
        const T* __restrict__ x, acc_t<T>* __restrict__ part, int C, unsigned hwv,
        unsigned magic, unsigned shift, unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    const int b = blockIdx.x, S = gridDim.x;
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
        unsigned n = 0;
        bn::Moments<A> s{A(0), A(0), A(0)};
        for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
            Vec<T, V> r[kUnroll];
            unsigned k = 0;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    r[u] = bn::load<T, V>(x, at(i + u * kThreads));
                    ++k;
                }
            // the chunk's mean and M2, centred on the running mean (first chunk: its first value)
            const A p = n > 0 ? s.hi : bn::to_acc(r[0].v[0]);
            A sum = A(0), m2 = A(0);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (u < (int)k) {
#pragma unroll
                    for (int q = 0; q < V; ++q) sum += bn::to_acc(r[u].v[q]) - p;
                }
            const A md = sum / A(k * V);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (u < (int)k) {
#pragma unroll
                    for (int q = 0; q < V; ++q) {
                        const A e = (bn::to_acc(r[u].v[q]) - p) - md;
                        m2 += e * e;
                    }
                }
            bn::merge(n, s, k * V, bn::Moments<A>{p, md, m2});
        }
        bn::block_moments(n, s);
        if (threadIdx.x == 0) bn::write_moments(part, C, S, c, b, n, s);
    }
}

// Columns, block (b, tile): each thread merges the moments of its V columns over its rows
// of chunk b, kColumnUnroll rows at a time; the block writes the two slots of each channel
// in the tile.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_stats_columns(
        const T* __restrict__ x, acc_t<T>* __restrict__ part, int C, unsigned hw,
        int tx_log2, unsigned n_rows, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    __shared__ A sm[3][kThreads * V];
    const unsigned W = C * hw, tile = blockIdx.y;
    const int b = blockIdx.x, S = gridDim.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    const unsigned begin = b * chunk, end = begin + chunk < n_rows ? begin + chunk : n_rows;
    bn::Moments<A> s[V];
#pragma unroll
    for (int q = 0; q < V; ++q) s[q] = bn::Moments<A>{A(0), A(0), A(0)};
    if (j0 < W) {
        const unsigned wv = W / V;
        unsigned n = 0;  // rows merged so far (the same for the V columns)
        for (unsigned r = begin + ty; r < end; r += U * TY) {
            Vec<T, V> v[U];
            unsigned k = 0;
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
                    v[u] = bn::load<T, V>(x + j0, (unsigned long long)(r + u * TY) * wv);
                    ++k;
                }
            const A inv_k = A(1) / A(k), w = A(k) / A(n + k), wn = A(n) * w;
#pragma unroll
            for (int q = 0; q < V; ++q) {
                const A p = n > 0 ? s[q].hi : bn::to_acc(v[0].v[q]);
                A sum = A(0), m2 = A(0);
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (u < (int)k) sum += bn::to_acc(v[u].v[q]) - p;
                const A md = sum * inv_k;
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (u < (int)k) {
                        const A e = (bn::to_acc(v[u].v[q]) - p) - md;
                        m2 += e * e;
                    }
                bn::chan(s[q], bn::Moments<A>{p, md, m2}, n == 0, w, wn);
            }
            n += k;
        }
    }
    bn::columns_moments<A, V>(s, sm, part, C, hw, W, tx_log2, S, b, tile, end - begin);
}

// Planes, block (b, y): for each of its channels c (as bn_stats_planes), each thread adds dout
// and dout*(x - mean - mean_lo) over its strided vectors of chunk b of channel c (mean_lo
// read only if with_lo; and, if WRITE_DX, writes dx = dout*gamma*invstd: the test-mode
// gradient); the block writes part[0/1][c][b].
template <typename T, int V, bool WRITE_DX>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_reduce_planes(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ mean_lo,
        const acc_t<T>* __restrict__ invstd, acc_t<T>* __restrict__ part, T* __restrict__ dx,
        int with_lo, int C, unsigned hwv, unsigned magic, unsigned shift, unsigned mv,
        unsigned chunk) {
    using A = acc_t<T>;
    const int b = blockIdx.x, S = gridDim.x;
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
        const A m = mean[c], lo = with_lo ? mean_lo[c] : A(0);
        const A scale = WRITE_DX ? gamma[c] * invstd[c] : A(0);
        A s1 = A(0), s2 = A(0);
        for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
            Vec<T, V> g[kUnroll], v[kUnroll];
            unsigned long long o[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    o[u] = at(i + u * kThreads);
                    g[u] = bn::load<T, V>(dout, o[u]);
                    v[u] = bn::load<T, V>(x, o[u]);
                }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    Vec<T, V> out;
#pragma unroll
                    for (int q = 0; q < V; ++q) {
                        const A gq = bn::to_acc(g[u].v[q]);
                        s1 += gq;
                        s2 += gq * ((bn::to_acc(v[u].v[q]) - m) - lo);
                        if constexpr (WRITE_DX) bn::from_acc(out.v[q], gq * scale);
                    }
                    if constexpr (WRITE_DX) bn::store<T, V>(dx, o[u], out);
                }
        }
        bn::block_sum2(s1, s2);
        if (threadIdx.x == 0) {
            part[(unsigned long long)c * S + b] = s1;
            part[(unsigned long long)C * S + (unsigned long long)c * S + b] = s2;
        }
    }
}

// Columns, block (b, tile): each thread adds dout and dout*(x - mean_c - mean_lo_c) for its V
// columns over its rows of chunk b (mean_lo read only if with_lo; and, if WRITE_DX, writes
// dx = dout*gamma*invstd); the block writes the two slots of each channel in the tile.
template <typename T, int V, bool WRITE_DX>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_reduce_columns(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ mean_lo,
        const acc_t<T>* __restrict__ invstd, acc_t<T>* __restrict__ part, T* __restrict__ dx,
        int with_lo, int C, unsigned hw, int tx_log2, unsigned n, unsigned chunk) {
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
        A lo[V];
#pragma unroll
        for (int q = 0; q < V; ++q) lo[q] = with_lo ? mean_lo[(j0 + q) / hw] : A(0);
        const unsigned wv = W / V;
        for (unsigned r = begin + ty; r < end; r += U * TY) {
            Vec<T, V> g[U], v[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
                    g[u] = bn::load<T, V>(dout + j0, (unsigned long long)(r + u * TY) * wv);
                    v[u] = bn::load<T, V>(x + j0, (unsigned long long)(r + u * TY) * wv);
                }
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (r + u * TY < end) {
                    Vec<T, V> out;
#pragma unroll
                    for (int q = 0; q < V; ++q) {
                        const A gq = bn::to_acc(g[u].v[q]);
                        s1[q] += gq;
                        s2[q] += gq * ((bn::to_acc(v[u].v[q]) - m[q]) - lo[q]);
                        if constexpr (WRITE_DX) bn::from_acc(out.v[q], gq * scale[q]);
                    }
                    if constexpr (WRITE_DX)
                        bn::store<T, V>(dx + j0, (unsigned long long)(r + u * TY) * wv, out);
                }
        }
    }
    bn::columns_partials<A, V>(s1, s2, sm1, sm2, part, C, hw, W, tx_log2, S, b, tile);
}

namespace bn {
// Merges the moments (nb, b) into (n, a), counts in double (Chan, as bn::merge).
__device__ __forceinline__ void merge_double(double& n, Moments<double>& a, double nb,
                                             const Moments<double>& b) {
    if (nb == 0.0) return;
    const double w = nb / (n + nb);
    chan(a, b, n == 0.0, w, n * w);
    n += nb;
}

// Merges slot k of the statistics partials p (rows `row` apart, bn::PartRow) into (n, a).
template <typename A>
__device__ __forceinline__ void merge_slot(double& n, Moments<double>& a, const A* __restrict__ p,
                                           unsigned long long row, int k) {
    merge_double(n, a, (double)p[kPartCount * row + k],
                 Moments<double>{(double)p[kPartHi * row + k], (double)p[kPartLo * row + k],
                                 (double)p[kPartM2 * row + k]});
}

// What merge_chains merges: the moments of statistics partials (count, mean hi + lo, M2 in
// double: bn_stats_* wrote them), ...
struct MomentChain {
    double n;
    Moments<double> s;
    template <typename A>
    __device__ __forceinline__ void add_slot(const A* __restrict__ p, unsigned long long row, int k) {
        merge_slot(n, s, p, row, k);
    }
    __device__ __forceinline__ void add(const MomentChain& b) { merge_double(n, s, b.n, b.s); }
    __device__ __forceinline__ MomentChain down(int o) const {
        return MomentChain{__shfl_down_sync(0xffffffffu, n, o),
                           Moments<double>{__shfl_down_sync(0xffffffffu, s.hi, o),
                                           __shfl_down_sync(0xffffffffu, s.lo, o),
                                           __shfl_down_sync(0xffffffffu, s.m2, o)}};
    }
};

// ... or two plain sums in double (the backward's sum(dout) and sum(dout*(x - mean)): rows
// part[c][k] and part[C*slots + c][k]).
struct SumChain {
    double s1, s2;
    template <typename A>
    __device__ __forceinline__ void add_slot(const A* __restrict__ p, unsigned long long row, int k) {
        s1 += (double)p[k];
        s2 += (double)p[row + k];
    }
    __device__ __forceinline__ void add(const SumChain& b) {
        s1 += b.s1;
        s2 += b.s2;
    }
    __device__ __forceinline__ SumChain down(int o) const {
        return SumChain{__shfl_down_sync(0xffffffffu, s1, o), __shfl_down_sync(0xffffffffu, s2, o)};
    }
};

// The per-channel merge of the partial slots, in one fixed order wherever it runs (so every
// block that merges a channel gets the same bits): lanes 4i .. 4i+3 of a warp take one
// channel, whose slots start at p (rows `row` apart); lane 4i + u merges chain u, slots u,
// u + 4, ... below 4*(slots/4), in order (chain 0 then also the last slots % 4), and the
// chains are merged 0+1 and 2+3, then (0+1)+(2+3). The result is valid in lane 4i; a lane
// that is not `live` adds nothing. Every lane of the warp calls it (shuffles).
template <typename Acc, typename A>
__device__ __forceinline__ Acc merge_chains(const A* __restrict__ p, unsigned long long row,
                                            int slots, bool live) {
    const int u = threadIdx.x & 3;
    Acc a{};
    if (live) {
        const int full = slots & ~3;
#pragma unroll 1
        for (int k = u; k < full; k += 4) a.add_slot(p, row, k);
        if (u == 0)
#pragma unroll 1
            for (int k = full; k < slots; ++k) a.add_slot(p, row, k);
    }
    Acc b = a.down(1);
    if ((u & 1) == 0) a.add(b);
    b = a.down(2);
    if (u == 0) a.add(b);
    return a;
}

// The running-statistics update a train forward writes with its stats block:
//   running_mean' = keep*running_mean + take*mean
//   running_var'  = keep*running_var  + take*var*var_factor
// where running_mean (running_var) is read only when bit 0 (bit 1) of `given` is set, else
// taken as 0 (var_default).
template <typename A>
struct RunningUpdate {
    const A* __restrict__ mean;
    const A* __restrict__ var;
    int given;
    double keep, take, var_factor, var_default;
};

// Per-channel constants of the apply kernels, y = (x - m - lo)*scale + shift.
template <typename A> struct ApplyConstants { A m, lo, scale, shift; };

// Train mode, in the lane that merge_chains left channel c's moments a in: mean m, mean_lo
// (what rounding the mean to A lost: a float32 mean of 1e4 is off by up to 5e-4) and invstd
// = 1/sqrt(var + eps) of the batch, and when `writes`, column c of the (kStatRows, C) block
// `stats`: mean, var (biased), invstd, mean_lo and the updated running statistics (in double).
template <typename A>
__device__ __forceinline__ ApplyConstants<A> batch_constants(
        const MomentChain& a, unsigned c, int C, double eps, const RunningUpdate<A>& run,
        const A* __restrict__ gamma, const A* __restrict__ beta, A* __restrict__ stats,
        bool writes) {
    const double mu = a.s.hi + a.s.lo, v = a.n > 0.0 ? a.s.m2 / a.n : 0.0;
    const A m = (A)mu, inv = (A)(1.0 / sqrt(v + eps)), lo = (A)((a.s.hi - (double)m) + a.s.lo);
    if (writes) {
        const double rm = (run.given & 1) ? (double)run.mean[c] : 0.0;
        const double rv = (run.given & 2) ? (double)run.var[c] : run.var_default;
        stats[kMean * C + c] = m;
        stats[kVar * C + c] = (A)v;
        stats[kInvstd * C + c] = inv;
        stats[kMeanLo * C + c] = lo;
        stats[kRunMean * C + c] = (A)(run.keep * rm + run.take * mu);
        stats[kRunVar * C + c] = (A)(run.keep * rv + run.take * (v * run.var_factor));
    }
    return ApplyConstants<A>{m, lo, gamma[c] * inv, beta[c]};
}

// Test mode: mean = run_mean[c], lo = 0, invstd = 1/sqrt(run_var[c] + eps), stored to
// invstd_out[c] when `writes` (backward needs it).
template <typename A>
__device__ __forceinline__ ApplyConstants<A> running_constants(
        unsigned c, double eps, const A* __restrict__ run_mean, const A* __restrict__ run_var,
        const A* __restrict__ gamma, const A* __restrict__ beta, A* __restrict__ invstd_out,
        bool writes) {
    const A inv = (A)(1.0 / sqrt((double)run_var[c] + eps));
    if (writes) invstd_out[c] = inv;
    return ApplyConstants<A>{run_mean[c], A(0), gamma[c] * inv, beta[c]};
}

// Gradient constants of the dx kernels, dx = a*dout + e*(x - m - lo) + f, from channel c's
// merged sums s (valid in lane 4i of merge_chains): dbeta = sum(dout), dgamma = invstd *
// sum(dout*(x - mean - mean_lo)), stored to dgamma[c], dbeta[c] when `writes`; a =
// gamma*invstd, e = -a*invstd*dgamma/count, f = -a*dbeta/count (from dgamma, dbeta rounded to
// A, as a separate merge kernel would store them).
template <typename A> struct GradConstants { A m, lo, a, e, f; };

template <typename A>
__device__ __forceinline__ GradConstants<A> grad_constants(
        const SumChain& s, unsigned c, const A* __restrict__ gamma, const A* __restrict__ mean,
        const A* __restrict__ mean_lo, int with_lo, const A* __restrict__ invstd, double count,
        A* __restrict__ dgamma, A* __restrict__ dbeta, bool writes) {
    const A db = (A)s.s1, dg = (A)((double)invstd[c] * s.s2);
    if (writes) {
        dgamma[c] = dg;
        dbeta[c] = db;
    }
    const A a = gamma[c] * invstd[c];
    return GradConstants<A>{mean[c], with_lo ? mean_lo[c] : A(0), a,
                            (A)(-(double)a * (double)invstd[c] * (double)dg / count),
                            (A)(-(double)a * (double)db / count)};
}

// Columns layout: the channels c0 .. c0 + nc - 1 of a tile (nc <= kThreads: a tile has at
// most 256 columns) merged kThreads/4 at a time (4 lanes each, merge_chains), and
// make(acc, c, first) turning channel c's result into its constants in sm[c - c0]; `first`
// is whether the tile holds c's first column. Every thread calls it; it ends with a barrier.
template <typename Acc, typename K, typename A, typename Make>
__device__ __forceinline__ void tile_constants(const A* __restrict__ part, int C, int slots,
                                               unsigned c0, unsigned nc, unsigned hw,
                                               unsigned t0, K* sm, Make make) {
    const unsigned long long row = (unsigned long long)C * slots;
    for (unsigned base = 0; base < nc; base += kThreads / 4) {
        const unsigned i = base + threadIdx.x / 4, c = c0 + i;
        const bool live = i < nc;
        const Acc a = merge_chains<Acc>(part + (unsigned long long)(live ? c : c0) * slots, row,
                                        slots, live);
        if (live && (threadIdx.x & 3) == 0) sm[i] = make(a, c, c * hw >= t0);
    }
    __syncthreads();
}
}  // namespace bn

// Planes, block (S-1-b, y): for each of its channels c = C-1-y, C-1-y-gridDim.y, ..., each
// thread writes y = (x - mean - mean_lo)*gamma*invstd + beta for its strided vectors of chunk
// b of channel c. TRAIN: warp 0 first merges the statistics partials of c (bn::merge_chains;
// every block merges the same slots in the same order, so all get the same bits) and block
// b = 0 writes column c of `stats`, the (kStatRows, C) block (bn::batch_constants; `run`
// arrays read as `given` says). Test mode: the constants come from run_mean, run_var, and
// thread 0 of block b = 0 writes invstd to stats[c] (part, slots, given, keep, take,
// var_factor, var_default are not read).
template <typename T, int V, bool TRAIN>
__global__ void __launch_bounds__(kThreads, 2) bn_apply_planes(
        const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ beta, const acc_t<T>* __restrict__ part, int slots,
        const acc_t<T>* __restrict__ run_mean, const acc_t<T>* __restrict__ run_var, int given,
        double keep, double take, double var_factor, double var_default, double eps,
        acc_t<T>* __restrict__ stats, T* __restrict__ y, int C, unsigned hwv, unsigned magic,
        unsigned shift, unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    __shared__ bn::ApplyConstants<A> sk;
    const int b = gridDim.x - 1 - blockIdx.x;
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    const bn::RunningUpdate<A> run{run_mean, run_var, given, keep, take, var_factor, var_default};
    for (int cy = blockIdx.y; cy < C; cy += gridDim.y) {
        const int c = C - 1 - cy;
        const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
        bn::ApplyConstants<A> k;
        if constexpr (TRAIN) {
            __syncthreads();  // the previous channel's reads of sk are over
            if (threadIdx.x < 32) {
                const bn::MomentChain a = bn::merge_chains<bn::MomentChain>(
                        part + (unsigned long long)c * slots, (unsigned long long)C * slots, slots,
                        threadIdx.x < 4);
                if (threadIdx.x == 0)
                    sk = bn::batch_constants(a, c, C, eps, run, gamma, beta, stats, b == 0);
            }
            __syncthreads();
            k = sk;
        } else {
            k = bn::running_constants(c, eps, run_mean, run_var, gamma, beta, stats,
                                      b == 0 && threadIdx.x == 0);
        }
        for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
            Vec<T, V> r[kUnroll];
            unsigned long long o[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    o[u] = at(i + u * kThreads);
                    r[u] = bn::load<T, V>(x, o[u]);
                }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    Vec<T, V> out;
#pragma unroll
                    for (int q = 0; q < V; ++q)
                        bn::from_acc(out.v[q], ((bn::to_acc(r[u].v[q]) - k.m) - k.lo) * k.scale + k.shift);
                    bn::store<T, V>(y, o[u], out);
                }
        }
    }
}

// Columns, block (S-1-b, tiles-1-tile): each thread writes y = (x - mean - mean_lo)*gamma*
// invstd + beta for its V columns over its rows of chunk b. TRAIN: the block first merges
// the statistics partials of the tile's channels, 4 threads per channel (bn::tile_constants,
// the order of bn::merge_chains), and block b = 0 writes column c of `stats` for each channel
// c whose first column is in the tile (as bn_apply_planes). Test mode: constants from run_mean
// and run_var; the thread of row 0 of block b = 0 holding a channel's first column writes its
// invstd to stats[c].
template <typename T, int V, bool TRAIN>
__global__ void __launch_bounds__(kThreads, 2) bn_apply_columns(
        const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ beta, const acc_t<T>* __restrict__ part, int slots,
        const acc_t<T>* __restrict__ run_mean, const acc_t<T>* __restrict__ run_var, int given,
        double keep, double take, double var_factor, double var_default, double eps,
        acc_t<T>* __restrict__ stats, T* __restrict__ y, int C, unsigned hw, int tx_log2,
        unsigned n, unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    const unsigned W = C * hw, tile = gridDim.y - 1 - blockIdx.y;
    const int b = gridDim.x - 1 - blockIdx.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    const unsigned t0 = tile * (V << tx_log2), c0 = t0 / hw;
    A m[V], lo[V], scale[V], shift_c[V];
    if constexpr (TRAIN) {
        __shared__ bn::ApplyConstants<A> sk[kThreads];
        const unsigned t1 = t0 + (V << tx_log2) < W ? t0 + (V << tx_log2) : W;
        const bn::RunningUpdate<A> run{run_mean, run_var, given, keep, take, var_factor, var_default};
        bn::tile_constants<bn::MomentChain>(
                part, C, slots, c0, (t1 - 1) / hw - c0 + 1, hw, t0, sk,
                [&](const bn::MomentChain& a, unsigned c, bool first) {
                    return bn::batch_constants(a, c, C, eps, run, gamma, beta, stats,
                                               b == 0 && first);
                });
        if (j0 >= W) return;
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const bn::ApplyConstants<A> k = sk[(j0 + q) / hw - c0];
            m[q] = k.m;
            lo[q] = k.lo;
            scale[q] = k.scale;
            shift_c[q] = k.shift;
        }
    } else {
        if (j0 >= W) return;
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const bn::ApplyConstants<A> k = bn::running_constants(
                    (j0 + q) / hw, eps, run_mean, run_var, gamma, beta, stats,
                    b == 0 && ty == 0 && (j0 + q) % hw == 0);
            m[q] = k.m;
            lo[q] = k.lo;
            scale[q] = k.scale;
            shift_c[q] = k.shift;
        }
    }
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    const unsigned wv = W / V;
    for (unsigned r = begin + ty; r < end; r += U * TY) {
        Vec<T, V> v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) v[u] = bn::load<T, V>(x + j0, (unsigned long long)(r + u * TY) * wv);
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], ((bn::to_acc(v[u].v[q]) - m[q]) - lo[q]) * scale[q] + shift_c[q]);
                bn::store<T, V>(y + j0, (unsigned long long)(r + u * TY) * wv, out);
            }
    }
}

// Test-mode backward, 4 threads per channel c = t/4 (t the global thread index): merge the
// `slots` partial sums of c (bn::merge_chains) and the first writes dbeta[c] = sum(dout) and
// dgamma[c] = invstd[c] * sum(dout*(x - mean - mean_lo)) (the values the train dx kernels
// compute from the same slots).
template <typename A>
__global__ void bn_backward_merge(
        const A* __restrict__ part, int C, int slots, const A* __restrict__ invstd,
        A* __restrict__ dgamma, A* __restrict__ dbeta) {
    const unsigned long long c = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 4;
    const bool live = c < (unsigned long long)C;
    const bn::SumChain s = bn::merge_chains<bn::SumChain>(
            part + (live ? c : 0ull) * slots, (unsigned long long)C * slots, slots, live);
    if (live && (threadIdx.x & 3) == 0) {
        dbeta[c] = (A)s.s1;
        dgamma[c] = (A)((double)invstd[c] * s.s2);
    }
}

// Synchronized batch norm, 4 threads per channel c = t/4 (t the global thread index): merge
// the `slots` statistics partials of c (bn::merge_chains, the order of the apply kernels) and
// the first writes this rank's moments of c to the (4, C) float64 block `record` that the
// ranks gather: count, mean rounded to A, what that rounding lost (rounded to A) and M2. The
// gathered records, one per rank, are then the apply kernels' partial slots (dtype A; the
// mean's two parts are exact in A).
template <typename A>
__global__ void bn_stats_merge(const A* __restrict__ part, int C, int slots,
                               double* __restrict__ record) {
    const unsigned long long c = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 4;
    const bool live = c < (unsigned long long)C;
    const bn::MomentChain a = bn::merge_chains<bn::MomentChain>(
            part + (live ? c : 0ull) * slots, (unsigned long long)C * slots, slots, live);
    if (live && (threadIdx.x & 3) == 0) {
        const A m = (A)(a.s.hi + a.s.lo);
        record[c] = a.n;
        record[(unsigned long long)C + c] = (double)m;
        record[2ull * C + c] = (double)(A)((a.s.hi - (double)m) + a.s.lo);
        record[3ull * C + c] = a.s.m2;
    }
}

// Planes, block (S-1-b, y): for each of its channels c (as bn_apply_planes), warp 0 merges
// the backward partial sums of c (bn::merge_chains, the order of bn_backward_merge; block
// b = 0 writes dgamma[c] and dbeta[c]), then each thread writes the train-mode gradient
// dx = a*dout + e*(x - mean - mean_lo) + f (bn::grad_constants; mean_lo read only if with_lo)
// for its strided vectors of chunk b of channel c.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_dx_planes(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ mean_lo,
        const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ part, int slots,
        acc_t<T>* __restrict__ dgamma, acc_t<T>* __restrict__ dbeta, double count,
        T* __restrict__ dx, int with_lo, int C, unsigned hwv, unsigned magic, unsigned shift,
        unsigned mv, unsigned chunk) {
    using A = acc_t<T>;
    __shared__ bn::GradConstants<A> sk;
    const int b = gridDim.x - 1 - blockIdx.x;
    const unsigned begin = b * chunk, end = begin + chunk < mv ? begin + chunk : mv;
    for (int cy = blockIdx.y; cy < C; cy += gridDim.y) {
        const int c = C - 1 - cy;
        const bn::PlaneIndex at{(unsigned long long)C * hwv, (unsigned long long)c * hwv, hwv, magic, shift};
        __syncthreads();  // the previous channel's reads of sk are over
        if (threadIdx.x < 32) {
            const bn::SumChain s = bn::merge_chains<bn::SumChain>(
                    part + (unsigned long long)c * slots, (unsigned long long)C * slots, slots,
                    threadIdx.x < 4);
            if (threadIdx.x == 0)
                sk = bn::grad_constants(s, c, gamma, mean, mean_lo, with_lo, invstd, count,
                                        dgamma, dbeta, b == 0);
        }
        __syncthreads();
        const bn::GradConstants<A> k = sk;
        for (unsigned i = begin + threadIdx.x; i < end; i += kUnroll * kThreads) {
            Vec<T, V> g[kUnroll], v[kUnroll];
            unsigned long long o[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    o[u] = at(i + u * kThreads);
                    g[u] = bn::load<T, V>(dout, o[u]);
                    v[u] = bn::load<T, V>(x, o[u]);
                }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (i + u * kThreads < end) {
                    Vec<T, V> out;
#pragma unroll
                    for (int q = 0; q < V; ++q)
                        bn::from_acc(out.v[q], k.a * bn::to_acc(g[u].v[q])
                                               + k.e * ((bn::to_acc(v[u].v[q]) - k.m) - k.lo) + k.f);
                    bn::store<T, V>(dx, o[u], out);
                }
        }
    }
}

// Columns, block (S-1-b, tiles-1-tile): the block merges the backward partial sums of the
// tile's channels, 4 threads per channel (bn::tile_constants; block b = 0 writes dgamma[c]
// and dbeta[c] for each channel c whose first column is in the tile), then each thread writes
// the train-mode gradient (as bn_backward_dx_planes) for its V columns over its rows of chunk b.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 2) bn_backward_dx_columns(
        const T* __restrict__ dout, const T* __restrict__ x, const acc_t<T>* __restrict__ gamma,
        const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ mean_lo,
        const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ part, int slots,
        acc_t<T>* __restrict__ dgamma, acc_t<T>* __restrict__ dbeta, double count,
        T* __restrict__ dx, int with_lo, int C, unsigned hw, int tx_log2, unsigned n,
        unsigned chunk) {
    using A = acc_t<T>;
    constexpr int U = bn::kColumnUnroll<V>;
    __shared__ bn::GradConstants<A> sk[kThreads];
    const unsigned W = C * hw, tile = gridDim.y - 1 - blockIdx.y;
    const int b = gridDim.x - 1 - blockIdx.x, TY = kThreads >> tx_log2;
    const int ty = threadIdx.x >> tx_log2, tx = threadIdx.x & ((1 << tx_log2) - 1);
    const unsigned j0 = ((tile << tx_log2) + tx) * V;
    const unsigned t0 = tile * (V << tx_log2), c0 = t0 / hw;
    const unsigned t1 = t0 + (V << tx_log2) < W ? t0 + (V << tx_log2) : W;
    bn::tile_constants<bn::SumChain>(
            part, C, slots, c0, (t1 - 1) / hw - c0 + 1, hw, t0, sk,
            [&](const bn::SumChain& s, unsigned c, bool first) {
                return bn::grad_constants(s, c, gamma, mean, mean_lo, with_lo, invstd, count,
                                          dgamma, dbeta, b == 0 && first);
            });
    if (j0 >= W) return;
    A m[V], lo[V], a[V], e[V], f[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const bn::GradConstants<A> k = sk[(j0 + q) / hw - c0];
        m[q] = k.m;
        lo[q] = k.lo;
        a[q] = k.a;
        e[q] = k.e;
        f[q] = k.f;
    }
    const unsigned begin = b * chunk, end = begin + chunk < n ? begin + chunk : n;
    const unsigned wv = W / V;
    for (unsigned r = begin + ty; r < end; r += U * TY) {
        Vec<T, V> g[U], v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                g[u] = bn::load<T, V>(dout + j0, (unsigned long long)(r + u * TY) * wv);
                v[u] = bn::load<T, V>(x + j0, (unsigned long long)(r + u * TY) * wv);
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (r + u * TY < end) {
                Vec<T, V> out;
#pragma unroll
                for (int q = 0; q < V; ++q)
                    bn::from_acc(out.v[q], a[q] * bn::to_acc(g[u].v[q])
                                           + e[q] * ((bn::to_acc(v[u].v[q]) - m[q]) - lo[q]) + f[q]);
                bn::store<T, V>(dx + j0, (unsigned long long)(r + u * TY) * wv, out);
            }
    }
}
