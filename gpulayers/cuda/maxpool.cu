// Max pooling over NCHW tensors: forward with compact argmax offsets, deterministic backward,
// for T = __half, __nv_bfloat16, float and double (compared and summed in float for the 16-bit
// types).
//
// Geometry (gpulayers/shapes.py): window (oh, ow) covers the input rows oh*sh - ph + i*dh,
// i in [0, kh), and the columns ow*sw - pw + j*dw, j in [0, kw); taps outside [0, H) x [0, W)
// are padding and ignored. Tap (i, j) has the compact offset i*kw + j.
//
// Launch layout, every kernel (see walk()): blockIdx.x/threadIdx.x walk the positions of one
// plane ((Ho, Wo) for the forward pass, (H, W) or the 2x2 blocks of (H, W) for the backward),
// blockIdx.y walks the N*C planes; both loops are grid-stride. In a kernel instantiated with
// Packed = true (last template argument; the launchers pick it only for planes smaller than the
// block) a plane smaller than a thread block shares the block with others: the block holds G =
// blockDim.x / plane slots of `plane` threads, slot s takes the s-th plane group of each run of
// G groups, and only the threads past G * plane idle; a plane of a block or more has G = 1.
// Packed = false (the default) is the layout and code of one plane per block, unchanged. A
// thread works out its windows once (the only integer divisions) and reuses them for every plane
// it visits, so the per-element work is loads, compares, adds.
// Idx (int or long long) holds element indices and must hold every tensor's size; every
// product that can reach a plane's or a tensor's size is formed in Idx ((Idx)a * b converts a
// first, so the product is in Idx). The launcher keeps the padded sizes H + 2*ph and W + 2*pw
// below 2**31, so positions, window starts and covers fit int. Tap offsets (up to the window
// size, which can pass 2**31 only with uint32 offsets) are formed in unsigned.
//
// Variants (pool_kernels.VARIANT picks one; the defaults are the first kernels' default
// template arguments): Planes > 1 makes a thread handle Planes planes per loop step (planes nc,
// nc + 1, ...; every load of the group is issued before any result is stored, for more loads in
// flight); Taps is the forward fast path's unrolled window size; the *_pairs and *_blocks
// kernels serve stride-2 geometries with 2-element vector loads/stores. Every variant gives the
// same bits as the default kernels.
#ifndef GPULAYERS_CPU_SHIM
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Window taps per axis that the forward fast path unrolls (3x3 and smaller windows), and
// covering windows per axis that the backward fast path unrolls (e.g. 3x3 windows, stride 2).
enum : int { kForwardTaps = 3, kBackwardWindows = 2 };

// Offset that no window stores: what a backward thread expects where it must not add.
enum : unsigned { kNoOffset = 0xffffffffu };

// Accumulation and comparison type: float for __half and __nv_bfloat16, T otherwise.
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<__half> { typedef float type; };
template <> struct Acc<__nv_bfloat16> { typedef float type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Two adjacent elements, loaded or stored as one aligned access: the pointer must be aligned
// to 2 elements, or the GPU faults (cudaErrorMisalignedAddress). The launcher runs the kernels
// that use these only on aligned pointers with an even row pitch; the CPU shim checks every
// access, records a fault for a misaligned one and then goes element by element.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
    T a, b;
};

template <typename T>
__device__ __forceinline__ Pair<T> load_pair(const T* p)
{
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(p, sizeof(Pair<T>), "load_pair");
    if (reinterpret_cast<std::uintptr_t>(p) % sizeof(Pair<T>) != 0) return Pair<T>{p[0], p[1]};
#endif
    return *reinterpret_cast<const Pair<T>*>(p);
}

template <typename T, typename A>
__device__ __forceinline__ void store_pair(T* p, A a, A b)
{
    Pair<T> v;
    store(&v.a, a);
    store(&v.b, b);
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(p, sizeof(Pair<T>), "store_pair");
    if (reinterpret_cast<std::uintptr_t>(p) % sizeof(Pair<T>) != 0) {
        p[0] = v.a;
        p[1] = v.b;
        return;
    }
#endif
    *reinterpret_cast<Pair<T>*>(p) = v;
}

