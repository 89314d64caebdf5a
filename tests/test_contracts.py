"""The public contracts a CS231n or PyTorch user relies on: argument checks and their
messages, result dtypes, layout independence, signed zeros, and the CS231n notebook
code that must run verbatim."""
import subprocess
import sys
import types

import numpy as np
import pytest

import gpulayers as G
from gpulayers import backend, layers
from gpulayers.gradcheck import (eval_numerical_gradient, eval_numerical_gradient_array,
                                 rel_error)

POOL = dict(pool_height=2, pool_width=2, stride=2)


# ----------------------------------------------------------------- CS231n compatibility

def test_import_exposes_layers_and_gradcheck_without_optional_modules():
    code = ("import sys, gpulayers\n"
            "assert gpulayers.layers.MaxPool2d and gpulayers.gradcheck.rel_error\n"
            "import gpulayers.distributed\n"
            "bad = [m for m in ('cupy', 'mpi4py', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _cs231n_spatial_bn_cell(rng):
    """CS231n's spatial-BN gradient cell: the closures ignore their argument."""
    N, C, H, W = 2, 3, 4, 5
    x = 5 * rng.standard_normal((N, C, H, W)) + 12
    gamma = rng.standard_normal(C)
    beta = rng.standard_normal(C)
    dout = rng.standard_normal((N, C, H, W))
    bn_param = {'mode': 'train'}
    fx = lambda x: G.spatial_batchnorm_forward(x, gamma, beta, bn_param)[0]  # noqa: E731
    fg = lambda a: G.spatial_batchnorm_forward(x, gamma, beta, bn_param)[0]  # noqa: E731
    fb = lambda b: G.spatial_batchnorm_forward(x, gamma, beta, bn_param)[0]  # noqa: E731
    x0, g0, b0 = x.copy(), gamma.copy(), beta.copy()
    dx_num = eval_numerical_gradient_array(fx, x, dout)
    da_num = eval_numerical_gradient_array(fg, gamma, dout)
    db_num = eval_numerical_gradient_array(fb, beta, dout)
    _, cache = G.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = G.spatial_batchnorm_backward(dout, cache)
    for a, a0 in ((x, x0), (gamma, g0), (beta, b0)):  # restored exactly
        assert a.tobytes() == a0.tobytes()
    return rel_error(dx_num, dx), rel_error(da_num, dgamma), rel_error(db_num, dbeta)


def test_cs231n_gradient_cell_with_closures_that_ignore_their_argument(rng):
    dx_err, dgamma_err, dbeta_err = _cs231n_spatial_bn_cell(rng)
    assert dx_err < 1e-5 and dgamma_err < 1e-7 and dbeta_err < 1e-7, (dx_err, dgamma_err,
                                                                       dbeta_err)


def test_eval_numerical_gradient_scalar(rng, capsys):
    x = rng.standard_normal((3, 2))
    x0 = x.copy()
    grad = eval_numerical_gradient(lambda a: float(np.sum(x ** 3)), x, verbose=True)
    np.testing.assert_allclose(grad, 3 * x0 ** 2, rtol=1e-6)
    assert x.tobytes() == x0.tobytes()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and printed[0].startswith("(0, 0)")
    eval_numerical_gradient(lambda a: float(np.sum(a)), x, verbose=False)
    assert capsys.readouterr().out == ""


def test_numeric_gradient_restores_x_when_f_raises(rng):
    x = rng.standard_normal(4)
    x0 = x.copy()

    def f(a):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        eval_numerical_gradient_array(f, x, np.ones(4))
    assert x.tobytes() == x0.tobytes()


def test_numeric_gradient_refuses_read_only_and_integer_points():
    x = np.ones(3)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        eval_numerical_gradient_array(lambda a: a, x, np.ones(3))
    with pytest.raises(TypeError, match="floating"):
        eval_numerical_gradient(lambda a: 0.0, np.arange(3))


@pytest.mark.parametrize("fwd,shape", [(G.batchnorm_forward, (8, 3)),
                                       (G.spatial_batchnorm_forward, (4, 3, 2, 2)),
                                       (G.spatial_batchnorm_forward_general, (4, 3, 2, 2))])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_integer_gamma_beta_as_in_the_notebook(rng, fwd, shape, dtype):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma, beta = np.asarray([3, 4, 5]), np.asarray([6, 7, 8])
    out, cache = fwd(x, gamma, beta, {'mode': 'train'})
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    tol = 2e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(out.astype(np.float64).mean(axis=axes), beta, atol=tol * 8)
    np.testing.assert_allclose(out.astype(np.float64).std(axis=axes), gamma, rtol=tol)
    back = G.batchnorm_backward if len(shape) == 2 else G.spatial_batchnorm_backward
    dx, dgamma, dbeta = back(np.ones_like(out), cache)
    param = np.float32 if dtype == np.float16 else dtype
    assert dx.dtype == dtype and dgamma.dtype == param and dbeta.dtype == param


def test_integer_x_is_still_refused():
    with pytest.raises(TypeError, match="floating"):
        G.batchnorm_forward(np.ones((3, 2), np.int32), np.ones(2), np.zeros(2), {'mode': 'train'})
    with pytest.raises(TypeError, match="gamma"):
        G.batchnorm_forward(np.ones((3, 2)), np.ones(2, bool), np.zeros(2), {'mode': 'train'})


# ------------------------------------------------------------------------ layer classes

def test_batchnorm_layers_follow_torch_defaults(rng):
    x = rng.standard_normal((6, 3, 4, 4)) * 2 + 5
    fresh = layers.BatchNorm2d(3, dtype=np.float64).eval()
    np.testing.assert_allclose(fresh.forward(x), x / np.sqrt(1 + 1e-5), rtol=1e-12)
    bn = layers.BatchNorm2d(3, dtype=np.float64)
    bn.forward(x)
    mean = x.mean(axis=(0, 2, 3))
    unbiased = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-12)
    one = layers.BatchNorm1d(3, dtype=np.float64)
    one.forward(x[:, :, 0, 0])
    np.testing.assert_allclose(one.buffers["running_var"],
                               0.9 + 0.1 * x[:, :, 0, 0].var(axis=0, ddof=1), rtol=1e-12)
    cs = layers.BatchNorm2d(3, convention="cs231n", dtype=np.float64)
    cs.forward(x)
    np.testing.assert_allclose(cs.buffers["running_mean"], 0.1 * mean, rtol=1e-12)  # 0.9*0 + 0.1*m
    assert cs.buffers["running_var"][0] != bn.buffers["running_var"][0]


