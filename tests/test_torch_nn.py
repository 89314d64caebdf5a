"""gpulayers.torch.nn modules against torch.nn's: constructors, buffers, state_dict round
trips (strict=True both ways), training steps and running statistics."""
import pytest

torch = pytest.importorskip("torch")

from gpulayers.torch import nn as gnn  # noqa: E402

nn = torch.nn

POOLS = [
    ("MaxPool1d", dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True), 1),
    ("MaxPool2d", dict(kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2)), 2),
    ("MaxPool3d", dict(kernel_size=2, return_indices=True), 3),
    ("AvgPool1d", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), 1),
    ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                       divisor_override=4), 2),
    ("AvgPool3d", dict(kernel_size=(2, 3, 2), stride=1), 3),
    ("AdaptiveAvgPool1d", dict(output_size=3), 1),
    ("AdaptiveAvgPool2d", dict(output_size=(None, 2)), 2),
    ("AdaptiveAvgPool3d", dict(output_size=1), 3),
    ("AdaptiveMaxPool1d", dict(output_size=4, return_indices=True), 1),
    ("AdaptiveMaxPool2d", dict(output_size=(3, 2)), 2),
    ("AdaptiveMaxPool3d", dict(output_size=2), 3),
]


@pytest.mark.parametrize("name,kwargs,d", POOLS, ids=[p[0] for p in POOLS])
def test_pool_modules_match_torch(name, kwargs, d):
    ours, theirs = getattr(gnn, name)(**kwargs), getattr(nn, name)(**kwargs)
    assert isinstance(ours, getattr(nn, name)) and repr(ours) == repr(theirs)
    x = torch.randn((2, 3) + (7, 6, 5)[:d], dtype=torch.float64)
    for t in (x, x[0]):                       # batched and unbatched
        a, b = ours(t), theirs(t)
        if isinstance(b, tuple):
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_unpool_modules_match_torch(d):
    pool = getattr(nn, f"MaxPool{d}d")(2, stride=2, return_indices=True)
    ours, theirs = getattr(gnn, f"MaxUnpool{d}d")(2, stride=2), getattr(nn, f"MaxUnpool{d}d")(2)
    x = torch.randn((2, 3) + (6, 4, 4)[:d])
    y, idx = pool(x)
    assert torch.equal(ours(y, idx), theirs(y, idx))
    assert torch.equal(ours(y, idx, output_size=x.shape), theirs(y, idx, output_size=x.shape))


BNS = [("BatchNorm1d", (4, 5)), ("BatchNorm1d", (4, 5, 3)), ("BatchNorm2d", (3, 5, 4, 3)),
       ("BatchNorm3d", (2, 5, 3, 2, 3))]
OPTIONS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
           dict(momentum=0.3, eps=1e-3, dtype=torch.float64)]


@pytest.mark.parametrize("name,shape", BNS, ids=[f"{n}-{len(s)}d" for n, s in BNS])
@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_batchnorm_modules_match_torch(name, shape, opts):
    torch.manual_seed(0)
    ours, theirs = getattr(gnn, name)(5, **opts), getattr(nn, name)(5, **opts)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    dtype = opts.get("dtype", torch.float32)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for step in range(3):                      # momentum=None: the cumulative average
        x = (torch.randn(shape, dtype=dtype) * 2 + step).requires_grad_()
        xt = x.detach().clone().requires_grad_()
        a, b = ours(x), theirs(xt)
        torch.testing.assert_close(a, b, **tol)
        dout = torch.randn_like(a)
        a.backward(dout)
        b.backward(dout)
        torch.testing.assert_close(x.grad, xt.grad, **tol)
        if ours.affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **tol)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), **tol)


def test_checkpoints_load_both_ways_strict():
    torch.manual_seed(1)
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                           nn.AdaptiveAvgPool2d(1))
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), gnn.BatchNorm2d(4), nn.ReLU(), gnn.MaxPool2d(2),
                         gnn.AdaptiveAvgPool2d(1))
    theirs.train()(torch.randn(4, 3, 10, 10))   # running stats and num_batches_tracked move
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    ours.train()(torch.randn(4, 3, 10, 10))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert int(theirs[1].num_batches_tracked) == 2
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_sync_batchnorm_module_without_distributed_is_batchnorm():
    torch.manual_seed(2)
    ours, theirs = gnn.SyncBatchNorm(3), nn.BatchNorm2d(3)
    assert list(ours.state_dict()) == list(nn.SyncBatchNorm(3).state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    model = gnn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    assert type(model[0]) is gnn.SyncBatchNorm


def test_sync_batchnorm_with_local_comm_is_batchnorm():
    from gpulayers.distributed import LocalComm
    torch.manual_seed(3)
    ours, theirs = gnn.SyncBatchNorm(3, comm=LocalComm()), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float32, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    a, b = ours(x), theirs(xt)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