// Forward rule for tap k with value v (PyTorch's `v > best || isnan(v)`), branch-free; used
// masks out slots that are not taps of the window.
template <typename A>
__device__ __forceinline__ void take_max(A v, unsigned k, bool used, A& best, unsigned& arg)
{
    const bool take = used & ((v > best) | isnan(v));
    best = take ? v : best;
    arg = take ? k : arg;
}

// Plane u of the group that starts at plane nc; past the last plane it names the last plane,
// so the group's loads stay in bounds (results for such planes are not stored).
template <typename Idx>
__device__ __forceinline__ Idx group_plane(Idx nc, int u, Idx planes)
{
    return u == 0 ? nc : (nc < planes - u ? nc + u : planes - 1);
}

template <typename Idx>
__device__ __forceinline__ bool in_group(Idx nc, int u, Idx planes)
{
    return u == 0 || nc < planes - u;
}

// Next index of a grid-stride loop over [.., n): i + step, or n once that reaches n.
// Never forms a value past n, so a 32-bit Idx cannot overflow near 2**31.
template <typename Idx>
__device__ __forceinline__ Idx grid_next(Idx i, Idx step, Idx n)
{
    return i < n - step ? i + step : n;
}

// Windows along one axis that cover the padded position pos (input position + pad): the first
// in tap order has tap `tap` and window `win`; there are n of them, and each next one has tap
// + tap_step and window - win_step (steps are 0 when n < 2).
struct Cover {
    int tap, win, n, tap_step, win_step;
};

__device__ __forceinline__ Cover cover(int pos, int kernel, int stride, int dilation, int n_out)
{
    Cover c = {0, 0, 0, 0, 0};
    for (int t = 0; t < kernel && t * dilation <= pos; ++t) {
        const int r = pos - t * dilation;
        if (r % stride != 0 || r / stride >= n_out) continue;
        if (c.n == 0) {
            c.tap = t;
            c.win = r / stride;
        } else if (c.n == 1) {
            c.tap_step = t - c.tap;
            c.win_step = c.win - r / stride;
        }
        ++c.n;
    }
    return c;
}


// A thread's walk over a plane of `plane` positions and over the planes, in groups of Planes
// consecutive planes. Packed = false (every kernel's default, the launch for planes of a block
// or more): a thread starts at position blockIdx.x * blockDim.x + threadIdx.x and plane group
// blockIdx.y * Planes, both grid-stride: the layout and code of one plane per block, unchanged.
// Packed = true (the launchers pick it only when plane < blockDim.x): when plane < blockDim.x
// the block holds slots = blockDim.x / plane slots of `plane` consecutive threads (slot =
// threadIdx.x / plane); slot s of y block b starts at the group of plane (b * slots + s) *
// Planes and steps by gridDim.y * slots * Planes planes; threads past slots * plane have no
// work (p = plane); a plane of a block or more has slots = 1. Each (plane, position) pair is
// visited by exactly one thread of any grid, either way. (Defining
// GPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK makes the packed kernels use one plane per block too:
// the tests compare the two bitwise.)
template <typename Idx>
struct Walk {
    Idx p, p_step;    // first position, its grid stride
    Idx nc, nc_step;  // first plane of the first group, group stride
};

