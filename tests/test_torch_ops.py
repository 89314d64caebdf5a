"""The torch.ops.gpulayers operators: opcheck, torch.compile, gradcheck, determinism,
zero-copy DLPack crossing, what autograd saves, and the import rules."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import gpulayers.torch as GF  # noqa: E402
from gpulayers.torch import _bridge, _ops  # noqa: E402
from gpulayers.distributed import LocalComm  # noqa: E402

OPS = torch.ops.gpulayers
CUDA = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tie_free(shape, dtype=torch.float64, seed=0):
    """A shuffled linspace: no ties, so max pooling's gradient is smooth (gradcheck)."""
    n = int(np.prod(shape))
    v = np.random.default_rng(seed).permutation(np.linspace(-1, 1, n))
    return torch.from_numpy(v.reshape(shape)).to(dtype)


# ---------------------------------------------------------------------- the samples

def _samples():
    """(op name, args, kwargs) for opcheck: every op, rank, layout."""
    x2 = _tie_free((2, 3, 7, 6), torch.float32)
    x1 = _tie_free((2, 3, 9), torch.float32)
    x3 = _tie_free((1, 2, 5, 4, 6), torch.float32)
    cl2 = x2.contiguous(memory_format=torch.channels_last)
    cl3 = x3.contiguous(memory_format=torch.channels_last_3d)
    out = []
    for x in (x1, x2, x3, cl2, cl3):
        d = x.dim() - 2
        k, s, p, dl = [3] * d, [2] * d, [1] * d, [1] * d
        out.append(("max_pool", (x.clone().requires_grad_(), k, s, p, dl, True)))
        o, offs = OPS.max_pool(x, k, s, p, dl, True)
        cl = _bridge.is_cl(x)
        out.append(("max_pool_backward", (torch.randn_like(o), offs, list(x.shape), k, s, p, dl,
                                          True, cl)))
        out.append(("max_pool_indices", (offs, list(x.shape), k, s, p, dl, True, cl)))
        out.append(("avg_pool", (x.clone().requires_grad_(), k, s, p, False, False, None)))
        out.append(("avg_pool", (x.clone().requires_grad_(), k, s, p, True, True,
                                 2 if d > 1 else None)))
        a = OPS.avg_pool(x, k, s, p, True, True, None)
        out.append(("avg_pool_backward", (torch.randn_like(a), list(x.shape), k, s, p, True, True,
                                          None, cl)))
        size = [2] * d
        out.append(("adaptive_avg_pool", (x.clone().requires_grad_(), size)))
        out.append(("adaptive_avg_pool_backward", (torch.randn(x.shape[:2] + (2,) * d),
                                                   list(x.shape), cl)))
        out.append(("adaptive_max_pool", (x.clone().requires_grad_(), size)))
        _, aoffs = OPS.adaptive_max_pool(x, size)
        out.append(("adaptive_max_pool_backward", (torch.randn(x.shape[:2] + (2,) * d), aoffs,
                                                   list(x.shape), cl)))
        out.append(("adaptive_max_pool_indices", (aoffs, list(x.shape), cl)))
        y, idx = F.max_pool2d(x, 2, return_indices=True) if d == 2 else (
            getattr(F, f"max_pool{d}d")(x, 2, return_indices=True))
        out.append(("max_unpool", (y.detach().clone().requires_grad_(), idx,
                                   list(x.shape[2:]))))
        w, b = torch.rand(x.shape[1]) + 0.5, torch.randn(x.shape[1])
        rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        for training in (True, False):
            out.append(("batch_norm", (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                       b.clone().requires_grad_(), rm, rv, training, 1e-5)))
        out.append(("batch_norm", (x.clone().requires_grad_(), None, None, None, None, True,
                                   1e-5)))
        _, stats = OPS.batch_norm(x, w, b, None, None, True, 1e-5)
        out.append(("batch_norm_backward", (torch.randn_like(x), x, w, stats, True)))
        out.append(("update_running_stats", (rm.clone(), rv.clone(), stats, 0.1)))
    xb = torch.randn(6, 4, dtype=torch.float64)
    r64 = dict(dtype=torch.float64)
    out.append(("batch_norm", (xb.clone().requires_grad_(), None, None, torch.zeros(4, **r64),
                               torch.ones(4, **r64), True, 1e-3)))
    h = _ops.comm_handle(LocalComm())
    out.append(("sync_batch_norm", (x2.clone().requires_grad_(), torch.ones(3).requires_grad_(),
                                    torch.zeros(3).requires_grad_(), 1e-5, h)))
    _, st, cnt = OPS.sync_batch_norm(x2, None, None, 1e-5, h)
    out.append(("sync_batch_norm_backward", (torch.randn_like(x2), x2, None, st, cnt, h)))
    return out


