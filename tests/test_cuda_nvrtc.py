"""Every CUDA kernel instantiation compiles with NVRTC for sm_80 and sm_90, without spills.

No GPU needed: NVIDIA's pip packages provide the compiler -- cuda-bindings
(``cuda.bindings.nvrtc``), nvidia-cuda-nvrtc (libnvrtc) and
nvidia-cuda-runtime (headers such as cuda_fp16.h). Each source listed by
:func:`gpulayers.cuda.instantiations` is compiled to CUBIN with
``gpulayers.cuda.compile.OPTIONS`` plus the arch and ptxas' verbose output,
with every name expression registered. The registers/spill table is printed
(``pytest -s``) and is part of every failure message; any spill fails.
"""
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from gpulayers.cuda import compile as cuda_compile
from gpulayers.cuda import instantiations
from gpulayers.cuda.compile import cuda_include_dir

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="cuda-bindings is not installed (pip install cuda-bindings)")

ARCHS = ("sm_80", "sm_90")


def _nvrtc_problem():
    """None when libnvrtc loads, else why it does not."""
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:  # cuda.bindings finds no libnvrtc
        return f"{type(exc).__name__}: {exc}"
    return None


_NO_NVRTC = _nvrtc_problem()
_INCLUDE = cuda_include_dir()

pytestmark = [
    pytest.mark.skipif(_NO_NVRTC is not None, reason="libnvrtc does not load "
                       f"(pip install nvidia-cuda-nvrtc): {_NO_NVRTC}"),
    pytest.mark.skipif(_INCLUDE is None, reason="no cuda_fp16.h from a pip package "
                       "(pip install nvidia-cuda-runtime)"),
]


def _call(result, what, prog=None):
    """Values of an NVRTC call's result tuple; AssertionError with the log on failure."""
    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _log(prog) if prog is not None else ""
        raise AssertionError(f"{what} failed: {err!r}\n{log}")
    return values[0] if len(values) == 1 else values


def _log(prog):
    size = _call(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = b" " * size
    _call(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
    return log.rstrip(b"\0").decode(errors="replace")


def compile_source(source, expressions, arch):
    """Compile ``source`` (a gpulayers/cuda file) to CUBIN for ``arch``.

    Returns a tuple of:
    - names: {name expression: mangled kernel name}
    - log: NVRTC's program log, holding ptxas' per-kernel report
    - cubin_size: bytes of CUBIN produced
    """
    options = [*cuda_compile.OPTIONS, f"-arch={arch}", "--ptxas-options=-v", f"-I{_INCLUDE}"]
    prog = _call(nvrtc.nvrtcCreateProgram(cuda_compile.source(source).encode(),
                                          source.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for expression in expressions:
            _call(nvrtc.nvrtcAddNameExpression(prog, expression.encode()),
                  f"nvrtcAddNameExpression({expression!r})")
        encoded = [o.encode() for o in options]
        _call(nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded),
              f"compiling {source} for {arch} with {options}", prog)
        names = {e: _call(nvrtc.nvrtcGetLoweredName(prog, e.encode()),
                          f"nvrtcGetLoweredName({e!r})").decode() for e in expressions}
        cubin_size = _call(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        return names, _log(prog), cubin_size
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log):
    """{mangled name: {'registers', 'stack', 'spill_stores', 'spill_loads'}} from ptxas -v."""
    report, current = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = report.setdefault(m.group(1), {})
        elif current is not None and (m := _FRAME.search(line)):
            current.update(zip(("stack", "spill_stores", "spill_loads"), map(int, m.groups())))
        elif current is not None and (m := _REGISTERS.search(line)):
            current["registers"] = int(m.group(1))
    return report


def format_table(source, arch, names, report):
    _, major, minor = nvrtc.nvrtcVersion()
    lines = [f"{source} for {arch} (NVRTC {major}.{minor}): registers, stack frame and spill "
             f"bytes per kernel",
             f"  {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel"]
    for expression, mangled in names.items():
        r = {key: report.get(mangled, {}).get(key, "?")
             for key in ("registers", "stack", "spill_stores", "spill_loads")}
        lines.append(f"  {r['registers']:>4} {r['stack']:>5} {r['spill_stores']:>8} "
                     f"{r['spill_loads']:>8}  {expression}")
    return "\n".join(lines)


_SOURCES = sorted(instantiations().items())


@pytest.fixture(scope="module")
def compiled():
    """{(source, arch): Future of compile_source(...)}, all compiled up front; in parallel
    processes where fork is available (NVRTC is CPU-bound: a few seconds per program)."""
    jobs = [(source, expressions, arch) for source, expressions in _SOURCES for arch in ARCHS]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(1)
    with pool:
        futures = {(s, a): pool.submit(compile_source, s, e, a) for s, e, a in jobs}
    return futures


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [s for s, _ in _SOURCES])
def test_kernels_compile_without_spills(compiled, source, arch):
    names, log, cubin_size = compiled[source, arch].result()
    report = parse_ptxas(log)
    table = format_table(source, arch, names, report)
    print(f"\n{table}")
    assert cubin_size > 0, f"no CUBIN for {source} on {arch}\n{table}"
    missing = [e for e, m in names.items() if "registers" not in report.get(m, {})]
    assert not missing, f"ptxas reported nothing for {missing}\n{log}\n{table}"
    spilled = [e for e, m in names.items()
               if report[m]["spill_stores"] or report[m]["spill_loads"]]
    assert not spilled, f"kernels spill registers on {arch}: {spilled}\n{table}"


def test_every_launcher_lists_instantiations():
    assert _SOURCES, "gpulayers.cuda.instantiations() found no kernel sources"
    for source, expressions in _SOURCES:
        assert expressions, f"{source} lists no name expressions"
        assert len(set(expressions)) == len(expressions), f"{source} lists a duplicate"