def test_batchnorm_affine_false_has_no_parameters(rng):
    x = rng.standard_normal((8, 3, 2, 2))
    bn = layers.BatchNorm2d(3, affine=False, dtype=np.float64)
    assert bn.params == {}
    out = bn.forward(x)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    bn.backward(rng.standard_normal(x.shape))
    assert bn.grads == {} and bn.params == {}
    assert set(bn.state_dict()) == {"running_mean", "running_var"}


@pytest.mark.parametrize("make", [
    lambda: layers.MaxPool2d(np.int64(2)),
    lambda: layers.MaxPool2d((np.int32(2), np.int64(2)), stride=np.int64(2)),
    lambda: layers.AvgPool2d(np.int64(2), padding=np.int64(1)),
    lambda: layers.BatchNorm2d(np.int64(4)),
])
def test_layer_sizes_as_numpy_integers(rng, make):
    layer = make()
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    out = layer.forward(x)
    assert layer.backward(np.ones_like(out)).shape == x.shape


def test_layer_kernel_size_errors_name_the_value():
    with pytest.raises(ValueError, match="kernel_size"):
        layers.MaxPool2d("2")
    with pytest.raises(ValueError, match="kernel_size"):
        layers.MaxPool2d(True)


# ------------------------------------------------------------------- bn_param checks

def _bn(bp, x=None, C=3):
    x = np.random.default_rng(0).standard_normal((4, C, 2, 2)) if x is None else x
    return G.spatial_batchnorm_forward(x, np.ones(C), np.zeros(C), bp)


@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan"), float("inf"), True, "1e-5", None])
def test_eps_must_be_finite_and_positive(eps):
    with pytest.raises(ValueError, match="eps"):
        _bn({"mode": "train", "eps": eps})


@pytest.mark.parametrize("momentum", [True, False, 1.5, -0.1, float("nan"), "0.1", None])
def test_momentum_must_be_a_real_in_unit_interval(momentum):
    with pytest.raises(ValueError, match="momentum"):
        _bn({"mode": "train", "momentum": momentum})


def test_eps_and_momentum_accept_numpy_and_int_values():
    _bn({"mode": "train", "eps": np.float32(1e-3), "momentum": np.float64(0.5)})
    _bn({"mode": "train", "eps": 1, "momentum": 1})


