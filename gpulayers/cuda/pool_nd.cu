// Pooling over 1, 2 or 3 spatial axes, written once for 3 (D, H, W): max and average pooling,
// adaptive max and average pooling, max unpooling; forward and deterministic backward passes;
// for T = __half, __nv_bfloat16, float and double (compared and summed in float for the 16-bit
// types, results rounded to nearest even), in channels-first or channels-last layout.
//
// Ranks below 3 run as D = H = 1 (1-D) or D = 1 (2-D), with kernel 1, stride 1, pad 0 and
// dilation 1 on the added axes, as PyTorch's kernels do; compact offsets and flat indices are
// then those of the lower rank. pool_nd_kernels.py pads the geometry and launches.
//
// Geometry (gpulayers/shapes.py): along axis a, window o covers the input positions
// o*stride - pad + t*dilation for taps t < kernel; positions outside [0, size) are padding and
// ignored. Tap (td, th, tw) has the compact offset (td*kh + th)*kw + tw (row-major over the
// kernel). Adaptive windows (AdaptiveGeometry) cover [floor(o*L/O), ceil((o+1)*L/O)) per axis;
// their taps have compact offsets row-major over AdaptiveGeometry.window (wd, wh, ww).
//
// Memory layouts (the kernels' last template argument, a layout functor; ChannelsFirst by
// default): ChannelsFirst is (N, C, *spatial), ChannelsLast is (N, *spatial, C). A layout
// splits the work into x-items and y-items and maps (y-item, x-item, spatial position) to an
// element's address:
// - ChannelsFirst: an x-item is a position of one (n, c) plane, a y-item one of the N*C
//   planes; element (plane o, position q) at o*plane + q.
// - ChannelsLast: an x-item is a (position, channel) pair of one sample, channel fastest (so
//   consecutive threads read consecutive channels: coalesced), a y-item one of the N samples;
//   element (sample o, channel c, position q) at (o*plane + q)*C + c.
// Both visit the same taps and windows in the same order, so the channels-last results are
// the channels-first results on the transposed tensor, bit for bit (offsets and unpool
// indices are per (n, c) plane, as for channels-first).
//
// Launch layout, every kernel: blockIdx.x/threadIdx.x walk the x-items (over output
// positions for a forward pass, input positions for a backward pass), blockIdx.y walks the
// y-items; both loops are grid-stride. A thread works out its window (or covering windows)
// once and reuses it for every y-item it visits.
//
// Idx (int or long long) holds element indices and must hold every tensor's size; every
// product that can reach a plane's or a tensor's size is formed in Idx ((Idx)a * b). The
// launcher keeps sizes, padded sizes plus a stride and a window extent below 2**31, so
// positions and window bounds fit int; products of a position and a size (adaptive bounds)
// are formed in long long. Compact offsets are formed in unsigned (window sizes below 2**32).
// Channels-last x-items (positions times C) and strides (C per position) are Idx too.
//
// Only the *_vec kernels (channels-last max and average pooling, forward and backward) use
// vector loads and stores: V = VecWidth<T>::value consecutive channels (16 bytes of values,
// Vec<T, V>), so they need C a multiple of V and every array they access by vectors aligned to
// V of its elements: x and out (forward; offsets stay scalar there), dout and dx (backward)
// 16-byte aligned, and max's offsets (backward, read as Vec<Off, V>) aligned to V offsets; the
// launcher checks and runs the scalar channels-last kernels otherwise. Every other pointer
// needs only its element alignment (channels-last loads are coalesced across consecutive
// channels).
#ifndef GPULAYERS_CPU_SHIM
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

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
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Next index of a grid-stride loop over [.., n): i + step, or n once that reaches n.
// Never forms a value past n, so a 32-bit Idx cannot overflow near 2**31.
template <typename Idx>
__device__ __forceinline__ Idx grid_next(Idx i, Idx step, Idx n)
{
    return i < n - step ? i + step : n;
}

// Grid-stride loops: x-items i of n (x), y-items o of the layout's outer (y).
#define FOR_ITEMS(i, n)                                                                        \
    for (Idx i = (Idx)blockIdx.x * (Idx)blockDim.x + (Idx)threadIdx.x; i < (n);                \
         i = grid_next(i, (Idx)blockDim.x * (Idx)gridDim.x, (Idx)(n)))
#define FOR_OUTER(o)                                                                           \
    for (Idx o = (Idx)blockIdx.y; o < layout.outer; o = grid_next(o, (Idx)gridDim.y, layout.outer))

// ------------------------------------------------------------------------- layouts
// Every kernel takes (Idx outer, int C) and builds its layout L<Idx>{outer, C}: outer is the
// number of y-items (N*C planes, or N samples), C the channels. For a tensor of `plane`
// positions per (n, c) plane:
// - items(plane): x-items per y-item;
// - split(i, q, lane): x-item i as its spatial position q and its lane (0, or the channel);
// - offset(o, plane): where y-item o starts; x-item i of it is at offset(o, plane) + i, and
//   position q of its lane at offset(o, plane) + lane + q*pitch().

