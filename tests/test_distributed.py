"""Synchronized batch norm: communicators in-process, and the real thing under mpiexec.

The MPI tests launch ``mpiexec -n 2`` and ``-n 3`` once each (tests/mpi_worker.py
runs every case in one launch); each rank holds a slice of one batch, and the
concatenated outputs, the gradients and the running statistics must equal a
single process on the whole batch. They need mpi4py and an ``mpiexec`` of the
same MPI (``pip install mpi4py mpich``); without them they are skipped, unless
GPULAYERS_REQUIRE_MPI=1, which turns the skip into a failure (for CI).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gpulayers.backend import cupy_unusable_reason
from gpulayers.distributed import (CommError, CommSizeError, LocalComm, MPIComm, NCCLComm,
                                   _FlaggedComm)

sys.path.insert(0, str(Path(__file__).parent))
import mpi_worker  # noqa: E402
from conftest import SESSION_SEED  # noqa: E402  (fresh data per run, replayable)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("mpi_worker.py")
MPI_TIMEOUT_S = 120
TOL = dict(rtol=1e-12, atol=1e-12)


def rel_error(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))) if np.size(a) else 0.0


# ---------------------------------------------------------------------------------------------
# In-process: LocalComm, the failure-flag protocol, lazy imports
# ---------------------------------------------------------------------------------------------

def test_import_does_not_load_mpi_or_cupy():
    code = ("import sys, gpulayers, gpulayers.distributed, gpulayers.backend; "
            "bad = [m for m in ('mpi4py', 'cupy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_local_comm_is_identity_copy(dtype):
    buf = np.arange(4).astype(dtype)
    out = LocalComm().allreduce_sum(buf)
    assert out.dtype == buf.dtype and out.shape == buf.shape and out is not buf
    np.testing.assert_array_equal(out, buf)
    assert (LocalComm().rank, LocalComm().size) == (0, 1)


@pytest.mark.parametrize("buf, error", [
    (np.ones((2, 3)), ValueError), ([1.0, 2.0], TypeError), (np.array(["a"]), TypeError),
    (np.ones(2, dtype=complex), TypeError)])
def test_local_comm_rejects_bad_buffers(buf, error):
    with pytest.raises(error):
        LocalComm().allreduce_sum(buf)


class LoopbackComm(_FlaggedComm):
    """A _FlaggedComm whose 'transport' is local: one rank, or two where the peer mirrors
    this rank's data (its header may differ: peer_failed, peer_count)."""

    def __init__(self, fail_staging=False, fail_transport=False, peer_failed=False,
                 peer_count=None, size=None):
        self.fail_staging, self.fail_transport = fail_staging, fail_transport
        self.peer_failed, self.peer_count = peer_failed, peer_count
        self.size = size or (2 if peer_failed or peer_count is not None else 1)
        self.headers, self.data_calls = [], []

    def _to_transport(self, buf):
        if self.fail_staging:
            raise OSError("staging broke")
        return np.asarray(buf, dtype=np.float64)

    def _reduce_header(self, header):
        self.headers.append(header.copy())
        if self.fail_transport:
            raise RuntimeError("link down")
        out = header.copy()
        if self.size == 2:
            n = header[1] if self.peer_count is None else self.peer_count
            out += [float(self.peer_failed), n, n * n, header[3]]
        return out

    def _reduce(self, data):
        self.data_calls.append(("reduce", data.copy()))
        return data * self.size

    def _gather(self, data):
        self.data_calls.append(("gather", data.copy()))
        return np.stack([data] * self.size)


def test_flagged_comm_round_trip_keeps_dtype_and_sends_header():
    comm = LoopbackComm()
    out = comm.allreduce_sum(np.array([1, -2, 3], dtype=np.int32))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [1, -2, 3])
    # [failed, K, K*K, host tag], then the data alone
    np.testing.assert_array_equal(comm.headers[-1], [0.0, 3.0, 9.0, 0.0])
    np.testing.assert_array_equal(comm.data_calls[-1][1], [1.0, -2.0, 3.0])