RS_BAD = [
    (dict(running_mean=np.zeros(3, np.int64)), TypeError, "floating"),
    (dict(running_var=[1.0, 1.0, 1.0]), TypeError, "list"),
    (dict(running_mean=(0.0, 0.0, 0.0)), TypeError, "tuple"),
    (dict(running_mean=np.zeros(4)), ValueError, r"shape \(3,\)"),
    (dict(running_mean=np.array([0.0, np.nan, 0.0])), ValueError, "finite"),
    (dict(running_var=np.array([1.0, np.inf, 1.0])), ValueError, "finite"),
    (dict(running_var=np.array([1.0, -1e-3, 1.0])), ValueError, ">= 0"),
]


@pytest.mark.parametrize("change,exc,match", RS_BAD)
def test_test_mode_running_statistics_are_checked(change, exc, match):
    bp = {"mode": "test", "running_mean": np.zeros(3), "running_var": np.ones(3)}
    bp.update(change)
    with pytest.raises(exc, match=match):
        _bn(bp)


@pytest.mark.parametrize("change,match", [
    (dict(running_mean=np.array([0.0, np.nan, 0.0])), "finite"),
    (dict(running_var=np.array([1.0, np.inf, 1.0])), "finite"),
    (dict(running_var=np.array([1.0, -1e-3, 1.0])), ">= 0")])
def test_test_mode_running_values_are_checked_after_a_cached_call(change, match):
    # the same kinds of inputs passed before (their checks are cached): the values of the
    # running statistics are still checked on every NumPy call
    bp = {"mode": "test", "running_mean": np.zeros(3), "running_var": np.ones(3)}
    _bn(dict(bp))
    _bn(dict(bp))
    bp.update(change)
    with pytest.raises(ValueError, match=match):
        _bn(bp)


def test_list_running_mean_names_its_type_in_train_mode():
    with pytest.raises(TypeError, match="got list"):
        _bn({"mode": "train", "running_mean": [0.0, 0.0, 0.0]})


@pytest.mark.parametrize("comm", [object(), types.SimpleNamespace(allreduce_sum=lambda b: b, size=1),
                                  types.SimpleNamespace(allreduce_sum=None, size=1, rank=0), 3])
def test_comm_without_the_interface_is_a_type_error(comm):
    with pytest.raises(TypeError, match="comm"):
        _bn({"mode": "train", "comm": comm})


def test_wrong_cache_kind_names_the_expected_cache(rng):
    _, cache = G.batchnorm_forward(rng.standard_normal((2, 48)), np.ones(48), np.zeros(48),
                                   {"mode": "train"})
    with pytest.raises(TypeError, match="spatial_batchnorm_forward.*batchnorm_forward"):
        G.spatial_batchnorm_backward(rng.standard_normal((2, 48)), cache)
    _, cache4 = _bn({"mode": "train"})
    with pytest.raises(TypeError, match="cache of batchnorm_forward, got the cache of "
                                        "spatial_batchnorm_forward"):
        G.batchnorm_backward(np.ones((4, 3, 2, 2)), cache4)
    _, pool_cache = G.max_pool_forward(np.ones((1, 1, 2, 2)), POOL)
    with pytest.raises(TypeError, match="BatchNormCache"):
        G.spatial_batchnorm_backward(np.ones((1, 1, 1, 1)), pool_cache)
    with pytest.raises(TypeError, match="AvgPoolCache"):
        G.avg_pool_backward(np.ones((1, 1, 1, 1)), pool_cache)


# ------------------------------------------------------------------- pooling checks