// (N, C, *spatial): x-items are a plane's positions, y-items the N*C planes.
template <typename Idx>
struct ChannelsFirst {
    Idx outer;
    int C;  // not needed
    __device__ __forceinline__ Idx items(Idx plane) const { return plane; }
    __device__ __forceinline__ void split(Idx i, Idx& q, Idx& lane) const
    {
        q = i;
        lane = 0;
    }
    __device__ __forceinline__ Idx offset(Idx o, Idx plane) const { return o * plane; }
    __device__ __forceinline__ Idx pitch() const { return 1; }
};

// (N, *spatial, C): x-items are a sample's (position, channel) pairs, channel fastest; y-items
// the N samples.
template <typename Idx>
struct ChannelsLast {
    Idx outer;
    int C;
    __device__ __forceinline__ Idx items(Idx plane) const { return plane * C; }
    __device__ __forceinline__ void split(Idx i, Idx& q, Idx& lane) const
    {
        q = i / C;
        lane = i - q * C;
    }
    __device__ __forceinline__ Idx offset(Idx o, Idx plane) const { return o * (plane * C); }
    __device__ __forceinline__ Idx pitch() const { return (Idx)C; }
};

// ------------------------------------------------------------------------- vectors

// Channels per 16-byte vector: 4 floats, 8 halves or bfloat16s, 2 doubles.
template <typename T> struct VecWidth { static const int value = 16 / (int)sizeof(T); };

// V consecutive elements, aligned to their size (one 16-byte load or store).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
    T v[V];
};

// The vector at p (must be aligned to it: the shim records a misaligned one as a fault).
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p)
{
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(p, sizeof(Vec<T, V>), "Vec load");
    Vec<T, V> r;
    std::memcpy(&r, p, sizeof r);
    return r;
#else
    return *reinterpret_cast<const Vec<T, V>*>(p);
#endif
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& r)
{
#ifdef GPULAYERS_CPU_SHIM
    cuda_shim::check_aligned(p, sizeof(Vec<T, V>), "Vec store");
    std::memcpy(p, &r, sizeof r);
#else
    *reinterpret_cast<Vec<T, V>*>(p) = r;
#endif
}

// Position p of a (n0, n1, n2) plane as its three coordinates.
template <typename Idx>
__device__ __forceinline__ void decode3(Idx p, int n1, int n2, int (&o)[3])
{
    const Idx n12 = (Idx)n1 * n2;
    o[0] = (int)(p / n12);
    const Idx r = p - (Idx)o[0] * n12;
    o[1] = (int)(r / n2);
    o[2] = (int)(r - (Idx)o[1] * n2);
}

// ------------------------------------------------------------------------- geometry

// One spatial axis of a pooling geometry.
struct PoolAxis {
    int size, out, kernel, stride, pad, dilation;
};

// A pooling geometry over (D, H, W).
struct Pool3 {
    PoolAxis a[3];
};

// The kernels' geometry arguments, in this order, and the Pool3 they make.
#define POOL3_PARAMS                                                                           \
    int D, int H, int W, int Do, int Ho, int Wo, int kd, int kh, int kw, int sd, int sh,       \
        int sw, int pd, int ph, int pw, int dd, int dh, int dw
#define POOL3_GEOMETRY                                                                         \
    {{{D, Do, kd, sd, pd, dd}, {H, Ho, kh, sh, ph, dh}, {W, Wo, kw, sw, pw, dw}}}

// The in-range taps of one window over a plane: n[a] taps along axis a; tap (a, b, c) (counted
// from the first in-range one) is the plane's element first + a*step[0] + b*step[1] +
// c*step[2] and has the compact offset k0 + a*kstep[0] + b*kstep[1] + c*kstep[2].
template <typename Idx>
struct Window3 {
    Idx first, step[3];
    int n[3];
    unsigned k0, kstep[3];
};

// Window (o[0], o[1], o[2]) of a pooling geometry; a position's elements lie `step` apart
// (the layout's pitch).
template <typename Idx>
__device__ __forceinline__ Window3<Idx> pool_window(const Pool3& g, const int (&o)[3], Idx step)
{
    const Idx pitch[3] = {(Idx)g.a[1].size * g.a[2].size * step, (Idx)g.a[2].size * step, step};
    const unsigned kpitch[3] = {(unsigned)g.a[1].kernel * (unsigned)g.a[2].kernel,
                                (unsigned)g.a[2].kernel, 1u};
    Window3<Idx> w;
    w.first = 0;
    w.k0 = 0;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const PoolAxis& a = g.a[i];
        const int start = o[i] * a.stride - a.pad;
        const int t0 = start < 0 ? (a.dilation - 1 - start) / a.dilation : 0;
        const int t1 = start < a.size ? imin(a.kernel, (a.size - 1 - start) / a.dilation + 1) : 0;
        w.n[i] = imax(t1 - t0, 0);  // >= 1: the launcher checks that no window is all padding
        w.first += (Idx)(start + t0 * a.dilation) * pitch[i];
        w.step[i] = (Idx)a.dilation * pitch[i];
        w.k0 += (unsigned)t0 * kpitch[i];
        w.kstep[i] = kpitch[i];
    }
    return w;
}