SAMPLES = _samples()


def test_every_op_has_samples():
    assert {name for name, _ in SAMPLES} == set(_ops.OPS)


@pytest.mark.parametrize("name,args", SAMPLES, ids=[f"{n}-{i}" for i, (n, _) in
                                                     enumerate(SAMPLES)])
def test_opcheck(name, args):
    # test_aot_dispatch_dynamic traces with symbolic shapes: the geometry is specialised,
    # which is what the kernels need (sizes are part of a pooling's definition)
    torch.library.opcheck(getattr(OPS, name).default, args)


# ------------------------------------------------------------------------- compile

def _net(x):
    y = GF.max_pool2d(x, 3, 2, 1)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = GF.batch_norm(y, rm, rv, training=True)
    y = GF.adaptive_max_pool2d(GF.avg_pool2d(y, 2, ceil_mode=True), (2, 2))
    return GF.adaptive_avg_pool2d(y, 1).sum()   # one generated kernel: compile time is CI time


def test_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend
    import shutil
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")):
        pytest.skip("torch.compile's inductor needs a C++ compiler (g++ or clang++), none found")
    counter = CompileCounterWithBackend("inductor")
    x = _tie_free((2, 3, 9, 9), torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(_net, fullgraph=True, backend=counter, dynamic=False)
    ya = compiled(xa)
    yb = _net(xb)
    ya.backward()
    yb.backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    assert counter.frame_count == 1
    graph = str(counter.graphs[0].graph)
    for op in ("max_pool", "batch_norm", "avg_pool", "adaptive_max_pool", "adaptive_avg_pool"):
        assert f"gpulayers.{op}" in graph or f"gpulayers_{op}" in graph


# ----------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("d", [1, 2, 3])
def test_gradcheck_float64(d):
    shape = (2, 2) + (5, 4, 3)[:d]
    cl = d >= 2
    x = _tie_free(shape, seed=d)
    if cl:
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[d])
    x.requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    fns = [lambda t: getattr(GF, f"max_pool{d}d")(t, 2, 1, 1),
           lambda t: getattr(GF, f"avg_pool{d}d")(t, 3, 2, 1, True, False),
           lambda t: getattr(GF, f"adaptive_avg_pool{d}d")(t, 2),
           lambda t: getattr(GF, f"adaptive_max_pool{d}d")(t, 2),
           lambda t: GF.batch_norm(t, None, None, training=True)]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda t, ww, bb: GF.batch_norm(t, None, None, ww, bb, training=True), (x, w, b))
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda t, ww, bb: GF.batch_norm(t, rm, rv, ww, bb, training=False), (x, w, b))
    y, idx = getattr(F, f"max_pool{d}d")(x.detach(), 2, return_indices=True)
    assert torch.autograd.gradcheck(
        lambda t: getattr(GF, f"max_unpool{d}d")(t, idx, 2, output_size=shape[2:]),
        (y.clone().requires_grad_(),))


# -------------------------------------------------------------------- determinism

def _every_op_grads(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, 8, generator=g).to(device)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    grads = []
    for t in (x, cl, x[:, :, 0], x[:, :, 0, 0]):
        t = t.detach().clone().requires_grad_()
        d = t.dim() - 2
        y, idx = getattr(GF, f"max_pool{d}d")(t, 3, 2, 1, return_indices=True)
        out = (y.sum() + getattr(GF, f"avg_pool{d}d")(t, 3, 2, 1).square().sum()
               + getattr(GF, f"adaptive_avg_pool{d}d")(t, 3).square().sum()
               + getattr(GF, f"adaptive_max_pool{d}d")(t, 3).square().sum()
               + getattr(GF, f"max_unpool{d}d")(y, idx, 3, 2, 1, t.shape[2:]).square().sum()
               + GF.batch_norm(t, None, None, training=True).pow(3).sum())
        grads.append(torch.autograd.grad(out, t)[0])
    return grads


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")])])
def test_deterministic_algorithms_bitwise(device):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _every_op_grads(device), _every_op_grads(device)
    finally:
        torch.use_deterministic_algorithms(prev)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ------------------------------------------------------------ memory and autograd

