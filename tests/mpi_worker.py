"""One rank of the synchronized-batch-norm tests; run by tests/test_distributed.py as

    mpiexec -n K python tests/mpi_worker.py PLAN.json OUTDIR

PLAN.json is ``{"size": K, "cases": [...]}``. Every rank builds the same full
batch from the case's seed, keeps its slice ``splits[rank]`` of it and runs
the case with an MPIComm; it writes OUTDIR/rank{r}.npz (arrays, keys prefixed
by the case name) and OUTDIR/rank{r}.json (per case: "ok" or the exception
type and message). The checks live in the test file, which recomputes the
single-process reference on the full batch.

Cases (``kind``):
- ``bn``: training steps with a comm, then a test-mode forward
  (layout "nd" = batchnorm_*, "nchw" = spatial_batchnorm_*)
- ``bn_layer``: the same through the BatchNorm1d/2d layer classes
- ``allreduce``: MPIComm.allreduce_sum on a few dtypes and sizes
- ``mismatched_c``: rank r has C + r channels; must raise on every rank
- ``flaky``: the comm fails locally on rank ``fail_rank``; must raise everywhere
- ``absent``: rank ``fail_rank`` raises before calling the comm; the others
  must time out with CommError (run last: it leaves the comm unusable)
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpulayers.distributed import MPIComm  # noqa: E402

STEPS = 2  # training steps per bn case: running stats see two updates


def full_batch(case, step):
    """The whole batch of one step: x, dout (float64), and gamma, beta."""
    rng = np.random.default_rng([*case["seed"], step])
    n, c = sum(case["splits"]), case["C"]
    shape = (n, c) if case["layout"] == "nd" else (n, c, case["H"], case["W"])
    x = rng.normal(3.0, 2.0, size=shape) * (1 + np.arange(c)).reshape((1, c) + (1,) * (len(shape) - 2))
    dout = rng.normal(size=shape)
    gamma = rng.uniform(0.5, 1.5, size=c)
    beta = rng.normal(size=c)
    return x, dout, gamma, beta


def rank_slice(splits, rank):
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def bn_functions(layout):
    from gpulayers import batchnorm
    if layout == "nd":
        return batchnorm.batchnorm_forward, batchnorm.batchnorm_backward
    return batchnorm.spatial_batchnorm_forward, batchnorm.spatial_batchnorm_backward


def run_bn(case, rank, comm, out):
    """Forward/backward on this rank's slice for STEPS steps; one test-mode forward.

    With comm=None (and one split) this is the single-process reference.
    """
    forward, backward = bn_functions(case["layout"])
    sl = rank_slice(case["splits"], rank)
    bn_param = {"mode": "train", "eps": 1e-5, "momentum": 0.9, "convention": case["convention"]}
    if comm is not None:
        bn_param["comm"] = comm
    for step in range(STEPS):
        x, dout, gamma, beta = full_batch(case, step)
        y, cache = forward(x[sl], gamma, beta, bn_param)
        dx, dgamma, dbeta = backward(dout[sl], cache)
        for name, value in (("out", y), ("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta)):
            out[f"{name}{step}"] = value
    out["running_mean"] = bn_param["running_mean"]
    out["running_var"] = bn_param["running_var"]
    bn_param["mode"] = "test"
    x, _, gamma, beta = full_batch(case, STEPS)
    out["test_out"], _ = forward(x[sl], gamma, beta, bn_param)


def run_bn_layer(case, rank, comm, out):
    """As run_bn, through the layer classes (BatchNorm1d for "nd", BatchNorm2d for "nchw")."""
    from gpulayers import layers
    cls = layers.BatchNorm1d if case["layout"] == "nd" else layers.BatchNorm2d
    sl = rank_slice(case["splits"], rank)
    _, _, gamma, beta = full_batch(case, 0)
    layer = cls(case["C"], eps=1e-5, momentum=0.9, convention=case["convention"], comm=comm,
                dtype=np.float64)
    layer.params["gamma"][...] = gamma
    layer.params["beta"][...] = beta
    for step in range(STEPS):
        x, dout, _, _ = full_batch(case, step)
        layer.train()
        out[f"out{step}"] = layer.forward(x[sl])
        out[f"dx{step}"] = layer.backward(dout[sl])
        out[f"dgamma{step}"] = layer.grads["gamma"].copy()
        out[f"dbeta{step}"] = layer.grads["beta"].copy()
    out["running_mean"] = layer.buffers["running_mean"]
    out["running_var"] = layer.buffers["running_var"]
    layer.eval()
    x, _, _, _ = full_batch(case, STEPS)
    out["test_out"] = layer.forward(x[sl])


def run_allreduce(case, rank, comm, out):
    """allreduce_sum of rank-dependent buffers: float64, float32, int64 and empty."""
    r = comm.rank
    out["f64"] = comm.allreduce_sum(np.arange(5, dtype=np.float64) * (r + 1) + 0.25)
    out["f32"] = comm.allreduce_sum(np.full(3, r + 0.5, dtype=np.float32))
    out["i64"] = comm.allreduce_sum(np.array([r, 2**40 + r, -r], dtype=np.int64))
    out["empty"] = comm.allreduce_sum(np.zeros(0))


def _shape(layout, c):
    return (4, c) if layout == "nd" else (4, c, 3, 2)


def run_mismatched_c(case, rank, comm, out):
    forward, _ = bn_functions(case["layout"])
    c = case["C"] + rank
    x = np.random.default_rng(rank).normal(size=_shape(case["layout"], c))
    bn_param = {"mode": "train", "convention": case["convention"], "comm": comm}
    forward(x, np.ones(c), np.zeros(c), bn_param)


class FlakyMPIComm(MPIComm):
    """An MPIComm whose local staging step raises on one rank."""

    def __init__(self, fail_rank, **kwargs):
        super().__init__(**kwargs)
        self.fail_rank = fail_rank

    def _to_transport(self, buf):
        if self.rank == self.fail_rank:
            raise OSError("injected failure while staging the buffer")
        return super()._to_transport(buf)


def run_flaky(case, rank, comm, out):
    flaky = FlakyMPIComm(case["fail_rank"], comm=comm.comm, timeout=comm.timeout)
    if case.get("layout"):
        forward, _ = bn_functions(case["layout"])
        x = np.random.default_rng(rank).normal(size=_shape(case["layout"], 3))
        forward(x, np.ones(3), np.zeros(3), {"mode": "train", "comm": flaky})
    else:
        flaky.allreduce_sum(np.ones(4))


def run_absent(case, rank, comm, out):
    if rank == case["fail_rank"]:
        raise RuntimeError("this rank fails before reaching the collective")
    short = MPIComm(comm=comm.comm, timeout=case["timeout"])
    short.allreduce_sum(np.ones(2))


RUNNERS = {"bn": run_bn, "bn_layer": run_bn_layer, "allreduce": run_allreduce,
           "mismatched_c": run_mismatched_c, "flaky": run_flaky, "absent": run_absent}


def main(plan_path, outdir):
    with open(plan_path) as f:
        plan = json.load(f)
    comm = MPIComm(timeout=plan.get("timeout", 30.0))
    if comm.size != plan["size"]:
        raise SystemExit(f"mpi_worker: MPI reports {comm.size} ranks, mpiexec was asked for "
                         f"{plan['size']}: mpiexec and mpi4py use different MPI libraries")
    arrays, status = {}, {}
    for case in plan["cases"]:
        out = {}
        try:
            RUNNERS[case["kind"]](case, comm.rank, comm, out)
            status[case["name"]] = {"ok": True}
        except Exception as exc:
            status[case["name"]] = {"ok": False, "type": type(exc).__name__, "message": str(exc),
                                    "traceback": traceback.format_exc()}
        for key, value in out.items():
            arrays[f"{case['name']}/{key}"] = np.asarray(value)
    np.savez(os.path.join(outdir, f"rank{comm.rank}.npz"), **arrays)
    with open(os.path.join(outdir, f"rank{comm.rank}.json"), "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