// Adaptive window bounds along an axis of `size` inputs and `out` outputs (PyTorch's rule).
__device__ __forceinline__ int adaptive_start(int o, int size, int out)
{
    return (int)((long long)o * size / out);
}

__device__ __forceinline__ int adaptive_end(int o, int size, int out)
{
    return (int)(((long long)(o + 1) * size + out - 1) / out);
}

// Window o of an adaptive geometry with input (D, H, W) sizes in[], output sizes out[] and
// largest window lengths (window[1], window[2]) along H and W (what the offsets count over);
// a position's elements lie `step` apart (the layout's pitch).
template <typename Idx>
__device__ __forceinline__ Window3<Idx> adaptive_window(const int (&in)[3], const int (&out)[3],
                                                        int wh, int ww, const int (&o)[3],
                                                        Idx step)
{
    const Idx pitch[3] = {(Idx)in[1] * in[2] * step, (Idx)in[2] * step, step};
    const unsigned kpitch[3] = {(unsigned)wh * (unsigned)ww, (unsigned)ww, 1u};
    Window3<Idx> w;
    w.first = 0;
    w.k0 = 0;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const int start = adaptive_start(o[i], in[i], out[i]);
        w.n[i] = adaptive_end(o[i], in[i], out[i]) - start;
        w.first += (Idx)start * pitch[i];
        w.step[i] = pitch[i];
        w.kstep[i] = kpitch[i];
    }
    return w;
}

// Calls op(v, k) for every in-range tap of window w over plane x, in row-major tap order:
// v is the tap's value (in Acc<T>), k its compact offset.
template <typename T, typename Idx, typename Op>
__device__ __forceinline__ void visit_taps(const T* x, const Window3<Idx>& w, Op& op)
{
    for (int a = 0; a < w.n[0]; ++a) {
        for (int b = 0; b < w.n[1]; ++b) {
            const Idx row = w.first + a * w.step[0] + b * w.step[1];
            const unsigned k = w.k0 + a * w.kstep[0] + b * w.kstep[1];
            for (int c = 0; c < w.n[2]; ++c) op(to_acc(x[row + c * w.step[2]]), k + c);
        }
    }
}

// visit_taps for the *_vec kernels: op(v, k) gets each tap's V channels at x as one Vec load.
template <typename T, int V, typename Idx, typename Op>
__device__ __forceinline__ void visit_taps_vec(const T* x, const Window3<Idx>& w, Op& op)
{
    for (int a = 0; a < w.n[0]; ++a) {
        for (int b = 0; b < w.n[1]; ++b) {
            const Idx row = w.first + a * w.step[0] + b * w.step[1];
            const unsigned k = w.k0 + a * w.kstep[0] + b * w.kstep[1];
            for (int c = 0; c < w.n[2]; ++c) op(load_vec<T, V>(x + row + c * w.step[2]), k + c);
        }
    }
}

// The pooling windows along one axis that cover one input position, in ascending tap order:
// the i-th (i < n) is window win - i*win_step, where the position is its tap tap + i*tap_step.
struct PoolCover {
    int n, win, tap, win_step, tap_step;
    __device__ __forceinline__ int window(int i) const { return win - i * win_step; }
    __device__ __forceinline__ int tap_of(int i) const { return tap + i * tap_step; }
};

// Covering windows of input position pos along axis a. The taps that reach a position form an
// arithmetic sequence (t*dilation = pos + pad mod stride), so two of them give the steps.
__device__ __forceinline__ PoolCover pool_cover(int pos, const PoolAxis& a)
{
    PoolCover c = {0, 0, 0, 0, 0};
    const int padded = pos + a.pad;
    for (int t = 0; t < a.kernel && t * a.dilation <= padded; ++t) {
        const int r = padded - t * a.dilation;
        if (r % a.stride != 0 || r / a.stride >= a.out) continue;
        if (c.n == 0) {
            c.tap = t;
            c.win = r / a.stride;
        } else if (c.n == 1) {
            c.tap_step = t - c.tap;
            c.win_step = c.win - r / a.stride;
        }
        ++c.n;
    }
    return c;
}

// The covers of the input position with coordinates x along the three axes of g.
__device__ __forceinline__ void pool_covers(const int (&x)[3], const Pool3& g,
                                            PoolCover (&c)[3])
{
#pragma unroll
    for (int a = 0; a < 3; ++a) c[a] = pool_cover(x[a], g.a[a]);
}

// The adaptive windows along one axis that cover input position pos, in ascending window
// order: windows [floor(pos*out/size), ceil((pos+1)*out/size)); the i-th is window lo + i and
// the position is its tap pos - start(lo + i).
struct AdaptiveCover {
    int n, lo, pos, size, out;
    __device__ __forceinline__ int window(int i) const { return lo + i; }
    __device__ __forceinline__ int tap_of(int i) const
    {
        return pos - adaptive_start(lo + i, size, out);
    }
};

__device__ __forceinline__ AdaptiveCover adaptive_cover(int pos, int size, int out)
{
    const int lo = (int)((long long)pos * out / size);
    const int hi = (int)(((long long)(pos + 1) * out + size - 1) / size);
    return {hi - lo, lo, pos, size, out};
}

