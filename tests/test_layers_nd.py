"""Layer classes of every rank against the functions they wrap, and PyTorch's names,
arguments, argument order and defaults."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import layers

SHAPES = {1: (2, 3, 11), 2: (2, 3, 9, 8), 3: (2, 3, 7, 6, 5)}


def _x(rng, d):
    return rng.permutation(np.linspace(-1, 1, int(np.prod(SHAPES[d])))).reshape(SHAPES[d])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_pool_layers(rng, d):
    x = _x(rng, d)
    cls = getattr(layers, f"MaxPool{d}d")
    # PyTorch's order: kernel_size, stride, padding, dilation, return_indices, ceil_mode
    pool = cls(3, 2, 1, 1, True, True)
    out = pool(x)
    ref, cache = G.max_pool_forward(x, dict(kernel_size=3, stride=2, pad=1, ceil_mode=True))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(pool.indices, G.max_pool_indices(cache))
    dout = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(dout), G.max_pool_backward(dout, cache))
    unpool = getattr(layers, f"MaxUnpool{d}d")(3, 2, 1)
    up = unpool(out, pool.indices, x.shape[2:])
    assert up.shape == x.shape and unpool.backward(up).shape == out.shape


@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_unpool_default_output_size_follows_pytorch(rng, d):
    x = rng.standard_normal((2, 3) + (4, 6, 8)[:d])
    pool = getattr(layers, f"MaxPool{d}d")(2, return_indices=True)
    out = pool(x)
    up = getattr(layers, f"MaxUnpool{d}d")(2)(out, pool.indices)
    assert up.shape == x.shape   # (in - 1)*2 - 0 + 2 per axis
    with pytest.raises(ValueError, match="output_size"):
        getattr(layers, f"MaxUnpool{d}d")()(out, pool.indices)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_avg_pool_layers(rng, d):
    x = _x(rng, d)
    cls = getattr(layers, f"AvgPool{d}d")
    pool = cls(3, 2, 1, True, False)   # kernel_size, stride, padding, ceil_mode, count_include_pad
    out = pool.forward(x)
    ref, cache = G.avg_pool_forward(x, dict(kernel_size=3, stride=2, pad=1, ceil_mode=True,
                                            count_include_pad=False))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(pool.backward(np.ones_like(out)),
                                  G.avg_pool_backward(np.ones_like(out), cache))
    if d > 1:
        over = cls(2, divisor_override=1).forward(x)
        np.testing.assert_allclose(over, G.sum_pool_forward(x, dict(kernel_size=2))[0])
    else:
        with pytest.raises(TypeError):
            cls(2, divisor_override=1)   # PyTorch's AvgPool1d has none either


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 3])
def test_adaptive_layers(rng, d, size):
    x = _x(rng, d)
    avg = getattr(layers, f"AdaptiveAvgPool{d}d")(size)
    out = avg(x)
    ref, cache = G.adaptive_avg_pool_forward(x, size)
    np.testing.assert_array_equal(out, ref)
    if size == 1:  # global average pooling
        np.testing.assert_allclose(out.reshape(2, 3), x.reshape(2, 3, -1).mean(axis=-1),
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(avg.backward(np.ones_like(out)),
                                  G.adaptive_avg_pool_backward(np.ones_like(out), cache))
    mx = getattr(layers, f"AdaptiveMaxPool{d}d")(size, return_indices=True)
    out = mx(x)
    ref, cache = G.adaptive_max_pool_forward(x, size)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(mx.indices, G.max_pool_indices(cache))
    assert mx.backward(np.ones_like(out)).shape == x.shape


@pytest.mark.parametrize("name,d", [(f"{kind}{d}d", d) for d in (1, 2, 3)
                                    for kind in ("MaxPool", "AvgPool", "AdaptiveAvgPool",
                                                 "AdaptiveMaxPool")])
def test_layers_refuse_other_ranks(name, d):
    cls = getattr(layers, name)
    layer = cls(2)
    wrong = np.ones(SHAPES[1 if d != 1 else 2], np.float32)
    with pytest.raises(ValueError, match=f"{name} expects x of shape"):
        layer.forward(wrong)


def test_layer_sizes_per_axis(rng):
    x = _x(rng, 3)
    pool = layers.MaxPool3d((1, 2, 3), stride=(1, 2, 1), padding=(0, 1, 1))
    ref, _ = G.max_pool_forward(x, dict(kernel_size=(1, 2, 3), stride=(1, 2, 1), pad=(0, 1, 1)))
    np.testing.assert_array_equal(pool(x), ref)
    with pytest.raises(ValueError, match="kernel_size"):
        layers.MaxPool3d((2, 2))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_layers_take_data_format(rng, d):
    x = _x(rng, d)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))

    def last(a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1))
    for make in (lambda f: getattr(layers, f"MaxPool{d}d")(3, 2, 1, data_format=f),
                 lambda f: getattr(layers, f"AvgPool{d}d")(3, 2, 1, data_format=f),
                 lambda f: getattr(layers, f"AdaptiveAvgPool{d}d")(2, data_format=f),
                 lambda f: getattr(layers, f"AdaptiveMaxPool{d}d")(2, data_format=f)):
        first, chl = make("channels_first"), make("channels_last")
        out = first(x)
        np.testing.assert_array_equal(chl(xl), last(out))
        dout = rng.standard_normal(out.shape)
        np.testing.assert_array_equal(chl.backward(last(dout)), last(first.backward(dout)))
    bn_cls = {1: layers.BatchNorm1d, 2: layers.BatchNorm2d, 3: layers.BatchNorm3d}[d]
    first, chl = bn_cls(3, dtype=np.float64), bn_cls(3, dtype=np.float64,
                                                     data_format="channels_last")
    np.testing.assert_allclose(chl.forward(xl), last(first.forward(x)), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(chl.buffers["running_var"], first.buffers["running_var"],
                               rtol=1e-12)
    pool = getattr(layers, f"MaxPool{d}d")(2, return_indices=True, data_format="channels_last")
    up = getattr(layers, f"MaxUnpool{d}d")(2, data_format="channels_last")
    xe = np.ascontiguousarray(np.moveaxis(rng.standard_normal((2, 3) + (4, 6, 8)[:d]), 1, -1))
    out = pool(xe)
    assert up(out, pool.indices).shape == xe.shape
