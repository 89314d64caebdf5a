// Max pooling over NCHW tensors: forward with compact argmax offsets, deterministic backward.
//
// Geometry (gpulayers/shapes.py): window (oh, ow) covers the input rows oh*sh - ph + i*dh,
// i in [0, kh), and the columns ow*sw - pw + j*dw, j in [0, kw); taps outside [0, H) x [0, W)
// are padding and ignored. Tap (i, j) has the compact offset i*kw + j.
//
// Launch layout, every kernel: blockIdx.x/threadIdx.x walk the positions of one plane
// ((Ho, Wo) for the forward pass, (H, W) for the backward), blockIdx.y walks the N*C planes;
// both loops are grid-stride. A thread works out its windows once (the only integer divisions)
// and reuses them for every plane it visits, so the per-element work is loads, compares, adds.
// Idx (int or long long) holds element indices and must hold every tensor's size.
#ifndef GPULAYERS_CPU_SHIM
#include <cuda_fp16.h>
#endif

// Window taps per axis that the forward fast path unrolls (3x3 and smaller windows), and
// covering windows per axis that the backward fast path unrolls (e.g. 3x3 windows, stride 2).
enum : int { kForwardTaps = 3, kBackwardWindows = 2 };

// Offset that no window stores: what a backward thread expects where it must not add.
enum : unsigned { kNoOffset = 0xffffffffu };