// Calls op(q, k, o) for every window that covers one input position, given its covers c[axis]
// over an output plane (Do, Ho, Wo): row-major over the covers (c[0] outermost, each in its
// own order); q is the window's in-plane output index times `step` (the layout's pitch), o its
// coordinates, k the compact offset (counted over kernel or window sizes kpitch1 = k1*k2,
// kpitch2 = k2) that names the position.
template <typename Idx, typename Cover, typename Op>
__device__ __forceinline__ void visit_covers(const Cover (&c)[3], int Ho, int Wo,
                                             unsigned kpitch1, unsigned kpitch2, Idx step,
                                             Op& op)
{
    int o[3];
    for (int a = 0; a < c[0].n; ++a) {
        o[0] = c[0].window(a);
        const unsigned ka = (unsigned)c[0].tap_of(a) * kpitch1;
        for (int b = 0; b < c[1].n; ++b) {
            o[1] = c[1].window(b);
            const unsigned kb = ka + (unsigned)c[1].tap_of(b) * kpitch2;
            const Idx row = ((Idx)o[0] * Ho + o[1]) * Wo;
            for (int e = 0; e < c[2].n; ++e) {
                o[2] = c[2].window(e);
                op((row + o[2]) * step, kb + (unsigned)c[2].tap_of(e), o);
            }
        }
    }
}

// ------------------------------------------------------------------------- functors

// Forward max: PyTorch's rule `v > best || isnan(v)`: the first maximum in tap order wins
// ties, the last NaN wins, and a window of -inf keeps the first tap (best starts there).
template <typename A>
struct MaxOp {
    A best;
    unsigned arg;
    __device__ __forceinline__ void operator()(A v, unsigned k)
    {
        if (v > best || isnan(v)) {
            best = v;
            arg = k;
        }
    }
};

// Forward sum, in Acc<T>, from +0 (so an all -0 window sums to +0, as the xp paths).
template <typename A>
struct SumOp {
    A sum;
    __device__ __forceinline__ void operator()(A v, unsigned) { sum += v; }
};

// Backward max: adds dout of every covering window whose stored offset names the position.
template <typename T, typename Off, typename A>
struct MaxGradOp {
    const T* dout;
    const Off* offsets;
    A acc;
    template <typename Idx>
    __device__ __forceinline__ void operator()(Idx q, unsigned k, const int (&)[3])
    {
        if ((unsigned)offsets[q] == k) acc += to_acc(dout[q]);
    }
};

// Backward average: adds dout / divisor of every covering window (the quotient rounded as the
// forward pass and the xp paths round it).
template <typename T, typename A, typename Divisor>
struct AvgGradOp {
    const T* dout;
    Divisor divisor;
    A acc;
    template <typename Idx>
    __device__ __forceinline__ void operator()(Idx q, unsigned, const int (&o)[3])
    {
        acc += to_acc(dout[q]) / (A)divisor(o);
    }
};

// PyTorch's avg_pool divisor of window o: divisor_override when > 0; else with
// count_include_pad the window's size clipped to the right padding (never the ceil_mode
// overhang past it), without it the number of in-range elements. No dilation (avg pooling
// has none; the launcher checks).
struct PoolDivisor {
    Pool3 g;
    int include_pad, override_;
    __device__ __forceinline__ long long operator()(const int (&o)[3]) const
    {
        if (override_ > 0) return override_;
        long long full = 1, inside = 1;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            const PoolAxis& a = g.a[i];
            const int start = o[i] * a.stride - a.pad;
            const int end = imin(start + a.kernel, a.size + a.pad);
            full *= end - start;
            inside *= imin(end, a.size) - imax(start, 0);
        }
        return include_pad ? full : inside;
    }
};

// Element count of adaptive window o.
struct AdaptiveDivisor {
    int in[3], out[3];
    __device__ __forceinline__ long long operator()(const int (&o)[3]) const
    {
        long long n = 1;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            n *= adaptive_end(o[i], in[i], out[i]) - adaptive_start(o[i], in[i], out[i]);
        }
        return n;
    }
};

// ------------------------------------------------------------------- pooling kernels
// Kernels are templates <T, [Off,] Idx, L = ChannelsFirst>: value, [offset,] index type and
// layout (see the header). In the comments, "element (n, c, ...)" is one x-item of one y-item.

// One thread per output element (n, c, od, oh, ow): reads the in-range taps of its window in
// x in row-major order and writes their maximum (PyTorch's rule, see MaxOp) to out and its
// compact offset to offsets.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void max_pool3d_forward(const T* __restrict__ x, T* __restrict__ out,
                                   Off* __restrict__ offsets, Idx outer, int C, POOL3_PARAMS)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const Pool3 g = POOL3_GEOMETRY;
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(out_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = pool_window<Idx>(g, o, layout.pitch());
        FOR_OUTER(nc) {
            const T* xp = x + layout.offset(nc, in_plane) + lane;
            MaxOp<A> op = {to_acc(xp[w.first]), w.k0};
            visit_taps(xp, w, op);
            const Idx at = layout.offset(nc, out_plane) + i;
            store(out + at, op.best);
            offsets[at] = (Off)op.arg;
        }
    }
}