def test_key_of_another_op_is_refused_with_the_ops_keys():
    x = np.ones((1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"count_include_pad.*another pooling op.*max pooling "
                                         r"takes \[.*'dilation'"):
        G.max_pool_forward(x, dict(POOL, count_include_pad=False))
    with pytest.raises(ValueError, match=r"dilation.*average pooling takes \[.*"
                                         r"'count_include_pad'"):
        G.avg_pool_forward(x, dict(POOL, dilation=1))
    with pytest.raises(ValueError, match=r"\['padding'\].*takes"):
        G.max_pool_forward(x, dict(POOL, padding=1))


@pytest.mark.parametrize("size", ["44", (4.5, 4.5), (True, 4), (4, 4.0), 44, None, b"44",
                                  (2, 3, "4", 4)])
def test_unpool_output_size_takes_integers_only(size):
    x = np.ones((2, 3, 2, 2))
    idx = np.zeros((2, 3, 2, 2), np.int64)
    with pytest.raises(TypeError, match="output_size"):
        G.max_unpool_forward(x, idx, size)


def test_unpool_output_size_accepts_numpy_integers():
    x = np.ones((1, 1, 2, 2))
    out, _ = G.max_unpool_forward(x, np.arange(4).reshape(1, 1, 2, 2), (np.int64(4), np.int32(4)))
    assert out.shape == (1, 1, 4, 4)


def _caches():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4))
    out = {}
    for name, fwd in (("max", G.max_pool_forward), ("naive", G.max_pool_forward_naive),
                      ("reshape", G.max_pool_forward_reshape),
                      ("general", G.max_pool_forward_general), ("avg", G.avg_pool_forward)):
        out[name] = fwd(x, POOL)[1]
    p, c = G.max_pool_forward(x, POOL)
    out["unpool"] = G.max_unpool_forward(p, G.max_pool_indices(c), (4, 4))[1]
    out["bn"] = G.batchnorm_forward(x[:, :, 0, 0], np.ones(3), np.zeros(3), {"mode": "train"})[1]
    out["sbn"] = G.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})[1]
    out["sbn_general"] = G.spatial_batchnorm_forward_general(x, np.ones(3), np.zeros(3),
                                                             {"mode": "train"})[1]
    return out


BACKWARDS = [("max", G.max_pool_backward), ("naive", G.max_pool_backward_naive),
             ("reshape", G.max_pool_backward_reshape), ("general", G.max_pool_backward_general),
             ("max", G.max_pool_backward_fast), ("avg", G.avg_pool_backward),
             ("unpool", G.max_unpool_backward), ("bn", G.batchnorm_backward),
             ("sbn", G.spatial_batchnorm_backward),
             ("sbn_general", G.spatial_batchnorm_backward_general)]


@pytest.mark.parametrize("cache_name,backward", BACKWARDS,
                         ids=[f"{b.__name__}" for _, b in BACKWARDS])
@pytest.mark.parametrize("dout", [None, [[1.0]], 1.0])
def test_dout_that_is_not_an_array_is_a_type_error(cache_name, backward, dout):
    with pytest.raises(TypeError, match="dout must be a NumPy or CuPy array"):
        backward(dout, _caches()[cache_name])


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("cache_name,backward", BACKWARDS,
                         ids=[f"{b.__name__}" for _, b in BACKWARDS])
@pytest.mark.parametrize("x_dtype,dout_dtype", [(np.float32, np.float64),
                                                (np.float64, np.float32),
                                                (np.float16, np.float32),
                                                (np.float32, np.float16)])
def test_backward_dtypes_follow_the_forward_input(cache_name, backward, x_dtype, dout_dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4)).astype(x_dtype)
    gamma = rng.standard_normal(3)  # float64, whatever x is
    beta = rng.standard_normal(3).astype(np.float32)
    if cache_name in ("bn", "sbn", "sbn_general"):
        xin = x[:, :, 0, 0] if cache_name == "bn" else x
        fwd = {"bn": G.batchnorm_forward, "sbn": G.spatial_batchnorm_forward,
               "sbn_general": G.spatial_batchnorm_forward_general}[cache_name]
        out, cache = fwd(xin, gamma, beta, {"mode": "train"})
        dx, dgamma, dbeta = backward(rng.standard_normal(out.shape).astype(dout_dtype), cache)
        assert (dx.dtype, dgamma.dtype, dbeta.dtype) == (x_dtype, np.float64, np.float32)
        return
    if cache_name == "unpool":
        p, c = G.max_pool_forward(x, POOL)
        out, cache = G.max_unpool_forward(p, G.max_pool_indices(c), (4, 4))
    else:
        fwd = {"max": G.max_pool_forward, "naive": G.max_pool_forward_naive,
               "reshape": G.max_pool_forward_reshape, "general": G.max_pool_forward_general,
               "avg": G.avg_pool_forward}[cache_name]
        out, cache = fwd(x, POOL)
    dout = rng.standard_normal(out.shape).astype(dout_dtype)
    dx = backward(dout, cache)
    assert dx.dtype == (p.dtype if cache_name == "unpool" else x_dtype)
    # the same numbers as a dout already in x's dtype
    same = backward(dout.astype(out.dtype), cache)
    assert dx.tobytes() == same.tobytes()