def test_local_failure_still_enters_the_header_then_raises():
    comm = LoopbackComm(fail_staging=True)
    with pytest.raises(CommError, match=r"rank 0 of 1.*failed on 1 of 1 ranks.*staging broke") as info:
        comm.allreduce_sum(np.ones(3))
    assert isinstance(info.value.__cause__, OSError)
    np.testing.assert_array_equal(comm.headers[-1], [1.0, 3.0, 9.0, 0.0])
    assert comm.data_calls == []   # no data collective after a failed header


def test_invalid_buffer_is_flagged_with_its_element_count():
    comm = LoopbackComm()
    with pytest.raises(CommError, match="1-D"):
        comm.allreduce_sum(np.ones((2, 2)))
    np.testing.assert_array_equal(comm.headers[-1], [1.0, 4.0, 16.0, 0.0])


def test_failure_on_another_rank_raises_here():
    with pytest.raises(CommError, match=r"failed on 1 of 2 ranks \(not here\)"):
        LoopbackComm(peer_failed=True).allreduce_sum(np.ones(2))


def test_transport_error_becomes_comm_error_naming_rank_and_op():
    with pytest.raises(CommError, match=r"rank 0 of 1: allreduce_sum of 2 elements failed in "
                                        r"LoopbackComm: RuntimeError: link down") as info:
        LoopbackComm(fail_transport=True).allreduce_sum(np.ones(2))
    assert (info.value.rank, info.value.op) == (0, "allreduce_sum")


@pytest.mark.parametrize("op", ["allreduce_sum", "allgather"])
def test_different_element_counts_raise_before_any_data_moves(op):
    comm = LoopbackComm(peer_count=5)
    with pytest.raises(CommSizeError, match=rf"rank 0 of 2: {op}: the ranks passed different "
                                            r"element counts \(this rank 3, the mean over 2 "
                                            r"ranks 4\)") as info:
        getattr(comm, op)(np.ones(3))
    assert isinstance(info.value, ValueError) and isinstance(info.value, CommError)
    assert (info.value.count, info.value.mean_count) == (3, 4.0)
    assert comm.data_calls == []
    np.testing.assert_array_equal(comm.allreduce_sum(np.ones(5)), 2 * np.ones(5))  # still usable


def test_allgather_stacks_ranks_and_sums_the_host_tag():
    comm = LoopbackComm(size=2)
    buf = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    out, sums = comm.allgather(buf, host=(7,))
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, [buf, buf])
    assert sums == (14.0,)
    np.testing.assert_array_equal(comm.headers[-1], [0.0, 3.0, 9.0, 7.0])
    assert comm.data_calls[-1][0] == "gather"
    plain = comm.allgather(buf)
    assert isinstance(plain, np.ndarray) and plain.shape == (2, 3)
    with pytest.raises(TypeError, match="host must be None or a tuple of one real number"):
        comm.allgather(buf, host=(1, 2))


def test_local_comm_allgather():
    buf = np.arange(3.0)
    out, sums = LocalComm().allgather(buf, host=(4,))
    assert out.shape == (1, 3) and sums == (4.0,)
    out[0, 0] = 9.0
    assert buf[0] == 0.0   # a copy
    np.testing.assert_array_equal(LocalComm().allgather(buf), [buf])


@pytest.mark.parametrize("timeout", [0, -1.0, "5", True])
def test_constructors_check_timeout_before_importing(timeout):
    for make in (lambda: MPIComm(timeout=timeout), lambda: NCCLComm(None, timeout=timeout)):
        with pytest.raises(ValueError, match="timeout must be None or a positive number"):
            make()


@pytest.mark.skipif(cupy_unusable_reason() is None, reason="CuPy is usable here")
def test_nccl_comm_without_cupy_says_what_to_install():
    with pytest.raises(ImportError, match="NCCLComm needs CuPy"):
        NCCLComm((2, (0,) * 128, 0))


@pytest.mark.gpu
@pytest.mark.skipif(cupy_unusable_reason() is not None, reason=f"needs CuPy: {cupy_unusable_reason()}")
def test_local_comm_keeps_cupy_arrays():
    import cupy
    buf = cupy.arange(3, dtype=cupy.float64)
    out = LocalComm().allreduce_sum(buf)
    assert isinstance(out, cupy.ndarray)
    cupy.testing.assert_array_equal(out, buf)