// One thread per input element (n, c, d, h, w): visits the windows that cover it in ascending
// tap order and writes to dx the sum (in Acc<T>, 0 when none) of dout over those whose stored
// offset names it. No atomics, fixed order: every element of dx written, deterministically.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void max_pool3d_backward(const T* __restrict__ dout, const Off* __restrict__ offsets,
                                    T* __restrict__ dx, Idx outer, int C, POOL3_PARAMS)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const Pool3 g = POOL3_GEOMETRY;
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int x[3];
        decode3(p, H, W, x);
        PoolCover c[3];
        pool_covers(x, g, c);
        FOR_OUTER(nc) {
            const Idx base = layout.offset(nc, out_plane) + lane;
            MaxGradOp<T, Off, A> op = {dout + base, offsets + base, A(0)};
            visit_covers<Idx>(c, Ho, Wo, (unsigned)kh * (unsigned)kw, (unsigned)kw,
                              layout.pitch(), op);
            store(dx + layout.offset(nc, in_plane) + i, op.acc);
        }
    }
}

// One thread per output element (n, c, od, oh, ow): sums the in-range taps of its window in
// row-major order (in Acc<T>, from +0) and writes the sum / PyTorch's divisor (PoolDivisor).
template <typename T, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void avg_pool3d_forward(const T* __restrict__ x, T* __restrict__ out, Idx outer,
                                   int C, POOL3_PARAMS, int count_include_pad,
                                   int divisor_override)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const PoolDivisor divisor = {POOL3_GEOMETRY, count_include_pad, divisor_override};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(out_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = pool_window<Idx>(divisor.g, o, layout.pitch());
        const A div = (A)divisor(o);
        FOR_OUTER(nc) {
            SumOp<A> op = {A(0)};
            visit_taps(x + layout.offset(nc, in_plane) + lane, w, op);
            store(out + layout.offset(nc, out_plane) + i, op.sum / div);
        }
    }
}

// One thread per input element (n, c, d, h, w): visits the windows that cover it in ascending
// tap order and writes to dx the sum (in Acc<T>, from +0) of dout / divisor over them. No
// atomics, fixed order.
template <typename T, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void avg_pool3d_backward(const T* __restrict__ dout, T* __restrict__ dx, Idx outer,
                                    int C, POOL3_PARAMS, int count_include_pad,
                                    int divisor_override)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const PoolDivisor divisor = {POOL3_GEOMETRY, count_include_pad, divisor_override};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int x[3];
        decode3(p, H, W, x);
        PoolCover c[3];
        pool_covers(x, divisor.g, c);
        FOR_OUTER(nc) {
            AvgGradOp<T, A, PoolDivisor> op = {dout + layout.offset(nc, out_plane) + lane,
                                               divisor, A(0)};
            visit_covers<Idx>(c, Ho, Wo, (unsigned)kh * (unsigned)kw, (unsigned)kw,
                              layout.pitch(), op);
            store(dx + layout.offset(nc, in_plane) + i, op.acc);
        }
    }
}

// Vectorised channels-last kernels <T, [Off,] Idx, L = ChannelsLast> (L must be
// ChannelsLast): an x-item is (position, group of V = VecWidth<T> consecutive channels). In the
// forward kernels each tap is one Vec load, in the backward kernels each covering window one
// Vec load of dout (and of max's offsets), and each lane runs the scalar kernel's arithmetic in
// its tap (window) order, so the results are those of the scalar channels-last kernels bit for
// bit. Needs C % V == 0 and the vector arrays aligned (see the header; the launcher checks).

// V scalar forward functors (MaxOp, SumOp), lane j fed channel j of each tap's Vec.
template <typename Op, int V>
struct Lanes {
    Op lane[V];
    template <typename T>
    __device__ __forceinline__ void operator()(const Vec<T, V>& v, unsigned k)
    {
#pragma unroll
        for (int j = 0; j < V; ++j) lane[j](to_acc(v.v[j]), k);
    }
};

// x-item i of a *_vec kernel as its position p in the plane and the first channel (lane) of
// its group of V (groups = C / V per position).
template <typename Idx>
__device__ __forceinline__ void vec_item(Idx i, Idx groups, int V, Idx& p, Idx& lane)
{
    p = i / groups;
    lane = (i - p * groups) * V;
}

// V values rounded to T and stored as one Vec at p.
template <typename T, int V, typename A>
__device__ __forceinline__ void store_lanes(T* p, const A (&v)[V])
{
    Vec<T, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) store(&r.v[j], v[j]);
    store_vec<T, V>(p, r);
}

