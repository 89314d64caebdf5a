"""Layer classes: forward/backward, params/grads, train/eval, to(), state dicts."""
import numpy as np
import pytest

import gpulayers as G
from gpulayers import layers
from gpulayers.gradcheck import eval_numerical_gradient_array, rel_error


def test_maxpool_layer_matches_functional(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    pool = layers.MaxPool2d(3, stride=2, padding=1, return_indices=True)
    out = pool(x)
    ref, cache = G.max_pool_forward(x, dict(pool_height=3, pool_width=3, stride=2, pad=1))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(pool.indices, G.max_pool_indices(cache))
    dout = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(dout), G.max_pool_backward(dout, cache))
    unpool = layers.MaxUnpool2d()
    up = unpool(out, pool.indices, (8, 8))
    assert up.shape == x.shape and unpool.backward(up).shape == out.shape


def test_avgpool_layer(rng):
    x = rng.standard_normal((2, 3, 7, 7))
    pool = layers.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    out = pool.forward(x)
    ref, _ = G.avg_pool_forward(x, dict(pool_height=3, pool_width=3, stride=2, pad=1,
                                        ceil_mode=True, count_include_pad=False))
    np.testing.assert_array_equal(out, ref)
    assert pool.backward(np.ones_like(out)).shape == x.shape


def test_backward_before_forward_raises():
    with pytest.raises(ValueError, match="before forward"):
        layers.MaxPool2d(2).backward(np.ones((1, 1, 1, 1)))


@pytest.mark.parametrize("convention", ["cs231n", "torch"])
def test_batchnorm2d_train_eval_and_grads(rng, convention):
    bn = layers.BatchNorm2d(3, convention=convention, dtype=np.float64)
    assert bn.buffers["running_var"][0] == (1.0 if convention == "torch" else 0.0)
    x = rng.standard_normal((4, 3, 5, 5)) * 2 + 1
    out = bn.forward(x)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert not np.allclose(bn.buffers["running_mean"], 0)
    dout = rng.standard_normal(x.shape)
    dx = bn.backward(dout)
    num = eval_numerical_gradient_array(lambda a: layers.BatchNorm2d(3, dtype=np.float64).forward(a), x, dout)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    assert set(bn.grads) == {"gamma", "beta"}
    np.testing.assert_allclose(bn.grads["beta"], dout.sum(axis=(0, 2, 3)))
    rm = bn.buffers["running_mean"].copy()
    bn.eval()
    bn.forward(x)
    np.testing.assert_array_equal(bn.buffers["running_mean"], rm)


def test_batchnorm1d_state_dict_round_trip(rng):
    bn = layers.BatchNorm1d(4, momentum=0.5)
    bn.forward(rng.standard_normal((6, 4)).astype(np.float32))
    state = bn.state_dict()
    assert set(state) == {"gamma", "beta", "running_mean", "running_var"}
    other = layers.BatchNorm1d(4).load_state_dict(state)
    for k, v in state.items():
        np.testing.assert_array_equal(G.to_numpy(other.state_dict()[k]), v)
    with pytest.raises(ValueError, match="shape"):
        layers.BatchNorm1d(5).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key"):
        layers.BatchNorm1d(4).load_state_dict({"gamma": state["gamma"]})


def test_to_backend(xp, rng):
    bn = layers.BatchNorm2d(3).to("numpy" if xp is np else "cupy")
    assert type(bn.params["gamma"]) is type(xp.ones(1))
    out = bn.forward(xp.asarray(rng.standard_normal((2, 3, 4, 4)).astype(np.float32)))
    assert type(out) is type(xp.ones(1))


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="convention"):
        layers.BatchNorm2d(3, convention="tf")
    with pytest.raises(ValueError, match="num_features"):
        layers.BatchNorm2d(0)


def test_gradcheck_helpers():
    assert rel_error(np.ones(3), np.ones(3)) == 0.0
    assert abs(rel_error(np.array([1.0]), np.array([1.1])) - 0.1 / 2.1) < 1e-12
    with pytest.raises(ValueError, match="one shape"):
        rel_error(np.ones(3), np.ones(2))
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    x0 = x.copy()
    grad = eval_numerical_gradient_array(lambda a: a ** 3, x, np.ones_like(x))
    np.testing.assert_allclose(grad, 3 * x0 ** 2, rtol=1e-8)
    np.testing.assert_array_equal(x, x0)