@pytest.mark.gpu
@pytest.mark.skipif(cupy_unusable_reason() is not None, reason=f"needs CuPy: {cupy_unusable_reason()}")
@pytest.mark.parametrize("layout", ["nchw", "nd"])
def test_nccl_comm_one_rank_matches_plain_bn(layout):
    """The NCCL path on one GPU, one rank: synchronized BN equals plain BN (float64)."""
    import cupy
    from cupy.cuda import nccl
    from gpulayers import batchnorm
    if not getattr(nccl, "available", True):
        pytest.skip("this CuPy build has no NCCL")
    comm = NCCLComm((1, nccl.get_unique_id(), 0))
    assert (comm.rank, comm.size) == (0, 1)
    rng = np.random.default_rng([SESSION_SEED, 7])
    shape = (6, 3, 4, 5) if layout == "nchw" else (9, 3)
    x = cupy.asarray(rng.standard_normal(shape) * 2 + 1)
    gamma, beta = cupy.asarray(rng.standard_normal(3)), cupy.asarray(rng.standard_normal(3))
    dout = cupy.asarray(rng.standard_normal(shape))
    fwd, bwd = ((batchnorm.spatial_batchnorm_forward, batchnorm.spatial_batchnorm_backward)
                if layout == "nchw" else (batchnorm.batchnorm_forward, batchnorm.batchnorm_backward))
    synced, plain = {"mode": "train", "comm": comm}, {"mode": "train"}
    out_s, cache_s = fwd(x, gamma, beta, synced)
    out_p, cache_p = fwd(x, gamma, beta, plain)
    cupy.testing.assert_allclose(out_s, out_p, rtol=1e-12, atol=1e-12)
    for a, b in zip(bwd(dout, cache_s), bwd(dout, cache_p)):
        cupy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for key in ("running_mean", "running_var"):
        cupy.testing.assert_allclose(synced[key], plain[key], rtol=1e-12, atol=1e-12)


# --- batch norm with an in-process communicator -----------------------------------------------

def _bn_case(layout, convention, n=6):
    return {"name": "local", "kind": "bn", "layout": layout, "convention": convention,
            "splits": [n], "seed": [SESSION_SEED, 7], "C": 3, "H": 3, "W": 2}


@pytest.mark.parametrize("layout", ["nd", "nchw"])
@pytest.mark.parametrize("convention", ["cs231n", "torch"])
def test_local_comm_matches_no_comm(layout, convention):
    case = _bn_case(layout, convention)
    ref, got = {}, {}
    mpi_worker.run_bn(case, 0, None, ref)
    mpi_worker.run_bn(case, 0, LocalComm(), got)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], **TOL, err_msg=key)


class FailingComm:
    """A communicator whose collective always raises."""

    rank, size = 0, 2

    def allreduce_sum(self, buf):
        raise CommError("rank 0 of 2: allreduce_sum failed (fake)", 0, 2)


@pytest.mark.parametrize("layout", ["nd", "nchw"])
def test_failing_comm_raises(layout):
    forward, _ = mpi_worker.bn_functions(layout)
    x = np.random.default_rng(0).normal(size=mpi_worker._shape(layout, 3))
    with pytest.raises(CommError, match="fake"):
        forward(x, np.ones(3), np.zeros(3), {"mode": "train", "comm": FailingComm()})


# ---------------------------------------------------------------------------------------------
# Under mpiexec
# ---------------------------------------------------------------------------------------------