// max_pool3d_forward over V channels per thread: per lane MaxOp from the first tap; out
// stored as one Vec, offsets scalar.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsLast>
__global__ void max_pool3d_forward_vec(const T* __restrict__ x, T* __restrict__ out,
                                       Off* __restrict__ offsets, Idx outer, int C,
                                       POOL3_PARAMS)
{
    typedef typename Acc<T>::type A;
    const int V = VecWidth<T>::value;
    const L<Idx> layout = {outer, C};
    const Pool3 g = POOL3_GEOMETRY;
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    const Idx groups = (Idx)(C / V);
    FOR_ITEMS(i, out_plane * groups) {
        Idx p, lane;
        vec_item(i, groups, V, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = pool_window<Idx>(g, o, layout.pitch());
        FOR_OUTER(nc) {
            const T* xp = x + layout.offset(nc, in_plane) + lane;
            const Vec<T, V> first = load_vec<T, V>(xp + w.first);
            Lanes<MaxOp<A>, V> op;
#pragma unroll
            for (int j = 0; j < V; ++j) op.lane[j] = {to_acc(first.v[j]), w.k0};
            visit_taps_vec<T, V>(xp, w, op);
            const Idx at = layout.offset(nc, out_plane) + p * layout.pitch() + lane;
            A best[V];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                best[j] = op.lane[j].best;
                offsets[at + j] = (Off)op.lane[j].arg;
            }
            store_lanes<T, V>(out + at, best);
        }
    }
}

// avg_pool3d_forward over V channels per thread: per lane the sum from +0 in tap order, / the
// window's divisor; out stored as one Vec.
template <typename T, typename Idx, template <typename> class L = ChannelsLast>
__global__ void avg_pool3d_forward_vec(const T* __restrict__ x, T* __restrict__ out,
                                       Idx outer, int C, POOL3_PARAMS, int count_include_pad,
                                       int divisor_override)
{
    typedef typename Acc<T>::type A;
    const int V = VecWidth<T>::value;
    const L<Idx> layout = {outer, C};
    const PoolDivisor divisor = {POOL3_GEOMETRY, count_include_pad, divisor_override};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    const Idx groups = (Idx)(C / V);
    FOR_ITEMS(i, out_plane * groups) {
        Idx p, lane;
        vec_item(i, groups, V, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = pool_window<Idx>(divisor.g, o, layout.pitch());
        const A div = (A)divisor(o);
        FOR_OUTER(nc) {
            Lanes<SumOp<A>, V> op;
#pragma unroll
            for (int j = 0; j < V; ++j) op.lane[j].sum = A(0);
            visit_taps_vec<T, V>(x + layout.offset(nc, in_plane) + lane, w, op);
            A mean[V];
#pragma unroll
            for (int j = 0; j < V; ++j) mean[j] = op.lane[j].sum / div;
            store_lanes<T, V>(out + layout.offset(nc, out_plane) + p * layout.pitch() + lane,
                              mean);
        }
    }
}

// Backward max over V consecutive channels: per lane MaxGradOp's rule. The window's V offsets
// are one Vec<Off, V> load; its dout one Vec<T, V> load, made only when some lane's offset
// names the position (as the scalar kernel reads dout only then).
template <typename T, typename Off, typename A, int V>
struct VecMaxGradOp {
    const T* dout;
    const Off* offsets;
    A acc[V];
    template <typename Idx>
    __device__ __forceinline__ void operator()(Idx q, unsigned k, const int (&)[3])
    {
        const Vec<Off, V> off = load_vec<Off, V>(offsets + q);
        bool hit = false;
#pragma unroll
        for (int j = 0; j < V; ++j) hit |= (unsigned)off.v[j] == k;
        if (!hit) return;
        const Vec<T, V> d = load_vec<T, V>(dout + q);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            if ((unsigned)off.v[j] == k) acc[j] += to_acc(d.v[j]);
        }
    }
};

// Backward average over V consecutive channels: per lane AvgGradOp's sum (dout / divisor, the
// divisor formed once per window); dout one Vec<T, V> load per window.
template <typename T, typename A, int V, typename Divisor>
struct VecAvgGradOp {
    const T* dout;
    Divisor divisor;
    A acc[V];
    template <typename Idx>
    __device__ __forceinline__ void operator()(Idx q, unsigned, const int (&o)[3])
    {
        const A div = (A)divisor(o);
        const Vec<T, V> d = load_vec<T, V>(dout + q);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += to_acc(d.v[j]) / div;
    }
};

// max_pool3d_backward over V channels per thread: the covering windows in the scalar kernel's
// order (visit_covers), dout and offsets read as Vecs, per lane the sum (in Acc<T>, from +0)
// of the douts whose offset names the position; dx stored as one Vec. No atomics.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsLast>
__global__ void max_pool3d_backward_vec(const T* __restrict__ dout,
                                        const Off* __restrict__ offsets, T* __restrict__ dx,
                                        Idx outer, int C, POOL3_PARAMS)
{
    typedef typename Acc<T>::type A;
    const int V = VecWidth<T>::value;
    const L<Idx> layout = {outer, C};
    const Pool3 g = POOL3_GEOMETRY;
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    const Idx groups = (Idx)(C / V);
    FOR_ITEMS(i, in_plane * groups) {
        Idx p, lane;
        vec_item(i, groups, V, p, lane);
        int x[3];
        decode3(p, H, W, x);
        PoolCover c[3];
        pool_covers(x, g, c);
        FOR_OUTER(nc) {
            const Idx base = layout.offset(nc, out_plane) + lane;
            VecMaxGradOp<T, Off, A, V> op;
            op.dout = dout + base;
            op.offsets = offsets + base;
#pragma unroll
            for (int j = 0; j < V; ++j) op.acc[j] = A(0);
            visit_covers<Idx>(c, Ho, Wo, (unsigned)kh * (unsigned)kw, (unsigned)kw,
                              layout.pitch(), op);
            store_lanes<T, V>(dx + layout.offset(nc, in_plane) + p * layout.pitch() + lane,
                              op.acc);
        }
    }
}