# -------------------------------------------------------------------------- layouts

def _layouts(a):
    """Non-contiguous views of a with the same values: Fortran order, a transposed
    copy transposed back, a reversed copy reversed back, a strided slice."""
    yield "fortran", np.asfortranarray(a)
    t = np.ascontiguousarray(np.moveaxis(a, 0, -1))
    yield "transposed", np.moveaxis(t, -1, 0)
    yield "reversed", np.ascontiguousarray(a[::-1])[::-1]
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    yield "strided", wide[..., ::2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["plain", "spatial", "spatial_general"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchnorm_results_do_not_depend_on_layout(rng, dtype, which, mode):
    shape = (64, 5) if which == "plain" else (6, 5, 7, 9)
    fwd, bwd = {"plain": (G.batchnorm_forward, G.batchnorm_backward),
                "spatial": (G.spatial_batchnorm_forward, G.spatial_batchnorm_backward),
                "spatial_general": (G.spatial_batchnorm_forward_general,
                                    G.spatial_batchnorm_backward_general)}[which]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)

    def run(xv, dv):
        bp = {"mode": mode, "running_mean": np.full(5, 0.5, dtype),
              "running_var": np.full(5, 2.0, dtype)}
        out, cache = fwd(xv, gamma, beta, bp)
        grads = bwd(dv, cache)
        return [np.ascontiguousarray(a).tobytes() for a in (out, *grads, bp["running_mean"],
                                                              bp["running_var"])]
    ref = run(x, dout)
    for (name, xv), (_, dv) in zip(_layouts(x), _layouts(dout)):
        assert not xv.flags.c_contiguous, name
        assert run(xv, dv) == ref, name


@pytest.mark.parametrize("fwd,bwd", [(G.max_pool_forward, G.max_pool_backward),
                                     (G.max_pool_forward_general, G.max_pool_backward_general),
                                     (G.avg_pool_forward, G.avg_pool_backward)])
def test_pooling_results_do_not_depend_on_layout(rng, fwd, bwd):
    x = rng.standard_normal((4, 3, 9, 8))
    param = dict(pool_height=3, pool_width=3, stride=2, pad=1)
    out, cache = fwd(x, param)
    dout = rng.standard_normal(out.shape)
    dx = bwd(dout, cache)
    for (name, xv), (_, dv) in zip(_layouts(x), _layouts(dout)):
        o, c = fwd(xv, param)
        assert np.ascontiguousarray(o).tobytes() == out.tobytes(), name
        assert np.ascontiguousarray(bwd(dv, c)).tobytes() == dx.tobytes(), name


# ------------------------------------------------------------------------ signed zero

MAX_FORWARDS = [G.max_pool_forward, G.max_pool_forward_naive, G.max_pool_forward_general,
                G.max_pool_forward_reshape, G.max_pool_forward_fast]


@pytest.mark.parametrize("fwd", MAX_FORWARDS, ids=[f.__name__ for f in MAX_FORWARDS])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (16, 32, 24, 24)])
def test_max_pool_output_is_the_argmax_element_bitwise(rng, fwd, dtype, shape):
    """Zeros of both signs (and negatives) so that many windows' maximum is a zero: the
    output carries the sign of the element at the reported argmax, the first maximum."""
    x = rng.choice(np.array([-0.0, 0.0, -1.0, -2.0]), size=shape).astype(dtype)
    out, cache = fwd(x, POOL)
    idx = G.max_pool_indices(cache)
    N, C, H, W = shape
    at = np.take_along_axis(x.reshape(N, C, H * W), idx.reshape(N, C, -1), axis=2)
    assert out.tobytes() == at.reshape(out.shape).tobytes()
    assert np.signbit(out).any() and (~np.signbit(out) & (out == 0)).any()
    # first maximum in window order: -0.0 == +0.0, so the earlier of the two wins
    windows = x.reshape(N, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(N, C, H // 2, W // 2, 4)
    first = np.argmax(windows == windows.max(axis=-1, keepdims=True), axis=-1)
    np.testing.assert_array_equal(cache.offsets if fwd is not G.max_pool_forward_naive
                                  else cache.offsets, first)


# --------------------------------------------------------------------------- devices

class _FakeDevice:
    def __init__(self, i):
        self.id = i
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        return False


class _FakeCupyArray:
    def __init__(self, shape, device):
        self.shape, self.device = shape, _FakeDevice(device)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = types.SimpleNamespace(ndarray=_FakeCupyArray, cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0)))
    monkeypatch.setattr(backend, "_cupy_ndarray", lambda: _FakeCupyArray)
    monkeypatch.setattr(backend, "_cupy", lambda: fake)
    return fake