template <typename Idx, int Planes, bool Packed>
__device__ __forceinline__ Walk<Idx> walk(Idx plane)
{
    Walk<Idx> w = {};  // unpacked: unused, FOR_POSITIONS and FOR_PLANE_GROUPS use the old loops
    if constexpr (Packed) {
#ifdef GPULAYERS_MAXPOOL_ONE_PLANE_PER_BLOCK
        const bool shared = false;
#else
        const bool shared = plane < (Idx)blockDim.x;
#endif
        const int slots = shared ? (int)(blockDim.x / (unsigned)plane) : 1;
        const int slot = shared ? (int)(threadIdx.x / (unsigned)plane) : 0;
        w.p = slot < slots
                  ? (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x - (Idx)slot * plane
                  : plane;
        w.p_step = (Idx)blockDim.x * (Idx)gridDim.x;
        w.nc = ((Idx)blockIdx.y * slots + slot) * Planes;
        w.nc_step = (Idx)gridDim.y * slots * Planes;
    }
    return w;
}

// Position and plane-group loops of a kernel over its walk wk (see walk()); nc is the first
// plane of a group. Unpacked (Packed is a template argument, so the condition is a constant),
// they are the loops of one plane per block, token for token.
#define FOR_POSITIONS(p, n)                                                                    \
    for (Idx p = Packed ? wk.p : (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x;        \
         p < (n); p = grid_next(p, Packed ? wk.p_step : (Idx)blockDim.x * (Idx)gridDim.x, (n)))
#define FOR_PLANE_GROUPS(nc)                                                                   \
    for (Idx nc = Packed ? wk.nc : (Idx)blockIdx.y * Planes; nc < planes;                      \
         nc = grid_next(nc, Packed ? wk.nc_step : (Idx)gridDim.y * Planes, planes))

// One thread per output element (n, c, oh, ow) of Planes planes: reads the in-range taps of its
// window in x, in row-major order, and writes their maximum to out and its compact offset to
// offsets. PyTorch's rule `v > best || isnan(v)`: the first maximum wins ties, the last NaN wins,
// and an all -inf window keeps its first in-range tap. Windows with at most Taps x Taps in-range
// taps take the unrolled path.
template <typename T, typename Off, typename Idx, int Taps = kForwardTaps, int Planes = 1,
          bool Packed = false>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ out,
                                   Off* __restrict__ offsets, Idx planes,
                                   int H, int W, int Ho, int Wo, int kh, int kw,
                                   int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    const Walk<Idx> wk = walk<Idx, Planes, Packed>(out_plane);
    FOR_POSITIONS(p, out_plane) {
        const int oh = (int)(p / Wo), ow = (int)(p - (Idx)oh * Wo);
        const int h0 = oh * sh - ph, w0 = ow * sw - pw;
        // In-range taps i in [i0, i0 + ni), j in [j0, j0 + nj); the geometry checks ni, nj >= 1.
        const int i0 = h0 < 0 ? (dh - 1 - h0) / dh : 0;
        const int j0 = w0 < 0 ? (dw - 1 - w0) / dw : 0;
        const int ni = imin(kh, (H - 1 - h0) / dh + 1) - i0;
        const int nj = imin(kw, (W - 1 - w0) / dw + 1) - j0;
        const Idx first = (Idx)(h0 + i0 * dh) * W + (w0 + j0 * dw);
        const Idx row_step = (Idx)dh * W;
        const unsigned first_offset = (unsigned)i0 * kw + j0;
        const bool small = ni <= Taps && nj <= Taps;
        FOR_PLANE_GROUPS(nc) {
            if (small) {
                // Load every slot of every plane first (unused slots re-read the window's last
                // tap), so the loads are in flight together; then compare, branch-free, over
                // the used slots only.
                A v[Planes][Taps][Taps];
#pragma unroll
                for (int u = 0; u < Planes; ++u) {
                    const T* win = x + group_plane(nc, u, planes) * in_plane + first;
#pragma unroll
                    for (int a = 0; a < Taps; ++a) {
#pragma unroll
                        for (int b = 0; b < Taps; ++b) {
                            v[u][a][b] = to_acc(win[imin(a, ni - 1) * row_step +
                                                    imin(b, nj - 1) * dw]);
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < Planes; ++u) {
                    A best = v[u][0][0];  // the first in-range tap: as good as starting at -inf
                    unsigned arg = first_offset;
#pragma unroll
                    for (int a = 0; a < Taps; ++a) {
#pragma unroll
                        for (int b = 0; b < Taps; ++b) {
                            take_max(v[u][a][b], first_offset + (unsigned)a * kw + b,
                                     (a < ni) & (b < nj), best, arg);
                        }
                    }
                    if (in_group(nc, u, planes)) {
                        store(out + (nc + u) * out_plane + p, best);
                        offsets[(nc + u) * out_plane + p] = (Off)arg;
                    }
                }
            } else {
                for (int u = 0; u < Planes && in_group(nc, u, planes); ++u) {
                    const T* win = x + (nc + u) * in_plane + first;
                    A best = to_acc(win[0]);
                    unsigned arg = first_offset;
                    for (int a = 0; a < ni; ++a) {
                        for (int b = 0; b < nj; ++b) {
                            const A v = to_acc(win[a * row_step + b * dw]);
                            if (v > best || isnan(v)) {
                                best = v;
                                arg = first_offset + (unsigned)a * kw + b;
                            }
                        }
                    }
                    store(out + (nc + u) * out_plane + p, best);
                    offsets[(nc + u) * out_plane + p] = (Off)arg;
                }
            }
        }
    }
}

// One thread per output element (n, c, oh, ow) of Planes planes, for 2x2 windows with stride 2,
// no padding, no dilation, an even W, 2 * Ho <= H (every window inside x) and x aligned to 2
// elements: reads its window as two aligned pairs (rows 2 oh and 2 oh + 1) and writes out and
// offsets as the default kernel.
template <typename T, typename Off, typename Idx, int Planes, bool Packed = false>
__global__ void max_pool2d_forward_pairs(const T* __restrict__ x, T* __restrict__ out,
                                         Off* __restrict__ offsets, Idx planes,
                                         int H, int W, int Ho, int Wo, int kh, int kw,
                                         int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    const Walk<Idx> wk = walk<Idx, Planes, Packed>(out_plane);
    FOR_POSITIONS(p, out_plane) {
        const int oh = (int)(p / Wo), ow = (int)(p - (Idx)oh * Wo);
        const Idx first = (Idx)(2 * oh) * W + 2 * ow;
        FOR_PLANE_GROUPS(nc) {
            Pair<T> r[Planes][2];
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                const T* win = x + group_plane(nc, u, planes) * in_plane + first;
                r[u][0] = load_pair(win);
                r[u][1] = load_pair(win + W);
            }
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                A best = to_acc(r[u][0].a);
                unsigned arg = 0;
                take_max(to_acc(r[u][0].a), 0, true, best, arg);
                take_max(to_acc(r[u][0].b), 1, true, best, arg);
                take_max(to_acc(r[u][1].a), 2, true, best, arg);
                take_max(to_acc(r[u][1].b), 3, true, best, arg);
                if (in_group(nc, u, planes)) {
                    store(out + (nc + u) * out_plane + p, best);
                    offsets[(nc + u) * out_plane + p] = (Off)arg;
                }
            }
        }
    }
}

// One thread per input element (n, c, h, w) of Planes planes, for overlapping windows: visits
// the windows that cover it in ascending tap order, reads their offsets and dout, adds dout (in
// Acc<T>) where the offset names (h, w), and writes the sum (0 when none) to dx. No atomics,
// fixed order.
template <typename T, typename Off, typename Idx, int Planes = 1, bool Packed = false>
__global__ void max_pool2d_backward(const T* __restrict__ dout, const Off* __restrict__ offsets,
                                    T* __restrict__ dx, Idx planes,
                                    int H, int W, int Ho, int Wo, int kh, int kw,
                                    int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    const Walk<Idx> wk = walk<Idx, Planes, Packed>(in_plane);
    FOR_POSITIONS(p, in_plane) {
        const int h = (int)(p / W), w = (int)(p - (Idx)h * W);
        const Cover rows = cover(h + ph, kh, sh, dh, Ho);
        const Cover cols = cover(w + pw, kw, sw, dw, Wo);
        // Window (a, b) of the cover: in-plane output index and the offset that names (h, w).
        const Idx q0 = (Idx)rows.win * Wo + cols.win;
        const Idx q_row = (Idx)rows.win_step * Wo;
        const unsigned k0 = (unsigned)rows.tap * kw + cols.tap;
        const unsigned k_row = (unsigned)rows.tap_step * kw;
        const bool small = rows.n <= kBackwardWindows && cols.n <= kBackwardWindows;
        FOR_PLANE_GROUPS(nc) {
            if (small) {
                // All slots of all planes load; unused slots read window 0 and expect
                // kNoOffset, so they never add. The loads are in flight together and the adds
                // keep ascending tap order.
                A d[Planes][kBackwardWindows][kBackwardWindows];
                unsigned o[Planes][kBackwardWindows][kBackwardWindows];
#pragma unroll
                for (int u = 0; u < Planes; ++u) {
                    const Idx base = group_plane(nc, u, planes) * out_plane;
#pragma unroll
                    for (int a = 0; a < kBackwardWindows; ++a) {
#pragma unroll
                        for (int b = 0; b < kBackwardWindows; ++b) {
                            const bool used = a < rows.n && b < cols.n;
                            const Idx q = used ? q0 - a * q_row - b * cols.win_step : 0;
                            d[u][a][b] = to_acc(dout[base + q]);
                            o[u][a][b] = (unsigned)offsets[base + q];
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < Planes; ++u) {
                    A acc = 0;
#pragma unroll
                    for (int a = 0; a < kBackwardWindows; ++a) {
#pragma unroll
                        for (int b = 0; b < kBackwardWindows; ++b) {
                            const bool used = a < rows.n && b < cols.n;
                            const unsigned k = used ? k0 + a * k_row + b * cols.tap_step
                                                    : kNoOffset;
                            if (o[u][a][b] == k) acc += d[u][a][b];
                        }
                    }
                    if (in_group(nc, u, planes)) store(dx + (nc + u) * in_plane + p, acc);
                }
            } else {
                for (int u = 0; u < Planes && in_group(nc, u, planes); ++u) {
                    const Off* off = offsets + (nc + u) * out_plane;
                    const T* g = dout + (nc + u) * out_plane;
                    A acc = 0;
                    for (int a = 0; a < rows.n; ++a) {
                        for (int b = 0; b < cols.n; ++b) {
                            const Idx q = q0 - a * q_row - b * cols.win_step;
                            const A d = to_acc(g[q]);
                            if ((unsigned)off[q] == k0 + a * k_row + b * cols.tap_step) {
                                acc += d;
                            }
                        }
                    }
                    store(dx + (nc + u) * in_plane + p, acc);
                }
            }
        }
    }
}

// One thread per input element (n, c, h, w) of Planes planes when windows cannot overlap: at
// most one window covers it; writes that window's dout to dx if its stored offset names (h, w),
// else 0. Reads one offset and one dout per covered element.
template <typename T, typename Off, typename Idx, int Planes = 1, bool Packed = false>
__global__ void max_pool2d_backward_disjoint(const T* __restrict__ dout,
                                             const Off* __restrict__ offsets,
                                             T* __restrict__ dx, Idx planes,
                                             int H, int W, int Ho, int Wo, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    const Walk<Idx> wk = walk<Idx, Planes, Packed>(in_plane);
    FOR_POSITIONS(p, in_plane) {
        const int h = (int)(p / W), w = (int)(p - (Idx)h * W);
        const Cover rows = cover(h + ph, kh, sh, dh, Ho);
        const Cover cols = cover(w + pw, kw, sw, dw, Wo);
        // An uncovered element reads window 0 and expects kNoOffset, so it writes 0.
        const bool covered = rows.n > 0 && cols.n > 0;
        const Idx q = covered ? (Idx)rows.win * Wo + cols.win : 0;
        const unsigned k = covered ? (unsigned)rows.tap * kw + cols.tap : kNoOffset;
        FOR_PLANE_GROUPS(nc) {
            A d[Planes];
            bool hit[Planes];
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                const Idx base = group_plane(nc, u, planes) * out_plane;
                d[u] = to_acc(dout[base + q]);
                hit[u] = (unsigned)offsets[base + q] == k;
            }
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                if (in_group(nc, u, planes)) {
                    store(dx + (nc + u) * in_plane + p, hit[u] ? d[u] : A(0));
                }
            }
        }
    }
}

// Windows along one axis that cover the S input positions [S*b, S*b + S) (stride S): slot a
// holds window win[a] (descending, so ascending taps) and, per position i, the window's tap
// there or -1 (no tap there, window out of range, or position past the input). The launcher
// checks that at most NW windows cover such a block.
template <int S, int NW>
struct BlockCover {
    int win[NW];
    int tap[S][NW];
};

template <int S, int NW>
__device__ __forceinline__ BlockCover<S, NW> block_cover(int b, int size, int kernel, int pad,
                                                         int dilation, int n_out)
{
    BlockCover<S, NW> c;
    const int last = b + (pad + S - 1) / S;  // window of the block's last position
#pragma unroll
    for (int a = 0; a < NW; ++a) {
        const int win = last - a;
        const bool valid = win >= 0 && win < n_out;
        c.win[a] = valid ? win : 0;
#pragma unroll
        for (int i = 0; i < S; ++i) {
            const int r = S * b + i + pad - win * S;  // position inside window win
            const bool hit = valid && S * b + i < size && r >= 0 && r % dilation == 0 &&
                             r / dilation < kernel;
            c.tap[i][a] = hit ? r / dilation : -1;
        }
    }
    return c;
}

// One thread per S x S block of input elements (h in [S*bh, S*bh + S), w in [S*bw, S*bw + S))
// of Planes planes, for stride S on both axes when at most NW windows per axis cover a block:
// reads those NW x NW windows' dout and offsets once, and writes the block of dx, each element
// the sum (in Acc<T>, ascending tap order) of the dout whose offset names it. Rows go out as
// aligned pairs when S == 2 and W is even (then dx must be aligned to 2 elements).
template <typename T, typename Off, typename Idx, int S, int NW, int Planes, bool Packed = false>
__global__ void max_pool2d_backward_blocks(const T* __restrict__ dout,
                                           const Off* __restrict__ offsets,
                                           T* __restrict__ dx, Idx planes,
                                           int H, int W, int Ho, int Wo, int kh, int kw,
                                           int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    const int Bh = (H - 1) / S + 1, Bw = (W - 1) / S + 1;  // H + S - 1 could pass 2**31
    const Idx blocks = (Idx)Bh * Bw;
    const bool pairs = S == 2 && W % 2 == 0;
    const Walk<Idx> wk = walk<Idx, Planes, Packed>(blocks);
    FOR_POSITIONS(p, blocks) {
        const int bh = (int)(p / Bw), bw = (int)(p - (Idx)bh * Bw);
        const BlockCover<S, NW> rows = block_cover<S, NW>(bh, H, kh, ph, dh, Ho);
        const BlockCover<S, NW> cols = block_cover<S, NW>(bw, W, kw, pw, dw, Wo);
        const Idx corner = (Idx)(S * bh) * W + S * bw;
        FOR_PLANE_GROUPS(nc) {
            A d[Planes][NW][NW];
            unsigned o[Planes][NW][NW];
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                const Idx base = group_plane(nc, u, planes) * out_plane;
#pragma unroll
                for (int a = 0; a < NW; ++a) {
#pragma unroll
                    for (int c = 0; c < NW; ++c) {
                        const Idx q = base + (Idx)rows.win[a] * Wo + cols.win[c];
                        d[u][a][c] = to_acc(dout[q]);
                        o[u][a][c] = (unsigned)offsets[q];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < Planes; ++u) {
                if (!in_group(nc, u, planes)) break;
                T* block = dx + (nc + u) * in_plane + corner;
#pragma unroll
                for (int i = 0; i < S; ++i) {
                    if (S * bh + i >= H) break;
                    A acc[S];
#pragma unroll
                    for (int j = 0; j < S; ++j) {
                        acc[j] = 0;
#pragma unroll
                        for (int a = 0; a < NW; ++a) {
#pragma unroll
                            for (int c = 0; c < NW; ++c) {
                                const bool used = rows.tap[i][a] >= 0 && cols.tap[j][c] >= 0;
                                const unsigned k = used ? (unsigned)rows.tap[i][a] * kw +
                                                              cols.tap[j][c]
                                                        : kNoOffset;
                                if (o[u][a][c] == k) acc[j] += d[u][a][c];
                            }
                        }
                    }
                    if (pairs) {
                        store_pair(block + (Idx)i * W, acc[0], acc[S - 1]);
                    } else {
#pragma unroll
                        for (int j = 0; j < S; ++j) {
                            if (S * bw + j < W) store(block + (Idx)i * W + j, acc[j]);
                        }
                    }
                }
            }
        }
    }
}
#undef FOR_PLANE_GROUPS
#undef FOR_POSITIONS