// avg_pool3d_backward over V channels per thread (sum pooling too: divisor_override = 1): the
// covering windows in the scalar kernel's order, dout read as Vecs, per lane the sum (in
// Acc<T>, from +0) of dout / divisor; dx stored as one Vec. No atomics.
template <typename T, typename Idx, template <typename> class L = ChannelsLast>
__global__ void avg_pool3d_backward_vec(const T* __restrict__ dout, T* __restrict__ dx,
                                        Idx outer, int C, POOL3_PARAMS, int count_include_pad,
                                        int divisor_override)
{
    typedef typename Acc<T>::type A;
    const int V = VecWidth<T>::value;
    const L<Idx> layout = {outer, C};
    const PoolDivisor divisor = {POOL3_GEOMETRY, count_include_pad, divisor_override};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    const Idx groups = (Idx)(C / V);
    FOR_ITEMS(i, in_plane * groups) {
        Idx p, lane;
        vec_item(i, groups, V, p, lane);
        int x[3];
        decode3(p, H, W, x);
        PoolCover c[3];
        pool_covers(x, divisor.g, c);
        FOR_OUTER(nc) {
            VecAvgGradOp<T, A, V, PoolDivisor> op;
            op.dout = dout + layout.offset(nc, out_plane) + lane;
            op.divisor = divisor;
#pragma unroll
            for (int j = 0; j < V; ++j) op.acc[j] = A(0);
            visit_covers<Idx>(c, Ho, Wo, (unsigned)kh * (unsigned)kw, (unsigned)kw,
                              layout.pitch(), op);
            store_lanes<T, V>(dx + layout.offset(nc, in_plane) + p * layout.pitch() + lane,
                              op.acc);
        }
    }
}

// ---------------------------------------------------------- adaptive pooling kernels

// One thread per output element (n, c, od, oh, ow): reads its adaptive window in x in
// row-major order and writes the maximum (PyTorch's rule, see MaxOp) to out and its compact
// offset, row-major over the largest window (wd, wh, ww), to offsets.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void adaptive_max_pool3d_forward(const T* __restrict__ x, T* __restrict__ out,
                                            Off* __restrict__ offsets, Idx outer, int C, int D,
                                            int H, int W, int Do, int Ho, int Wo, int wh,
                                            int ww)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const int in[3] = {D, H, W}, outs[3] = {Do, Ho, Wo};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(out_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = adaptive_window<Idx>(in, outs, wh, ww, o, layout.pitch());
        FOR_OUTER(nc) {
            const T* xp = x + layout.offset(nc, in_plane) + lane;
            MaxOp<A> op = {to_acc(xp[w.first]), 0u};
            visit_taps(xp, w, op);
            const Idx at = layout.offset(nc, out_plane) + i;
            store(out + at, op.best);
            offsets[at] = (Off)op.arg;
        }
    }
}

// One thread per input element (n, c, d, h, w): visits the adaptive windows that cover it in
// ascending window order (row-major) and writes to dx the sum (in Acc<T>, 0 when none) of
// dout over those whose stored offset names it. No atomics, fixed order.
template <typename T, typename Off, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void adaptive_max_pool3d_backward(const T* __restrict__ dout,
                                             const Off* __restrict__ offsets,
                                             T* __restrict__ dx, Idx outer, int C, int D, int H,
                                             int W, int Do, int Ho, int Wo, int wh, int ww)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int x[3];
        decode3(p, H, W, x);
        const AdaptiveCover c[3] = {adaptive_cover(x[0], D, Do), adaptive_cover(x[1], H, Ho),
                                    adaptive_cover(x[2], W, Wo)};
        FOR_OUTER(nc) {
            const Idx base = layout.offset(nc, out_plane) + lane;
            MaxGradOp<T, Off, A> op = {dout + base, offsets + base, A(0)};
            visit_covers<Idx>(c, Ho, Wo, (unsigned)wh * (unsigned)ww, (unsigned)ww,
                              layout.pitch(), op);
            store(dx + layout.offset(nc, in_plane) + i, op.acc);
        }
    }
}

// One thread per output element (n, c, od, oh, ow): sums its adaptive window in row-major
// order (in Acc<T>, from +0) and writes the sum / the window's element count.
template <typename T, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void adaptive_avg_pool3d_forward(const T* __restrict__ x, T* __restrict__ out,
                                            Idx outer, int C, int D, int H, int W, int Do,
                                            int Ho, int Wo)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const AdaptiveDivisor divisor = {{D, H, W}, {Do, Ho, Wo}};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(out_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int o[3];
        decode3(p, Ho, Wo, o);
        const Window3<Idx> w = adaptive_window<Idx>(divisor.in, divisor.out, 1, 1, o,
                                                    layout.pitch());
        const A div = (A)divisor(o);
        FOR_OUTER(nc) {
            SumOp<A> op = {A(0)};
            visit_taps(x + layout.offset(nc, in_plane) + lane, w, op);
            store(out + layout.offset(nc, out_plane) + i, op.sum / div);
        }
    }
}

