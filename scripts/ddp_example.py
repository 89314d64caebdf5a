"""Data-parallel training steps of max pool + synchronized spatial batch norm.

    mpiexec -n 2 python scripts/ddp_example.py                       # NumPy, MPI
    mpiexec -n 4 python scripts/ddp_example.py --batch 30            # unequal slices
    mpiexec -n 2 python scripts/ddp_example.py --backend cupy --comm nccl   # one GPU per rank

Every rank builds the same global batch from the seed and keeps its slice of
it (``numpy.array_split``: slices may differ in size, or be empty). The model
is ``MaxPool2d(2) -> BatchNorm2d(C, comm=...)`` with the loss
``0.5 * sum((y - target)**2) / (N * C * H/2 * W/2)`` over the global batch of
N samples; each
step does forward, backward and an SGD update of gamma and beta.

BatchNorm2d with a communicator normalizes with the statistics of the whole
batch and returns dgamma/dbeta summed over it, so all ranks take the same
update and keep identical parameters and running statistics -- no separate
gradient all-reduce is needed for BN. The script prints, per step, each
rank's loss share and the global loss, and at the end the largest difference
between ranks and against one process computing the whole batch (--check,
on by default).

A run that cannot start here (CuPy not usable for --backend cupy, no NCCL in
CuPy for --comm nccl, mpi4py missing) says why in one line on stderr and
exits 2, before any work.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpulayers  # noqa: E402
from gpulayers import backend  # noqa: E402
from gpulayers.distributed import MPIComm, NCCLComm  # noqa: E402
from gpulayers.layers import BatchNorm2d, MaxPool2d  # noqa: E402


def _at_least(lowest, kind=int):
    """argparse type: a number of ``kind`` that is >= ``lowest``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number >= {lowest}, got {text!r}") from None
        if not value >= lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {text}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--comm", choices=["mpi", "nccl"], default="mpi",
                   help="all-reduce through MPI (host) or NCCL (needs --backend cupy)")
    p.add_argument("--batch", type=_at_least(1), default=16, help="global batch size N")
    p.add_argument("--channels", type=_at_least(1), default=8)
    p.add_argument("--size", type=_at_least(2), default=16, help="input height and width")
    p.add_argument("--steps", type=_at_least(1), default=3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--convention", choices=["cs231n", "torch"], default="torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="seconds a rank waits for the others before raising CommError")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the single-process reference on rank 0")
    args = p.parse_args(argv)
    if args.comm == "nccl" and args.backend != "cupy":
        p.error("--comm nccl needs --backend cupy")
    if args.batch * (args.size // 2) ** 2 < 2:
        p.error(f"batch norm in train mode needs more than one value per channel: --batch "
                f"{args.batch} of {args.size}x{args.size} inputs pools to "
                f"{args.batch * (args.size // 2) ** 2} value(s) per channel")
    return args


def unusable_reason(args):
    """Why this run cannot start on this machine (one line), or None when it can."""
    if args.backend == "cupy":
        reason = backend.cupy_unusable_reason()
        if reason:
            return f"--backend cupy: CuPy is not usable: {reason}"
    if args.comm == "nccl":
        try:
            from cupy.cuda import nccl
        except Exception as exc:
            return f"--comm nccl: CuPy has no NCCL ({type(exc).__name__}: {exc})"
        if not getattr(nccl, "available", True):
            return "--comm nccl: this CuPy build has no NCCL support"
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception as exc:
        return (f"--comm {args.comm}: mpi4py does not import ({type(exc).__name__}: {exc}); "
                "pip install mpi4py mpich, and start with mpiexec -n RANKS")
    return None


def global_batch(args, step):
    """(x, target) of the whole batch at ``step``: x (N, C, S, S), target (N, C, S/2, S/2)."""
    rng = np.random.default_rng([args.seed, step])
    n, c, s = args.batch, args.channels, args.size
    x = rng.normal(2.0, 3.0, size=(n, c, s, s))
    target = rng.normal(size=(n, c, s // 2, s // 2))
    return x, target


def make_model(args, comm):
    pool = MaxPool2d(2)
    bn = BatchNorm2d(args.channels, convention=args.convention, comm=comm, dtype=np.float64)
    return pool, bn


def train_step(pool, bn, x, target, n_global, lr):
    """Forward, backward and SGD on gamma/beta; returns this slice's share of the loss.

    The loss is the mean over the global batch of 0.5 * (y - target)**2,
    averaged over the elements of a sample too.
    """
    y = bn.forward(pool.forward(x))
    diff = y - target
    denom = n_global * int(np.prod(y.shape[1:]))
    loss_share = 0.5 * float((diff * diff).sum()) / denom
    dy = diff / denom
    pool.backward(bn.backward(dy))
    for name in ("gamma", "beta"):
        bn.params[name] = bn.params[name] - lr * bn.grads[name]
    return loss_share


def state(bn):
    """gamma, beta, running mean and var as one NumPy vector."""
    return np.concatenate([backend.to_numpy(v) for v in
                           (bn.params["gamma"], bn.params["beta"],
                            bn.buffers["running_mean"], bn.buffers["running_var"])])


def main(argv=None):
    args = parse_args(argv)
    reason = unusable_reason(args)
    if reason:
        print(f"ddp_example: cannot run here: {reason}", file=sys.stderr, flush=True)
        return 2
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()

    if args.backend == "cupy":
        import cupy
        device = rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(device).use()
    gpulayers.set_backend(args.backend)
    if args.comm == "nccl":
        comm = NCCLComm.from_mpi(world, timeout=args.timeout)
    else:
        comm = MPIComm(world, timeout=args.timeout)

    pool, bn = make_model(args, comm)
    bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(args.batch), size)])
    sl = slice(int(bounds[rank]), int(bounds[rank + 1]))
    rows = sl.stop - sl.start
    losses = []
    for step in range(args.steps):
        x, target = global_batch(args, step)
        share = train_step(pool, bn, gpulayers.asarray(x[sl]), gpulayers.asarray(target[sl]),
                           args.batch, args.lr)
        total = float(comm.allreduce_sum(np.array([share]))[0])
        losses.append(total)
        lines = world.gather(f"  rank {rank}: {rows:3d} samples, loss share {share:.6f}", root=0)
        if rank == 0:
            print(f"step {step}: global loss {total:.12f}")
            print("\n".join(lines))

    mine = state(bn)
    everyone = world.gather(mine, root=0)
    ok = True
    if rank == 0:
        spread = max(float(np.max(np.abs(s - everyone[0]))) for s in everyone)
        print(f"{size} ranks over {comm!r}, backend {args.backend}: largest difference between "
              f"ranks in gamma/beta/running stats: {spread:.3e}")
        if args.check:
            ref_pool, ref_bn = make_model(args, None)
            ref_losses = []
            for step in range(args.steps):
                x, target = global_batch(args, step)
                ref_losses.append(train_step(ref_pool, ref_bn, gpulayers.asarray(x),
                                             gpulayers.asarray(target), args.batch, args.lr))
            err_state = float(np.max(np.abs(state(ref_bn) - mine)))
            err_loss = max(abs(a - b) for a, b in zip(ref_losses, losses))
            print(f"against one process on the whole batch: state {err_state:.3e}, "
                  f"loss {err_loss:.3e}")
            ok = err_state < 1e-10 and err_loss < 1e-10
        ok = ok and spread == 0.0
        print("OK" if ok else "MISMATCH", flush=True)
    return 0 if world.bcast(ok, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