// Accumulation and comparison type: float for __half, T otherwise.
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<__half> { typedef float type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

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

// One thread per output element (n, c, oh, ow): reads the in-range taps of its window in x, in
// row-major order, and writes their maximum to out and its compact offset to offsets. PyTorch's
// rule `v > best || isnan(v)`: the first maximum wins ties, the last NaN wins, and an all -inf
// window keeps its first in-range tap.
template <typename T, typename Off, typename Idx>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ out,
                                   Off* __restrict__ offsets, Idx planes,
                                   int H, int W, int Ho, int Wo, int kh, int kw,
                                   int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    for (Idx p = (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x; p < out_plane;
         p = grid_next(p, (Idx)blockDim.x * (Idx)gridDim.x, out_plane)) {
        const int oh = (int)(p / Wo), ow = (int)(p - (Idx)oh * Wo);
        const int h0 = oh * sh - ph, w0 = ow * sw - pw;
        // In-range taps i in [i0, i0 + ni), j in [j0, j0 + nj); the geometry checks ni, nj >= 1.
        const int i0 = h0 < 0 ? (dh - 1 - h0) / dh : 0;
        const int j0 = w0 < 0 ? (dw - 1 - w0) / dw : 0;
        const int ni = imin(kh, (H - 1 - h0) / dh + 1) - i0;
        const int nj = imin(kw, (W - 1 - w0) / dw + 1) - j0;
        const Idx first = (Idx)(h0 + i0 * dh) * W + (w0 + j0 * dw);
        const Idx row_step = (Idx)dh * W;
        const int first_offset = i0 * kw + j0;
        const bool small = ni <= kForwardTaps && nj <= kForwardTaps;
        for (Idx nc = blockIdx.y; nc < planes; nc = grid_next(nc, (Idx)gridDim.y, planes)) {
            const T* win = x + nc * in_plane + first;
            A best;  // starts at the first in-range tap: the same result as starting at -inf
            int arg = first_offset;
            if (small) {
                // Load every slot first (unused ones re-read the window's last tap), so the loads
                // are in flight together; then compare, branch-free, over the used slots only.
                A v[kForwardTaps][kForwardTaps];
#pragma unroll
                for (int a = 0; a < kForwardTaps; ++a) {
#pragma unroll
                    for (int b = 0; b < kForwardTaps; ++b) {
                        v[a][b] = to_acc(win[imin(a, ni - 1) * row_step + imin(b, nj - 1) * dw]);
                    }
                }
                best = v[0][0];
#pragma unroll
                for (int a = 0; a < kForwardTaps; ++a) {
#pragma unroll
                    for (int b = 0; b < kForwardTaps; ++b) {
                        const bool take = (a < ni) & (b < nj) & ((v[a][b] > best) | isnan(v[a][b]));
                        best = take ? v[a][b] : best;
                        arg = take ? first_offset + a * kw + b : arg;
                    }
                }
            } else {
                best = to_acc(win[0]);
                for (int a = 0; a < ni; ++a) {
                    for (int b = 0; b < nj; ++b) {
                        const A v = to_acc(win[a * row_step + b * dw]);
                        if (v > best || isnan(v)) {
                            best = v;
                            arg = first_offset + a * kw + b;
                        }
                    }
                }
            }
            store(out + nc * out_plane + p, best);
            offsets[nc * out_plane + p] = (Off)arg;
        }
    }
}

// One thread per input element (n, c, h, w) for overlapping windows: visits the windows that
// cover it in ascending tap order, reads their offsets and dout, adds dout (in Acc<T>) where the
// offset names (h, w), and writes the sum (0 when none) to dx. No atomics, fixed order.
template <typename T, typename Off, typename Idx>
__global__ void max_pool2d_backward(const T* __restrict__ dout, const Off* __restrict__ offsets,
                                    T* __restrict__ dx, Idx planes,
                                    int H, int W, int Ho, int Wo, int kh, int kw,
                                    int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    for (Idx p = (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x; p < in_plane;
         p = grid_next(p, (Idx)blockDim.x * (Idx)gridDim.x, in_plane)) {
        const int h = (int)(p / W), w = (int)(p - (Idx)h * W);
        const Cover rows = cover(h + ph, kh, sh, dh, Ho);
        const Cover cols = cover(w + pw, kw, sw, dw, Wo);
        // Window (a, b) of the cover: in-plane output index and the offset that names (h, w).
        const Idx q0 = (Idx)rows.win * Wo + cols.win;
        const Idx q_row = (Idx)rows.win_step * Wo;
        const int k0 = rows.tap * kw + cols.tap, k_row = rows.tap_step * kw;
        const bool small = rows.n <= kBackwardWindows && cols.n <= kBackwardWindows;
        for (Idx nc = blockIdx.y; nc < planes; nc = grid_next(nc, (Idx)gridDim.y, planes)) {
            const Off* off = offsets + nc * out_plane;
            const T* g = dout + nc * out_plane;
            A acc = 0;
            if (small) {
                // All slots load; unused ones read window 0 and expect kNoOffset, so they never
                // add. The loads are in flight together and the adds keep ascending tap order.
#pragma unroll
                for (int a = 0; a < kBackwardWindows; ++a) {
#pragma unroll
                    for (int b = 0; b < kBackwardWindows; ++b) {
                        const bool used = a < rows.n && b < cols.n;
                        const Idx q = used ? q0 - a * q_row - b * cols.win_step : 0;
                        const unsigned k = used ? k0 + a * k_row + b * cols.tap_step : kNoOffset;
                        const A d = to_acc(g[q]);
                        if ((unsigned)off[q] == k) acc += d;
                    }
                }
            } else {
                for (int a = 0; a < rows.n; ++a) {
                    for (int b = 0; b < cols.n; ++b) {
                        const Idx q = q0 - a * q_row - b * cols.win_step;
                        const A d = to_acc(g[q]);
                        if ((unsigned)off[q] == (unsigned)(k0 + a * k_row + b * cols.tap_step)) {
                            acc += d;
                        }
                    }
                }
            }
            store(dx + nc * in_plane + p, acc);
        }
    }
}

// One thread per input element (n, c, h, w) when windows cannot overlap: at most one window
// covers it; writes that window's dout to dx if its stored offset names (h, w), else 0.
// Reads one offset and one dout per covered element.
template <typename T, typename Off, typename Idx>
__global__ void max_pool2d_backward_disjoint(const T* __restrict__ dout,
                                             const Off* __restrict__ offsets,
                                             T* __restrict__ dx, Idx planes,
                                             int H, int W, int Ho, int Wo, int kh, int kw,
                                             int sh, int sw, int ph, int pw, int dh, int dw)
{
    typedef typename Acc<T>::type A;
    const Idx in_plane = (Idx)H * W, out_plane = (Idx)Ho * Wo;
    for (Idx p = (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x; p < in_plane;
         p = grid_next(p, (Idx)blockDim.x * (Idx)gridDim.x, in_plane)) {
        const int h = (int)(p / W), w = (int)(p - (Idx)h * W);
        const Cover rows = cover(h + ph, kh, sh, dh, Ho);
        const Cover cols = cover(w + pw, kw, sw, dw, Wo);
        // An uncovered element reads window 0 and expects kNoOffset, so it writes 0.
        const bool covered = rows.n > 0 && cols.n > 0;
        const Idx q = covered ? (Idx)rows.win * Wo + cols.win : 0;
        const unsigned k = covered ? (unsigned)(rows.tap * kw + cols.tap) : kNoOffset;
        for (Idx nc = blockIdx.y; nc < planes; nc = grid_next(nc, (Idx)gridDim.y, planes)) {
            const A d = to_acc(dout[nc * out_plane + q]);
            const bool hit = (unsigned)offsets[nc * out_plane + q] == k;
            store(dx + nc * in_plane + p, hit ? d : A(0));
        }
    }
}