def find_mpiexec():
    """The mpiexec next to this Python (the mpich wheel puts it in the venv's bin), else PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("mpiexec")


# Open MPI's mpiexec refuses to start as root unless told twice (CI and the GPU machine
# run as root); MPICH ignores these. One thread per rank keeps 3 ranks on 2 cores quick.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=1)
def mpi_unusable_reason():
    if importlib.util.find_spec("mpi4py") is None:  # found, not imported: MPI stays uninitialized here
        return "mpi4py is not installed; pip install mpi4py mpich"
    if find_mpiexec() is None:
        return ("no mpiexec next to the Python interpreter or on PATH; pip install mpich "
                "(or install the MPI that mpi4py was built against)")
    return None


def _need_mpi():
    reason = mpi_unusable_reason()
    if reason is None:
        return
    if os.environ.get("GPULAYERS_REQUIRE_MPI") == "1":
        pytest.fail(f"GPULAYERS_REQUIRE_MPI=1 but MPI is unusable: {reason}")
    pytest.skip(reason)


SPLITS = {2: [[4, 4], [5, 3], [0, 6], [6, 0]],
          3: [[3, 3, 3], [1, 5, 2], [4, 0, 3]]}


def bn_cases(size):
    cases = []
    for splits in SPLITS[size]:
        for layout in ("nd", "nchw"):
            for convention in ("cs231n", "torch"):
                name = f"bn-{layout}-{convention}-{'_'.join(map(str, splits))}"
                cases.append({"name": name, "kind": "bn", "layout": layout,
                              "convention": convention, "splits": splits,
                              "seed": [SESSION_SEED, len(cases)], "C": 4 if layout == "nd" else 3, "H": 3, "W": 2})
    splits = SPLITS[size][1]
    for layout, convention in (("nd", "torch"), ("nchw", "cs231n")):
        cases.append({"name": f"layer-{layout}-{convention}", "kind": "bn_layer", "layout": layout,
                      "convention": convention, "splits": splits, "seed": [SESSION_SEED, len(cases)],
                      "C": 3, "H": 2, "W": 2})
    return cases


def error_cases(size):
    return ([{"name": "allreduce", "kind": "allreduce"}]
            + [{"name": f"mismatched_c-{layout}", "kind": "mismatched_c", "layout": layout,
                "convention": "cs231n", "C": 3} for layout in ("nd", "nchw")]
            + [{"name": "flaky-comm", "kind": "flaky", "fail_rank": size - 1},
               {"name": "flaky-bn", "kind": "flaky", "fail_rank": 1, "layout": "nchw"},
               # last: leaves the communicator unusable
               {"name": "absent", "kind": "absent", "fail_rank": size - 1, "timeout": 2.0}])


@functools.lru_cache(maxsize=None)
def _launch(size, outdir):
    """Run every case under ``mpiexec -n size`` once; per-rank (status, arrays)."""
    plan = {"size": size, "timeout": 30.0, "cases": bn_cases(size) + error_cases(size)}
    plan_path = Path(outdir) / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        **MPI_ENV)
    cmd = [find_mpiexec(), "-n", str(size), sys.executable, str(WORKER), str(plan_path), outdir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MPI_TIMEOUT_S,
                              env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)} hung for {MPI_TIMEOUT_S} s\n"
                             f"stdout: {exc.stdout}\nstderr: {exc.stderr}") from None
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited with {proc.returncode}\n"
                                  f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    results = []
    for rank in range(size):
        status = json.loads((Path(outdir) / f"rank{rank}.json").read_text())
        with np.load(Path(outdir) / f"rank{rank}.npz") as data:
            arrays = {key: data[key] for key in data.files}
        results.append((status, arrays))
    return results


@pytest.fixture(scope="module")
def mpi_results(tmp_path_factory):
    def get(size):
        _need_mpi()
        return _launch(size, str(tmp_path_factory.getbasetemp() / f"mpi{size}"))
    for size in SPLITS:
        (tmp_path_factory.getbasetemp() / f"mpi{size}").mkdir(exist_ok=True)
    return get


def _case_results(results, name):
    out = []
    for rank, (status, arrays) in enumerate(results):
        st = status[name]
        assert st["ok"], f"rank {rank}, case {name}: {st['type']}: {st['message']}\n{st['traceback']}"
        prefix = name + "/"
        out.append({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    return out


def _reference(case):
    whole = dict(case, splits=[sum(case["splits"])])
    ref = {}
    runner = mpi_worker.run_bn if case["kind"] == "bn" else mpi_worker.run_bn_layer
    runner(whole, 0, None, ref)
    return ref


PER_SAMPLE = ("out", "dx", "test_out")
SHARED = ("dgamma", "dbeta", "running_mean", "running_var")


@pytest.mark.mpi
@pytest.mark.parametrize("size, name", [(size, c["name"]) for size in SPLITS for c in bn_cases(size)])
def test_sync_bn_equals_whole_batch(mpi_results, size, name):
    case = next(c for c in bn_cases(size) if c["name"] == name)
    ranks = _case_results(mpi_results(size), name)
    ref = _reference(case)
    for key in ref:
        base = key.rstrip("0123456789")
        if base in PER_SAMPLE:
            got = np.concatenate([r[key] for r in ranks], axis=0)
            np.testing.assert_allclose(got, ref[key], **TOL, err_msg=f"{name}: {key}")
        else:
            assert base in SHARED, key
            for rank, r in enumerate(ranks):
                np.testing.assert_allclose(r[key], ref[key], **TOL,
                                           err_msg=f"{name}: {key} on rank {rank}")
                # every rank takes the same optimizer step and keeps the same statistics
                np.testing.assert_array_equal(r[key], ranks[0][key],
                                              err_msg=f"{name}: {key} differs between ranks")
    for rank, r in enumerate(ranks):
        for key in r:
            if key.rstrip("0123456789") in PER_SAMPLE:
                assert r[key].shape[0] == case["splits"][rank], (name, key, rank)


@pytest.mark.mpi
@pytest.mark.parametrize("size", sorted(SPLITS))
def test_mpi_allreduce_sum(mpi_results, size):
    ranks = _case_results(mpi_results(size), "allreduce")
    k = np.arange(size)
    expect = {"f64": np.arange(5.0) * (k + 1).sum() + 0.25 * size,
              "f32": np.full(3, (k + 0.5).sum(), dtype=np.float32),
              "i64": np.array([k.sum(), size * 2**40 + k.sum(), -k.sum()]),
              "empty": np.zeros(0)}
    for r in ranks:
        for key, value in expect.items():
            assert r[key].dtype == value.dtype, key
            np.testing.assert_array_equal(r[key], value, err_msg=key)


def _errors(results, name):
    return [status[name] for status, _ in results]


@pytest.mark.mpi
@pytest.mark.parametrize("size", sorted(SPLITS))
@pytest.mark.parametrize("layout", ["nd", "nchw"])
def test_mismatched_channels_raise_on_every_rank(mpi_results, size, layout):
    for rank, st in enumerate(_errors(mpi_results(size), f"mismatched_c-{layout}")):
        assert not st["ok"], f"rank {rank} did not raise"
        assert st["type"] == "ValueError", f"rank {rank}: {st['type']}: {st['message']}"


@pytest.mark.mpi
@pytest.mark.parametrize("size", sorted(SPLITS))
@pytest.mark.parametrize("name", ["flaky-comm", "flaky-bn"])
def test_local_comm_failure_raises_on_every_rank(mpi_results, size, name):
    for rank, st in enumerate(_errors(mpi_results(size), name)):
        assert not st["ok"], f"rank {rank} did not raise"
        assert st["type"] == "CommError", f"rank {rank}: {st['type']}: {st['message']}"
        assert f"rank {rank} of {size}" in st["message"]
        assert "failed on 1 of" in st["message"]


@pytest.mark.mpi
@pytest.mark.parametrize("size", sorted(SPLITS))
def test_absent_rank_times_out_instead_of_hanging(mpi_results, size):
    errors = _errors(mpi_results(size), "absent")
    assert errors[-1]["type"] == "RuntimeError"
    for rank, st in enumerate(errors[:-1]):
        assert st["type"] == "CommError" and "timed out" in st["message"], (rank, st)


@pytest.mark.mpi
def test_ddp_example_runs(tmp_path):
    """scripts/ddp_example.py: 3 ranks, unequal slices (7 = 3 + 2 + 2), agrees with one process."""
    _need_mpi()
    cmd = [find_mpiexec(), "-n", "3", sys.executable, str(REPO / "scripts" / "ddp_example.py"),
           "--batch", "7", "--steps", "2", "--size", "8", "--channels", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MPI_TIMEOUT_S, cwd=tmp_path,
                          env=dict(os.environ, **MPI_ENV))
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stdout + proc.stderr