def test_cpu_tensors_cross_without_copies():
    x = torch.randn(2, 3, 6, 6)
    a = _bridge.to_array(x)
    assert a.ctypes.data == x.data_ptr() and a.strides == tuple(s * 4 for s in x.stride())
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _bridge.to_array(cl).ctypes.data == cl.data_ptr()
    bf = x.bfloat16()
    assert _bridge.to_array(bf).ctypes.data == bf.data_ptr()
    out = np.zeros((3, 4), np.float32)
    t = _bridge.to_tensor(out)
    assert t.data_ptr() == out.ctypes.data
    before = dict(_bridge.COPIES)
    y, idx = GF.max_pool2d(cl.requires_grad_(), 2, return_indices=True)
    y.sum().backward()
    GF.batch_norm(cl, None, None, training=True).sum().backward()
    assert _bridge.COPIES == before


def test_saved_tensors_are_one_byte_offsets():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = GF.max_pool2d(x, 3, 2, 1)
        z = GF.adaptive_max_pool2d(x, 4)
    assert saved == [(torch.uint8, tuple(y.shape)), (torch.uint8, tuple(z.shape))]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        GF.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert saved == [(torch.uint8, tuple(y.shape))]   # indices are returned, not saved


def test_dispatch_goes_through_the_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    x = torch.randn(2, 3, 6, 6)
    calls = {"max_pool2d": lambda: GF.max_pool2d(x, 2), "avg_pool2d": lambda: GF.avg_pool2d(x, 2),
             "adaptive_avg_pool2d": lambda: GF.adaptive_avg_pool2d(x, 2),
             "adaptive_max_pool2d": lambda: GF.adaptive_max_pool2d(x, 2),
             "max_unpool2d": lambda: GF.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2),
             "batch_norm": lambda: GF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)}
    for name, call in calls.items():
        with Log() as log:
            call()
        assert any(op.startswith("gpulayers.") for op in log.ops), (name, log.ops)


def test_import_rules():
    code = ("import sys; import gpulayers, gpulayers.distributed, gpulayers.layers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import gpulayers.torch\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('imported')")
    res = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    assert "pip install torch" in res.stdout and "gpulayers.torch needs PyTorch" in res.stdout


# ------------------------------------------------------------------ the CUDA bridge

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and CuPy")
def test_cuda_zero_copy_current_stream_and_torch_allocator():
    import cupy
    x = torch.randn(4, 8, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    assert _bridge.to_array(x).data.ptr == x.data_ptr()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with _bridge.array_scope(x):
            assert cupy.cuda.get_current_stream().ptr == s.cuda_stream
        before = torch.cuda.memory_allocated()
        y, idx = GF.max_pool2d(x.requires_grad_(), 3, 2, 1, return_indices=True)
        assert torch.cuda.memory_allocated() > before   # outputs from torch's allocator
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
    torch.cuda.synchronize()
    ref = F.max_pool2d(x.detach(), 3, 2, 1)
    assert torch.equal(y.detach(), ref)


def test_cuda_bridge_with_fakes(monkeypatch):
    """What the CUDA path does, with a fake CuPy and fake torch.cuda hooks (no GPU needed):
    the work enters the tensor's device, torch's current stream of that device as an
    ExternalStream, and torch's caching allocator; allocations go to torch on that stream
    and come back to it when CuPy drops them."""
    import contextlib
    import types
    events = []

    @contextlib.contextmanager
    def ctx(name, *args):
        events.append(("enter", name) + args)
        yield
        events.append(("exit", name))

    class UnownedMemory:
        def __init__(self, ptr, size, owner, device):
            self.ptr, self.size, self.owner, self.device = ptr, size, owner, device

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda d: ctx("device", d),
        ExternalStream=lambda ptr, d: ctx("stream", ptr, d),
        using_allocator=lambda fn: ctx("allocator", fn),
        runtime=types.SimpleNamespace(getDevice=lambda: 1),
        UnownedMemory=UnownedMemory, MemoryPointer=lambda mem, off: mem))
    monkeypatch.setattr(_bridge, "_cupy", fake)
    monkeypatch.setattr(_bridge, "_STREAMS", {})
    stream = types.SimpleNamespace(cuda_stream=0xBEEF)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    freed = []
    def alloc(size, device, s):
        events.append(("alloc", size, device, s))
        return 4096
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", alloc)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", freed.append)
    t = types.SimpleNamespace(device=torch.device("cuda", 1))
    with _bridge.array_scope(t):
        mem = _bridge._torch_malloc(256)
    assert [e[:2] for e in events[:3]] == [("enter", "device"), ("enter", "stream"),
                                           ("enter", "allocator")]
    assert events[0][2] == 1 and events[1][2:] == (0xBEEF, 1)
    assert events[2][2] is _bridge._torch_malloc
    assert ("alloc", 256, 1, stream) in events
    assert mem.ptr == 4096 and mem.device == 1
    del mem
    import gc
    gc.collect()
    assert freed == [4096]
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    events.clear()
    with _bridge.array_scope(cpu):
        pass
    assert events == []
