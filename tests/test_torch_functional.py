"""gpulayers.torch against torch.nn.functional on the CPU: values, indices, gradients,
running stats, memory formats, unbatched inputs and keyword calls."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import gpulayers.torch as GF  # noqa: E402
from gpulayers.torch import _bridge  # noqa: E402

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _no_copies():
    """No result is ever copied by the bridge (strides, aliasing, read-only)."""
    before = dict(_bridge.COPIES)
    yield
    assert _bridge.COPIES == before


def _data(rng, shape, kind, dtype=torch.float32):
    x = rng.standard_normal(shape)
    if kind == "ties":
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "nan":
        x[rng.random(shape) < 0.15] = np.nan
        x[rng.random(shape) < 0.15] = -np.inf
    return torch.from_numpy(x).to(dtype)


def _torch_or_skip(fn, *args, **kwargs):
    """torch's result, or None when torch refuses the input (then it is not compared)."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError):
        return None


def _equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _layout(x, cl):
    return x.contiguous(memory_format=FORMATS[x.dim()]) if cl and x.dim() in FORMATS else x


@st.composite
def pool_case(draw, kind="max"):
    d = draw(st.integers(1, 3))
    k = [draw(st.integers(1, 3)) for _ in range(d)]
    s = [draw(st.integers(1, 3)) for _ in range(d)]
    dil = [draw(st.integers(1, 2)) for _ in range(d)] if kind == "max" else [1] * d
    p = [draw(st.integers(0, kk // 2)) for kk in k]
    size = [draw(st.integers(1, 7)) for _ in range(d)]
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return dict(d=d, k=k, s=s, p=p, dil=dil, size=size, N=N, C=C,
                ceil=draw(st.booleans()), cl=draw(st.booleans()),
                unbatched=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
                data=draw(st.sampled_from(["random", "ties", "nan"])),
                cip=draw(st.booleans()), div=draw(st.sampled_from([None, 1, 3])))


def _cl_case(c, x):
    """True when x (batched) is in the channels_last(_3d) memory format and not also
    contiguous (with planes of one element both hold, and torch keeps either format)."""
    return c["cl"] and not c["unbatched"] and x.dim() in FORMATS and not x.is_contiguous()


def _input(c, dtype=torch.float32):
    rng = np.random.default_rng(c["seed"])
    shape = (c["N"], c["C"], *c["size"])
    x = _layout(_data(rng, shape, c["data"], dtype), c["cl"])
    if c["unbatched"]:
        x = x[0]
    return x, rng


def _grads(fn_ours, fn_torch, x, rng, n_out=1):
    """Forward both, backward both with one random dout; returns (ours, theirs) grads."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ya, yb = fn_ours(xa), fn_torch(xb)
    ya, yb = (ya[0], yb[0]) if isinstance(ya, tuple) else (ya, yb)
    dout = torch.from_numpy(rng.integers(-3, 4, size=tuple(yb.shape)).astype(np.float64)).to(
        x.dtype)
    ya.backward(dout)
    yb.backward(dout)
    return ya, yb, xa.grad, xb.grad


@settings(max_examples=60, **SETTINGS)
@given(pool_case("max"))
def test_max_pool_matches_torch(c):
    x, rng = _input(c)
    d = c["d"]
    ours, theirs = getattr(GF, f"max_pool{d}d"), getattr(F, f"max_pool{d}d")
    kw = dict(kernel_size=c["k"], stride=c["s"], padding=c["p"], dilation=c["dil"],
              ceil_mode=c["ceil"], return_indices=True)
    # torch 2.13's channels_last_3d CPU kernel gives an all -inf window the index of its
    # first element with the depth dropped; its channels-first kernels (and gpulayers, in
    # every layout) give the first element's index: compare with those
    ref = _torch_or_skip(theirs, x.contiguous(), **kw)
    assume(ref is not None)
    try:
        out, idx = ours(x, **kw)
    except ValueError as exc:
        # torch pools a dilated window that holds only padding to -inf with an index
        # outside the input; gpulayers refuses such windows (gpulayers.shapes)
        assert "covers only padding" in str(exc)
        assume(False)
    _equal(out, ref[0])
    _equal(idx, ref[1])
    if _cl_case(c, x):
        assert out.is_contiguous(memory_format=FORMATS[x.dim()])
        assert idx.is_contiguous(memory_format=FORMATS[x.dim()])
    if c["data"] != "nan":
        ya, yb, ga, gb = _grads(lambda t: ours(t, **kw), lambda t: theirs(t, **kw), x, rng)
        _equal(ga, gb)
        if _cl_case(c, x):
            assert ga.is_contiguous(memory_format=FORMATS[x.dim()])


@settings(max_examples=50, **SETTINGS)
@given(pool_case("avg"))
def test_avg_pool_matches_torch(c):
    x, rng = _input(c, torch.float64)
    d = c["d"]
    ours, theirs = getattr(GF, f"avg_pool{d}d"), getattr(F, f"avg_pool{d}d")
    kw = dict(kernel_size=c["k"], stride=c["s"], padding=c["p"], ceil_mode=c["ceil"],
              count_include_pad=c["cip"])
    if d > 1:
        kw["divisor_override"] = c["div"]
    ref = _torch_or_skip(theirs, x, **kw)
    assume(ref is not None)
    ya, yb, ga, gb = _grads(lambda t: ours(t, **kw), lambda t: theirs(t, **kw), x, rng)
    torch.testing.assert_close(ya, yb, equal_nan=True)
    if c["data"] != "nan":
        torch.testing.assert_close(ga, gb)
    if _cl_case(c, x):
        assert ya.is_contiguous(memory_format=FORMATS[x.dim()])
        assert ga.is_contiguous(memory_format=FORMATS[x.dim()])


@settings(max_examples=50, **SETTINGS)
@given(pool_case("avg"), st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=3,
                                  max_size=3))
def test_adaptive_pools_match_torch(c, sizes):
    x, rng = _input(c, torch.float64)
    d = c["d"]
    out_size = tuple(sizes[:d]) if d > 1 else (sizes[0] or 2)
    for kind in ("avg", "max"):
        ours = getattr(GF, f"adaptive_{kind}_pool{d}d")
        theirs = getattr(F, f"adaptive_{kind}_pool{d}d")
        ref = _torch_or_skip(theirs, x, out_size)
        assume(ref is not None)
        if kind == "max":
            out, idx = ours(x, output_size=out_size, return_indices=True)
            ref, ref_idx = theirs(x, out_size, return_indices=True)
            _equal(out, ref)
            _equal(idx, ref_idx)
        if c["data"] == "nan" and kind == "max":
            continue
        ya, yb, ga, gb = _grads(lambda t: ours(t, out_size), lambda t: theirs(t, out_size), x,
                                rng)
        torch.testing.assert_close(ya, yb, equal_nan=True)
        if c["data"] != "nan":
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        if _cl_case(c, x):
            assert ya.is_contiguous(memory_format=FORMATS[x.dim()])
            assert ga.is_contiguous(memory_format=FORMATS[x.dim()])


@settings(max_examples=40, **SETTINGS)
@given(pool_case("max"), st.booleans())
def test_max_unpool_matches_torch(c, explicit_size):
    c = dict(c, dil=[1] * c["d"], data="random")
    x, rng = _input(c, torch.float64)
    d = c["d"]
    kw = dict(kernel_size=c["k"], stride=c["s"], padding=c["p"])
    pooled = _torch_or_skip(getattr(F, f"max_pool{d}d"), x, return_indices=True, **kw)
    assume(pooled is not None)
    y, idx = pooled
    size = None
    if explicit_size:
        size = list(x.shape[-d:])
    ref = _torch_or_skip(getattr(F, f"max_unpool{d}d"), y, idx, output_size=size, **kw)
    assume(ref is not None)
    ours = getattr(GF, f"max_unpool{d}d")
    with torch.autograd.set_grad_enabled(True):
        ya, yb = y.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        oa = ours(ya, idx, output_size=size, **kw)
        ob = getattr(F, f"max_unpool{d}d")(yb, idx, output_size=size, **kw)
        _equal(oa, ob)
        assume(ob.numel() > 0)   # torch's backward fails on an empty output plane
        dout = torch.from_numpy(rng.standard_normal(tuple(ob.shape)))
        oa.backward(dout)
        ob.backward(dout)
    _equal(ya.grad, yb.grad)
    if _cl_case(c, x):
        assert oa.is_contiguous(memory_format=FORMATS[x.dim()])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_unpool_duplicates_value_last_gradient_gather(d):
    """Duplicate indices: the last input in row-major order wins the value (torch's CPU
    single-threaded winner); every duplicate gets its target's gradient (torch's gather)."""
    shape = (2, 3) + (4,) * d
    P = 5 ** d
    g = torch.Generator().manual_seed(d)
    idx = torch.randint(0, 3, shape, generator=g)   # many duplicates among P positions
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    size = [5] * d
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa = getattr(GF, f"max_unpool{d}d")(xa, idx, kernel_size=2, stride=1, output_size=size)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ob = getattr(F, f"max_unpool{d}d")(xb, idx, kernel_size=2, stride=1, output_size=size)
    finally:
        torch.set_num_threads(prev)
    _equal(oa, ob)
    dout = torch.randn(ob.shape, dtype=torch.float64, generator=g)
    oa.backward(dout)
    ob.backward(dout)
    _equal(xa.grad, xb.grad)
    expect = dout.reshape(2, 3, P).gather(2, idx.reshape(2, 3, -1)).reshape(shape)
    _equal(xa.grad, expect)


# ------------------------------------------------------------------------- batch norm

@settings(max_examples=40, **SETTINGS)
@given(st.integers(0, 3), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(),
       st.booleans(), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**32 - 1))
def test_batch_norm_matches_torch(d, N, C, training, affine, cl, dtype, seed):
    rng = np.random.default_rng(seed)
    size = [int(v) for v in rng.integers(1, 5, size=d)]
    shape = (N, C, *size)
    assume(not training or N * int(np.prod(size)) > 1)
    x = _layout(torch.from_numpy(rng.standard_normal(shape) * 3 + 2).to(dtype), cl)
    w = torch.from_numpy(rng.standard_normal(C)).to(dtype) if affine else None
    b = torch.from_numpy(rng.standard_normal(C)).to(dtype) if affine else None
    rm0 = torch.from_numpy(rng.standard_normal(C)).to(dtype)
    rv0 = torch.from_numpy(rng.uniform(0.5, 2, C)).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    dout = _layout(torch.from_numpy(rng.standard_normal(shape)).to(dtype), cl)
    res = []
    for fn in (GF.batch_norm, F.batch_norm):
        xx = x.detach().clone().requires_grad_()
        ww = None if w is None else w.clone().requires_grad_()
        bb = None if b is None else b.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = fn(input=xx, running_mean=rm, running_var=rv, weight=ww, bias=bb,
               training=training, momentum=0.3, eps=1e-3)
        y.backward(dout)
        res.append((y, xx.grad, ww, bb, rm, rv))
    (ya, ga, wa, ba, rma, rva), (yb, gb, wb, bb_, rmb, rvb) = res
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(ga, gb, **tol)
    torch.testing.assert_close(rma, rmb, **tol)
    torch.testing.assert_close(rva, rvb, **tol)
    if affine:
        torch.testing.assert_close(wa.grad, wb.grad, **tol)
        torch.testing.assert_close(ba.grad, bb_.grad, **tol)
    if cl and x.dim() in FORMATS:
        assert ya.is_contiguous(memory_format=FORMATS[x.dim()])
        assert ga.is_contiguous(memory_format=FORMATS[x.dim()])


def test_batch_norm_running_stats_in_place_and_defaults():
    x = torch.randn(8, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    ptr = (rm.data_ptr(), rv.data_ptr())
    GF.batch_norm(x, rm, rv, training=True)
    assert (rm.data_ptr(), rv.data_ptr()) == ptr
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm2, rv2, training=True)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    # eval (the default) uses the running stats and leaves them alone
    torch.testing.assert_close(GF.batch_norm(x, rm, rv), F.batch_norm(x, rm2, rv2))
    torch.testing.assert_close(rm, rm2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GF.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="evaluation mode"):
        GF.batch_norm(x, None, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    x = torch.randn(2, 3, 9, 9).to(dtype)
    for name, args in (("max_pool2d", (3, 2, 1)), ("avg_pool2d", (3, 2, 1)),
                       ("adaptive_avg_pool2d", ((4, 3),)), ("adaptive_max_pool2d", (2,))):
        ours, theirs = getattr(GF, name)(x, *args), getattr(F, name)(x, *args)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = GF.batch_norm(x, rm, rv, training=True)
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(y.float(), F.batch_norm(x, rm2, rv2, training=True).float(),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(rm, rm2, rtol=1e-2, atol=1e-2)


def test_positional_and_keyword_calls_and_unbatched():
    x = torch.randn(3, 10, 10)     # unbatched (C, H, W)
    _equal(GF.max_pool2d(x, 2), F.max_pool2d(x, 2))
    _equal(GF.max_pool2d(input=x, kernel_size=(3, 2), stride=[2, 1], padding=1, dilation=1,
                         ceil_mode=True), F.max_pool2d(x, (3, 2), [2, 1], 1, 1, True))
    a, ia = GF.max_pool2d(x, 2, None, 0, 1, False, True)
    b, ib = F.max_pool2d(x, 2, None, 0, 1, False, True)
    _equal(a, b)
    _equal(ia, ib)
    _equal(GF.max_unpool2d(a, ia, 2), F.max_unpool2d(b, ib, 2))
    torch.testing.assert_close(GF.avg_pool1d(x, 3, 2, 1, True, False),
                               F.avg_pool1d(x, 3, 2, 1, True, False))
    torch.testing.assert_close(GF.avg_pool3d(x[None], 2, divisor_override=2),
                               F.avg_pool3d(x[None], 2, divisor_override=2))
    torch.testing.assert_close(GF.adaptive_avg_pool2d(x, (None, 3)),
                               F.adaptive_avg_pool2d(x, (None, 3)))
    _equal(GF.adaptive_max_pool1d(input=x, output_size=4),
           F.adaptive_max_pool1d(x, output_size=4))
    with pytest.raises(TypeError):
        GF.avg_pool1d(x, 2, divisor_override=2)   # as torch: avg_pool1d has no divisor
    with pytest.raises(ValueError, match="2-D"):
        GF.max_pool1d(torch.randn(2, 3, 4, 5), 2)
