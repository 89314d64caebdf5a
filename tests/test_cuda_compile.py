"""gpulayers.cuda.compile without a GPU: a stand-in for CuPy counts compiles, launches and
synchronisations, so the caching and error rules are checked on any machine."""
import sys
import types

import pytest

from gpulayers.cuda import compile as cc


class CompileException(Exception):
    pass


class _Device:
    current = 0

    def __init__(self, i):
        self.id = i

    def __enter__(self):
        self.previous, _Device.current = _Device.current, self.id
        return self

    def __exit__(self, *exc):
        _Device.current = self.previous
        return False


@pytest.fixture
def fake_cupy(monkeypatch):
    log = {"compiles": [], "syncs": 0, "fail": False, "fault": None}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.names = name_expressions

        def compile(self):
            self.device = _Device.current
            log["compiles"].append((_Device.current, tuple(self.names)))
            if log["fail"]:
                raise CompileException("error: identifier 'oops' is undefined")

        def get_function(self, expression):
            if expression not in self.names:
                raise KeyError(expression)
            return ("kernel", expression, self.device)

    class Stream:
        def synchronize(self):
            log["syncs"] += 1
            if log["fault"]:
                raise RuntimeError(log["fault"])

    cuda = types.SimpleNamespace(
        Device=_Device, compiler=types.SimpleNamespace(CompileException=CompileException),
        runtime=types.SimpleNamespace(getDevice=lambda: _Device.current),
        get_current_stream=Stream)
    fake = types.SimpleNamespace(RawModule=RawModule, cuda=cuda, ndarray=type("nd", (), {}))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cc, "_MODULES", {})
    monkeypatch.setattr(cc, "_FAILED", {})
    monkeypatch.setattr(cc, "source", lambda name: "// source")
    previous = cc.set_launch_checks(False)
    _Device.current = 0
    yield log
    cc.set_launch_checks(previous)


EXPRS = ("k<float>", "k<double>")


def test_one_compile_per_device(fake_cupy):
    assert cc.get_kernel("a.cu", "k<float>", EXPRS) == ("kernel", "k<float>", 0)
    assert cc.get_kernel("a.cu", "k<double>", EXPRS)[1] == "k<double>"
    assert cc.get_kernel("a.cu", "k<float>", EXPRS, device_id=1) == ("kernel", "k<float>", 1)
    assert [d for d, _ in fake_cupy["compiles"]] == [0, 1]
    with pytest.raises(cc.KernelLaunchError, match="k<half>"):
        cc.get_kernel("a.cu", "k<half>", EXPRS)


def test_failed_compile_is_cached_and_raised_again(fake_cupy):
    fake_cupy["fail"] = True
    with pytest.raises(cc.KernelLaunchError, match="could not compile a.cu.*oops") as first:
        cc.get_kernel("a.cu", "k<float>", EXPRS)
    with pytest.raises(cc.KernelLaunchError, match="could not compile a.cu.*oops") as again:
        cc.get_kernel("a.cu", "k<double>", EXPRS)
    assert again.value is first.value
    assert len(fake_cupy["compiles"]) == 1  # not recompiled on every call
    fake_cupy["fail"] = False
    assert cc.get_kernel("a.cu", "k<float>", EXPRS, device_id=1)  # another device compiles


def test_launch_runs_on_the_given_device(fake_cupy):
    seen = []
    cc.launch(lambda g, b, a: seen.append(_Device.current), "k<float>", (1,), (32,), (),
              device_id=1)
    cc.launch(lambda g, b, a: seen.append(_Device.current), "k<float>", (1,), (32,), ())
    assert seen == [1, 0] and _Device.current == 0 and fake_cupy["syncs"] == 0


def test_launch_failure_names_the_kernel(fake_cupy):
    def broken(grid, block, args):
        raise RuntimeError("too many resources requested for launch")
    with pytest.raises(cc.KernelLaunchError, match=r"k<float> failed on device 1 \(grid=\(7,\)"):
        cc.launch(broken, "k<float>", (7,), (1024,), (), device_id=1)


def test_launch_checks_report_asynchronous_faults_with_the_kernel_name(fake_cupy):
    cc.launch(lambda g, b, a: None, "k<float>", (1,), (32,), ())
    assert fake_cupy["syncs"] == 0  # asynchronous by default: no host synchronisation
    cc.set_launch_checks(True)
    assert cc.launch_checks()
    fake_cupy["fault"] = "cudaErrorMisalignedAddress: misaligned address"
    with pytest.raises(cc.KernelLaunchError, match="CUDA kernel k<double> failed.*misaligned"):
        cc.launch(lambda g, b, a: None, "k<double>", (1,), (32,), ())
    assert fake_cupy["syncs"] == 1


def test_device_of_names_the_arrays(fake_cupy):
    nd = type("ndarray", (), {})
    fake_cupy_mod = sys.modules["cupy"]
    fake_cupy_mod.ndarray = nd

    def arr(shape, dev):
        a = nd()
        a.shape, a.device = shape, types.SimpleNamespace(id=dev)
        return a
    assert cc.device_of(arr((2,), 1), None, arr((3,), 1)) == 1
    assert cc.device_of(None) == 0
    with pytest.raises(ValueError, match=r"argument 0 of shape \(2,\) on device 0, argument 2 "
                                         r"of shape \(3,\) on device 1"):
        cc.device_of(arr((2,), 0), None, arr((3,), 1))