def test_arrays_on_different_devices_are_refused(fake_cupy):
    a, b = _FakeCupyArray((2, 3), 0), _FakeCupyArray((3,), 1)
    assert backend.get_array_module(a, _FakeCupyArray((4,), 0)) is fake_cupy
    with pytest.raises(ValueError, match=r"shape \(2, 3\) on device 0.*shape \(3,\) on device 1"):
        backend.get_array_module(a, None, b)


def test_device_scope_follows_the_array(fake_cupy):
    on1 = _FakeCupyArray((2,), 1)
    with backend.device_scope(on1):
        pass
    assert on1.device.entered == 1
    on0 = _FakeCupyArray((2,), 0)
    with backend.device_scope(on0):  # already current: no switch
        pass
    assert on0.device.entered == 0
    with backend.device_scope(np.ones(2)):
        pass


def test_layer_functions_check_devices_before_work(fake_cupy):
    x, gamma = _FakeCupyArray((2, 3), 0), _FakeCupyArray((3,), 1)
    x.dtype = gamma.dtype = np.dtype(np.float32)
    x.ndim, gamma.ndim = 2, 1
    beta = _FakeCupyArray((3,), 0)
    beta.dtype, beta.ndim = np.dtype(np.float32), 1
    with pytest.raises(ValueError, match="different CUDA devices"):
        G.batchnorm_forward(x, gamma, beta, {"mode": "train"})


# ---------------------------------------------------- what the kernels cannot take

def test_pool_kernel_fallback_reason():
    from gpulayers.pooling import kernel_fallback_reason
    from gpulayers.shapes import PoolGeometry, pool_geometry
    assert kernel_fallback_reason(pool_geometry((2, 3, 8, 8), POOL)) is None
    # built directly: checking such a geometry would allocate per-window tables
    huge = PoolGeometry.from_2d(1, 1, 2, 2**31, 2, 2, 2, 2, 0, 0, 1, 1, False, 1, 2**30)
    assert "2**31" in kernel_fallback_reason(huge)


def test_bn_kernel_fallback_reason():
    from gpulayers.batchnorm import kernel_fallback_reason
    assert kernel_fallback_reason((8, 64, 4, 4)) is None
    assert kernel_fallback_reason((8, 64)) is None
    assert kernel_fallback_reason((0, 3, 4, 4)) is not None   # empty batch (test mode)
    assert kernel_fallback_reason((0, 70000)) is not None


def test_test_mode_on_an_empty_batch_runs(xp):
    x = xp.zeros((0, 3, 4, 4), dtype=np.float32)
    bp = {"mode": "test", "running_mean": xp.zeros(3, np.float32),
          "running_var": xp.ones(3, np.float32)}
    for fwd, bwd, xin in ((G.spatial_batchnorm_forward, G.spatial_batchnorm_backward, x),
                          (G.batchnorm_forward, G.batchnorm_backward, x[:, :, 0, 0])):
        out, cache = fwd(xin, xp.ones(3, np.float32), xp.zeros(3, np.float32), dict(bp))
        assert out.shape == xin.shape
        dx, dgamma, dbeta = bwd(xp.zeros_like(out), cache)
        assert dx.shape == xin.shape
        np.testing.assert_array_equal(G.to_numpy(dgamma), 0)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_more_than_65535_features(xp, rng, mode):
    D = 70000
    x = rng.standard_normal((4, D)).astype(np.float32)
    bp = {"mode": mode, "running_mean": np.zeros(D, np.float32),
          "running_var": np.ones(D, np.float32)}
    ref, _ = G.batchnorm_forward(x, np.ones(D, np.float32), np.zeros(D, np.float32), dict(bp))
    bpx = {k: xp.asarray(v) if hasattr(v, "shape") else v for k, v in bp.items()}
    out, cache = G.batchnorm_forward(xp.asarray(x), xp.ones(D, np.float32),
                                     xp.zeros(D, np.float32), bpx)
    np.testing.assert_allclose(G.to_numpy(out), ref, rtol=1e-5, atol=1e-5)
    dx, _, _ = G.batchnorm_backward(xp.ones_like(out), cache)
    assert dx.shape == x.shape