// One thread per input element (n, c, d, h, w): visits the adaptive windows that cover it in
// ascending window order (row-major) and writes to dx the sum (in Acc<T>, from +0) of
// dout / count over them. No atomics, fixed order.
template <typename T, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void adaptive_avg_pool3d_backward(const T* __restrict__ dout, T* __restrict__ dx,
                                             Idx outer, int C, int D, int H, int W, int Do,
                                             int Ho, int Wo)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    const AdaptiveDivisor divisor = {{D, H, W}, {Do, Ho, Wo}};
    const Idx in_plane = (Idx)D * H * W, out_plane = (Idx)Do * Ho * Wo;
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        int x[3];
        decode3(p, H, W, x);
        const AdaptiveCover c[3] = {adaptive_cover(x[0], D, Do), adaptive_cover(x[1], H, Ho),
                                    adaptive_cover(x[2], W, Wo)};
        FOR_OUTER(nc) {
            AvgGradOp<T, A, AdaptiveDivisor> op = {dout + layout.offset(nc, out_plane) + lane,
                                                   divisor, A(0)};
            visit_covers<Idx>(c, Ho, Wo, 1u, 1u, layout.pitch(), op);
            store(dx + layout.offset(nc, in_plane) + i, op.acc);
        }
    }
}

// ------------------------------------------------------------------ max unpooling

// atomicMax on an int or long long winner slot. The CPU shim has no atomicMax: there it is a
// max under the shim's atomic mutex (the shim may run a block's threads at once).
template <typename Idx>
__device__ __forceinline__ void atomic_max_index(Idx* slot, Idx value)
{
#ifdef GPULAYERS_CPU_SHIM
    std::lock_guard<std::mutex> lock(cuda_shim::atomic_mutex);
    if (value > *slot) *slot = value;
#else
    atomicMax(slot, value);
#endif
}

// One thread per input element (n, c, position): raises the winner slot of its target (the
// output element of its plane at position indices[e]) to e, the input's flat index in x's
// layout, with atomicMax: after the kernel each slot holds the last input of the plane in
// row-major order that targets it (in either layout the flat index grows with the position
// within a plane; order-independent, so deterministic), or stays -1 (the launcher's fill).
// An index outside [0, out_plane) targets nothing (CuPy callers do not check them: that
// would read the device on the host).
template <typename Ind, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void max_unpool_winners(const Ind* __restrict__ indices, Idx* __restrict__ winners,
                                   Idx outer, int C, Idx in_plane, Idx out_plane)
{
    const L<Idx> layout = {outer, C};
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        FOR_OUTER(nc) {
            const Idx e = layout.offset(nc, in_plane) + i;
            const long long ix = (long long)indices[e];
            if (ix >= 0 && ix < (long long)out_plane) {
                atomic_max_index(winners + layout.offset(nc, out_plane) + lane +
                                     (Idx)ix * layout.pitch(), e);
            }
        }
    }
}

// One thread per output element t: writes x[winners[t]], or 0 where no input targets t.
template <typename T, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void max_unpool_forward(const T* __restrict__ x, const Idx* __restrict__ winners,
                                   T* __restrict__ out, Idx outer, int C, Idx out_plane)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    FOR_ITEMS(i, layout.items(out_plane)) {
        FOR_OUTER(nc) {
            const Idx t = layout.offset(nc, out_plane) + i;
            const Idx w = winners[t];
            if (w >= 0) {
                out[t] = x[w];
            } else {
                store(out + t, A(0));
            }
        }
    }
}

// One thread per input element e: writes dout at its target to dx[e] if e won the target
// (winners from max_unpool_winners), else 0 (also for an index out of range). A gather: no
// atomics.
template <typename T, typename Ind, typename Idx, template <typename> class L = ChannelsFirst>
__global__ void max_unpool_backward(const T* __restrict__ dout, const Ind* __restrict__ indices,
                                    const Idx* __restrict__ winners, T* __restrict__ dx,
                                    Idx outer, int C, Idx in_plane, Idx out_plane)
{
    typedef typename Acc<T>::type A;
    const L<Idx> layout = {outer, C};
    FOR_ITEMS(i, layout.items(in_plane)) {
        Idx p, lane;
        layout.split(i, p, lane);
        FOR_OUTER(nc) {
            const Idx e = layout.offset(nc, in_plane) + i;
            const long long ix = (long long)indices[e];
            const bool in_range = ix >= 0 && ix < (long long)out_plane;
            const Idx t = layout.offset(nc, out_plane) + lane + (in_range ? (Idx)ix : 0) *
                                                                layout.pitch();
            if (in_range && winners[t] == e) {
                dx[e] = dout[t];
            } else {
                store(dx + e, A(0));
            }
        }
    }
}

#undef FOR_ITEMS
#undef FOR_OUTER
#undef POOL3_PARAMS
#undef POOL3_GEOMETRY
