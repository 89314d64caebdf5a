"""Communicators for synchronized batch norm: ``allreduce_sum`` and ``allgather``.

Data-parallel training splits one batch over processes; synchronized batch
norm needs the per-channel statistics of the *whole* batch. The batch-norm code
talks to the other processes only through an object with

- ``allreduce_sum(buf)``: ``buf`` is a small 1-D real array (NumPy or CuPy);
  returns the element-wise sum of every rank's ``buf``, an array of the same
  backend, shape and dtype (a new array; ``buf`` is not modified).
- ``size`` and ``rank``: number of processes and this process's index.

and, optionally (every communicator here has it),

- ``allgather(buf, host=None)``: every rank's ``buf`` stacked in rank order, a
  ``(size, K)`` array of buf's backend and dtype; ``host``: a tuple of host
  numbers summed over the ranks alongside, returned as ``(gathered, sums)``.
- ``checks_sizes = True``: the communicator itself raises :class:`CommSizeError`
  on every rank when the ranks pass different element counts.

Batch norm makes one collective per forward (``allgather`` of every channel's
count, mean and centred M2, ``host=(count,)``, so that the global count is
known on the host without reading the device) and one per backward
(``allreduce_sum`` of ``[dbeta, dgamma]``). With a communicator that has no
``allgather`` it falls back to ``allreduce_sum`` of a zero-padded buffer (an
exact gather) and, unless the communicator ``checks_sizes``, a separate
fixed-size channel check.

Implementations:

- :class:`LocalComm`: one process, the identity (tests, single-GPU runs).
- :class:`MPIComm`: mpi4py; NumPy buffers directly, CuPy buffers staged
  through host memory.
- :class:`NCCLComm`: ``cupy.cuda.nccl`` for CuPy buffers, on the current stream
  (NumPy buffers are staged through the device); :meth:`NCCLComm.from_mpi`
  builds one from an MPI communicator and keeps that for the host header, so
  no call synchronises with the device.
- :class:`TorchDistComm`: a ``torch.distributed`` process group (gloo on the CPU,
  NCCL on GPUs), for PyTorch users (``gpulayers.torch.nn.SyncBatchNorm`` uses it).

mpi4py, CuPy and torch are imported by the constructors, never by this module, so
``import gpulayers`` (and ``import gpulayers.distributed``) works without any of them.

Failures raise on every rank instead of hanging. A collective is only safe
when every rank enters it with the same element count, so each call first
exchanges a fixed-size host header ``[failed, K, K*K, tag]`` (summed over the
ranks), then the data:

- a rank whose local part fails (its buffer cannot be converted, the
  device-to-host copy raises, ...) still enters the header exchange with the
  failure flag set, and then every rank raises :class:`CommError`;
- ranks that pass different element counts all raise :class:`CommSizeError`
  (a CommError and a ValueError) before any data moves; the communicator stays
  usable;
- ``tag`` carries the caller's host numbers (``allgather(host=...)``).

The header is a host collective for MPIComm, for NCCLComm made with an MPI
communicator (``from_mpi`` or ``host_comm=``) and for TorchDistComm on gloo, so
it never reads the device; an NCCLComm without one exchanges it through NCCL
and reads it back (a synchronisation). Errors of the transport itself (mpi4py's
``MPI.Exception``, ``NcclError``) are raised as :class:`CommError` naming the
rank and the operation. A rank that never arrives (it raised *outside* the
communicator, or died) cannot be detected by the others; pass ``timeout=`` to
turn that wait into a :class:`CommError` as well (the wait then polls on the
host). After a CommError (other than a CommSizeError) the communicator must not
be used again: end the job (``mpiexec`` tears down the other ranks when one
exits with an error).
"""
from __future__ import annotations

import time

import numpy as np

from .backend import is_cupy_array

__all__ = ["CommError", "CommSizeError", "LocalComm", "MPIComm", "NCCLComm", "TorchDistComm"]


class CommError(RuntimeError):
    """A collective failed; raised on every rank that could observe it.

    Attributes ``rank``, ``size`` and ``op`` name where and what failed.
    """

    def __init__(self, message, rank=None, size=None, op="allreduce_sum"):
        super().__init__(message)
        self.rank = rank
        self.size = size
        self.op = op


class CommSizeError(CommError, ValueError):
    """The ranks passed buffers of different element counts to one collective (found by
    the fixed-size header before any data moved; the communicator stays usable).

    Attributes as CommError, plus ``count`` (this rank's element count) and
    ``mean_count`` (the mean over the ranks).
    """

    def __init__(self, message, rank=None, size=None, op="allreduce_sum", count=None,
                 mean_count=None):
        super().__init__(message, rank, size, op)
        self.count = count
        self.mean_count = mean_count


def _check_buffer(buf, op="allreduce_sum"):
    """Raise TypeError/ValueError unless ``buf`` is a 1-D real NumPy or CuPy array."""
    if not (isinstance(buf, np.ndarray) or is_cupy_array(buf)):
        raise TypeError(f"{op} needs a NumPy or CuPy array, got {type(buf).__name__}")
    if buf.ndim != 1:
        raise ValueError(f"{op} needs a 1-D array, got shape {tuple(buf.shape)}")
    if buf.dtype.kind not in "iuf":
        raise TypeError(f"{op} needs a real integer or floating array, got dtype {buf.dtype}")


def _check_host(host):
    """``host`` as a tuple of at most one real number (the header carries one tag)."""
    if host is None:
        return ()
    values = tuple(host)
    if len(values) > 1 or not all(isinstance(v, (int, float, np.integer, np.floating))
                                  and not isinstance(v, (bool, np.bool_)) for v in values):
        raise TypeError(f"host must be None or a tuple of one real number, got {host!r}")
    return values


def _check_timeout(timeout):
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")


def _flat_size(buf):
    """Element count to send even when ``buf`` is invalid (keeps the collective in step)."""
    try:
        return int(np.prod(buf.shape))
    except Exception:
        return 0


class _FlaggedComm:
    """Shared frame of MPIComm, NCCLComm and TorchDistComm: a fixed-size float64 host header
    ``[failed, K, K*K, tag]`` summed over the ranks, then the data collective.

    Subclasses implement ``_to_transport(buf)`` (the buffer as the array the transport
    moves), ``_reduce_header(header)`` (the header's sum over ranks, a host float64 array),
    ``_reduce(data)`` (the element-wise sum) and ``_gather(data)`` (the (size, K) stack);
    ``_from_transport`` turns the result back into buf's backend, device and dtype.
    """

    rank = 0
    size = 1
    timeout = None
    checks_sizes = True

    def allreduce_sum(self, buf):
        """Sum ``buf`` over all ranks.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy; K must be equal on
          all ranks

        Returns:
        - out: array of shape (K,) with buf's backend and dtype, the sum over
          ranks (float64 arithmetic for MPI and torch, integers rounded back; NCCL
          sums float32, float64 and 32/64-bit integers in their own dtype)

        Raises CommError on every rank when the call fails on any rank,
        CommSizeError on every rank when the ranks' K differ, or CommError on this
        rank when the transport fails or the timeout expires.
        """
        data, n, _ = self._enter("allreduce_sum", buf, ())
        out = self._transport("allreduce_sum", n, self._reduce, data)
        return self._result("allreduce_sum", n, out, buf)

    def allgather(self, buf, host=None):
        """Every rank's ``buf``, stacked in rank order.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy; K must be equal on
          all ranks
        - host: None, or a tuple of one host number summed over the ranks in the
          header (no extra collective, no device read)

        Returns:
        - out: array of shape (size, K) with buf's backend and dtype; row r is rank
          r's buf (exact: nothing is added)
        - with ``host``: the tuple ``(out, sums)``, sums a tuple of floats

        Raises as allreduce_sum.
        """
        data, n, sums = self._enter("allgather", buf, _check_host(host))
        out = self._transport("allgather", n, self._gather, data)
        out = self._result("allgather", n, out, buf)
        return out if host is None else (out, sums)

    def _enter(self, op, buf, host):
        """Stage buf and exchange the header; (transport data, K, the host sums)."""
        n = _flat_size(buf)
        local_error = None
        try:
            _check_buffer(buf, op)
            data = self._to_transport(buf)
        except Exception as exc:  # still enter the header exchange, flagged
            local_error = exc
            data = None
        header = np.zeros(4, dtype=np.float64)
        header[:3] = (1.0 if local_error is not None else 0.0, n, float(n) * n)
        if host:
            header[3] = float(host[0])
        total = self._transport(op, n, self._reduce_header, header)
        failed = int(round(float(total[0])))
        if failed:
            where = (f"here: {type(local_error).__name__}: {local_error}" if local_error is not None
                     else "not here")
            raise CommError(f"rank {self.rank} of {self.size}: {op} of {n} elements "
                            f"failed on {failed} of {self.size} ranks ({where})",
                            self.rank, self.size, op) from local_error
        if total[1] * total[1] != self.size * total[2]:
            mean = total[1] / self.size
            raise CommSizeError(f"rank {self.rank} of {self.size}: {op}: the ranks passed "
                                f"different element counts (this rank {n}, the mean over "
                                f"{self.size} ranks {mean:g}); nothing was exchanged",
                                self.rank, self.size, op, n, mean)
        return data, n, tuple(float(v) for v in total[3:3 + len(host)])

    def _transport(self, op, n, step, payload):
        try:
            return step(payload)
        except CommError:
            raise
        except Exception as exc:
            raise CommError(f"rank {self.rank} of {self.size}: {op} of {n} elements "
                            f"failed in {type(self).__name__}: {type(exc).__name__}: {exc}",
                            self.rank, self.size, op) from exc

    def _result(self, op, n, out, buf):
        try:
            return self._from_transport(out, buf)
        except Exception as exc:
            raise CommError(f"rank {self.rank} of {self.size}: {op} of {n} elements: "
                            f"copying the result back failed: {type(exc).__name__}: {exc}",
                            self.rank, self.size, op) from exc

    @staticmethod
    def _from_transport(reduced, like):
        """The transported result as an array of ``like``'s backend, device and dtype."""
        if reduced.dtype == like.dtype and is_cupy_array(reduced) == is_cupy_array(like):
            return reduced   # already a new array of the right kind
        if like.dtype.kind != "f" and reduced.dtype.kind == "f":
            reduced = reduced.round()
        out = reduced.astype(like.dtype, copy=True)
        if is_cupy_array(like) and not is_cupy_array(out):
            import cupy
            with like.device:
                out = cupy.asarray(out)
        elif not is_cupy_array(like) and is_cupy_array(out):
            out = out.get()
        return out

    def _deadline_wait(self, done, on_timeout, n, op="allreduce_sum"):
        """Poll ``done()`` until it is True or ``self.timeout`` seconds pass."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        while not done():
            if time.monotonic() > deadline:
                on_timeout()
                raise CommError(f"rank {self.rank} of {self.size}: {op} of {n} "
                                f"elements timed out after {self.timeout} s (another rank "
                                "failed or never called it); this communicator is unusable now",
                                self.rank, self.size, op)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalComm:
    """A single-process communicator: ``allreduce_sum`` returns a copy of its input,
    ``allgather`` the input as one row.

    Batch norm with ``bn_param['comm'] = LocalComm()`` computes what it computes without a
    communicator (to rounding); tests use it to run the comm code path in one process.
    """

    rank = 0
    size = 1
    checks_sizes = True   # one rank: sizes always agree

    def allreduce_sum(self, buf):
        """Sum over one rank.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy

        Returns:
        - out: a copy of buf (same backend, shape and dtype)
        """
        _check_buffer(buf)
        return buf.copy()

    def allgather(self, buf, host=None):
        """Gather over one rank.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy
        - host: None or a tuple of one host number

        Returns:
        - out: a (1, K) copy of buf; with ``host``: ``(out, sums)``, sums the host
          numbers as floats
        """
        _check_buffer(buf, "allgather")
        values = _check_host(host)
        out = buf.reshape(1, -1).copy()
        return out if host is None else (out, tuple(float(v) for v in values))

    def __repr__(self):
        return "LocalComm()"


class MPIComm(_FlaggedComm):
    """``allreduce_sum`` and ``allgather`` over an MPI communicator (mpi4py).

    NumPy buffers are reduced directly; CuPy buffers are copied to the host,
    reduced and copied back to the device they came from (the buffers are a
    few per-channel numbers, so staging costs little and needs no CUDA-aware
    MPI; it does synchronise with the device: use NCCLComm for that).

    Inputs:
    - comm: an ``mpi4py.MPI.Comm``; default ``MPI.COMM_WORLD``
    - timeout: None (block, the default) or seconds after which a rank still
      waiting for the others raises CommError (uses non-blocking
      ``Iallreduce`` / ``Iallgather`` polled with short sleeps)
    """

    def __init__(self, comm=None, timeout=None):
        _check_timeout(timeout)
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("MPIComm needs mpi4py (pip install mpi4py mpich)") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = timeout

    def _to_transport(self, buf):
        if is_cupy_array(buf):
            buf = buf.get()
        return np.ascontiguousarray(buf, dtype=np.float64)

    def _wait(self, request, n):
        self._deadline_wait(request.Test, lambda: None, n)

    def _reduce_header(self, header):
        return self._reduce(header)

    def _reduce(self, payload):
        out = np.empty_like(payload)
        MPI = self._MPI
        if self.timeout is None:
            self.comm.Allreduce(payload, out, op=MPI.SUM)
        else:
            self._wait(self.comm.Iallreduce(payload, out, op=MPI.SUM), payload.size)
        return out

    def _gather(self, payload):
        out = np.empty((self.size, payload.size), dtype=payload.dtype)
        if self.timeout is None:
            self.comm.Allgather(payload, out)
        else:
            self._wait(self.comm.Iallgather(payload, out), payload.size)
        return out


# numpy dtype name -> cupy.cuda.nccl constant name; all-reduce sums these in their own dtype
_NCCL_SUM = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32",
             "int64": "NCCL_INT64", "uint32": "NCCL_UINT32", "uint64": "NCCL_UINT64"}
_NCCL_MOVE = dict(_NCCL_SUM, float16="NCCL_FLOAT16", int8="NCCL_INT8", uint8="NCCL_UINT8")


class NCCLComm(_FlaggedComm):
    """``allreduce_sum`` and ``allgather`` over an NCCL communicator (``cupy.cuda.nccl``),
    one GPU per rank.

    The collectives run on the current CuPy stream of the communicator's device, in the
    buffer's own dtype where NCCL has it (float32/float64 and 32/64-bit integers for the
    sum; also float16 and 8-bit integers for the gather; others go through float64): no
    conversion kernel for a float32 or float64 CuPy buffer, and no synchronisation with
    the device. NumPy buffers are staged through the device and come back as NumPy
    arrays.

    The header (failure flag, element count, host tag) goes over ``host_comm`` on the host
    when there is one (:meth:`from_mpi` passes its MPI communicator); without one it goes
    through NCCL and is read back, which synchronises with the device.

    Inputs:
    - comm: a ``cupy.cuda.nccl.NcclCommunicator``, or a tuple
      ``(nranks, unique_id, rank)`` to create one on the current device
      (``unique_id`` from ``nccl.get_unique_id()`` on one rank, shared with
      the others)
    - timeout: None (wait on the stream, the default) or seconds after which
      a rank still waiting aborts the NCCL communicator and raises CommError (the
      wait then polls an event from the host)
    - host_comm: None, an ``mpi4py.MPI.Comm`` or an MPIComm over the same ranks
      (same rank numbers), for the host header

    Use :meth:`from_mpi` to create the communicator from an MPI job.
    """

    def __init__(self, comm, timeout=None, host_comm=None):
        _check_timeout(timeout)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            raise ImportError("NCCLComm needs CuPy with NCCL support "
                              "(pip install cupy-cuda12x; nccl via cupy's installer)") from exc
        if not getattr(nccl, "available", True):
            raise ImportError("this CuPy build has no NCCL support")
        if isinstance(comm, tuple):
            if len(comm) != 3:
                raise ValueError("NCCLComm needs an NcclCommunicator or (nranks, unique_id, rank), "
                                 f"got a tuple of {len(comm)} items")
            nranks, unique_id, rank = comm
            if isinstance(unique_id, list):  # e.g. after a JSON round trip
                unique_id = tuple(unique_id)
            # passed on as nccl.get_unique_id() made it: bytes on CuPy 14, a tuple before
            comm = nccl.NcclCommunicator(int(nranks), unique_id, int(rank))
        elif not isinstance(comm, nccl.NcclCommunicator):
            raise TypeError("NCCLComm needs an NcclCommunicator or (nranks, unique_id, rank), "
                            f"got {type(comm).__name__}")
        self._cupy = cupy
        self._nccl = nccl
        self.comm = comm
        self.rank = comm.rank_id()
        self.size = comm.size()
        self.device_id = comm.device_id()
        self.timeout = timeout
        self._host = None
        if host_comm is not None:
            host = host_comm if isinstance(host_comm, MPIComm) else MPIComm(host_comm, timeout)
            if (host.rank, host.size) != (self.rank, self.size):
                raise ValueError(f"host_comm has rank {host.rank} of {host.size}, the NCCL "
                                 f"communicator rank {self.rank} of {self.size}")
            self._host = host

    @classmethod
    def from_mpi(cls, mpi_comm=None, device=None, timeout=None):
        """An NCCLComm over the same processes as an MPI communicator, which it keeps for
        the host header (so no call synchronises with the device).

        Rank 0 creates the NCCL unique id and broadcasts it over MPI; every
        rank then joins the NCCL communicator on its device.

        Inputs:
        - mpi_comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``) or an
          MPIComm
        - device: CUDA device id for this rank; default: the current device
          (call ``cupy.cuda.Device(rank % n_devices).use()`` first)
        - timeout: as in NCCLComm

        Returns:
        - comm: NCCLComm with the MPI communicator's size and rank
        """
        from cupy.cuda import Device, nccl
        if isinstance(mpi_comm, MPIComm):
            mpi_comm = mpi_comm.comm
        if mpi_comm is None:
            from mpi4py import MPI
            mpi_comm = MPI.COMM_WORLD
        rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        unique_id = nccl.get_unique_id() if rank == 0 else None
        unique_id = mpi_comm.bcast(unique_id, root=0)
        if device is not None:
            Device(device).use()
        return cls((size, unique_id, rank), timeout=timeout, host_comm=mpi_comm)

    def _to_transport(self, buf):
        cupy = self._cupy
        with cupy.cuda.Device(self.device_id):
            a = cupy.asarray(buf)   # an upload for NumPy; CuPy buffers stay as they are
            if a.dtype.name not in _NCCL_MOVE:
                a = a.astype(cupy.float64)
            return cupy.ascontiguousarray(a)

    def _dtype(self, a, table):
        return getattr(self._nccl, table[a.dtype.name])

    def _finish(self, stream, n):
        if self.timeout is not None:
            event = stream.record()
            self._deadline_wait(lambda: event.done, self.comm.abort, n)
        check = getattr(self.comm, "check_async_error", None)   # a host query, no sync
        if check is not None:
            check()

    def _reduce_header(self, header):
        if self._host is not None:
            return self._host._reduce(header)   # host MPI: no device access
        cupy = self._cupy
        with cupy.cuda.Device(self.device_id):
            return self._reduce(cupy.asarray(header)).get()   # synchronises

    def _reduce(self, payload):
        cupy, nccl = self._cupy, self._nccl
        with cupy.cuda.Device(self.device_id):
            if payload.dtype.name not in _NCCL_SUM:
                payload = payload.astype(cupy.float64)
            out = cupy.empty_like(payload)
            stream = cupy.cuda.get_current_stream()
            self.comm.allReduce(payload.data.ptr, out.data.ptr, payload.size,
                                self._dtype(payload, _NCCL_SUM), nccl.NCCL_SUM, stream.ptr)
            self._finish(stream, payload.size)
        return out

    def _gather(self, payload):
        cupy = self._cupy
        with cupy.cuda.Device(self.device_id):
            out = cupy.empty((self.size, payload.size), dtype=payload.dtype)
            stream = cupy.cuda.get_current_stream()
            self.comm.allGather(payload.data.ptr, out.data.ptr, payload.size,
                                self._dtype(payload, _NCCL_MOVE), stream.ptr)
            self._finish(stream, payload.size)
        return out


class TorchDistComm(_FlaggedComm):
    """``allreduce_sum`` and ``allgather`` over a ``torch.distributed`` process group.

    The buffer crosses to a torch tensor (``torch.from_numpy`` / ``torch.from_dlpack``) and
    is copied to float64 on the group's device (the CPU for gloo, the current CUDA device
    for NCCL; so NumPy buffers work over NCCL and CuPy buffers over gloo, staged), reduced
    with ``dist.all_reduce`` or gathered with ``dist.all_gather``; the result is a new
    array of the buffer's backend, device and dtype (the buffer is not modified). The
    header and ``timeout`` work as in :class:`MPIComm` (on an NCCL group the header is read
    back from the device).

    Inputs:
    - group: a process group (``dist.new_group(...)``) or None, the default group;
      torch.distributed must be initialised (``dist.init_process_group``)
    - timeout: None (block, the default) or seconds after which a rank still waiting
      raises CommError (``async_op`` collectives polled with short sleeps)
    """

    def __init__(self, group=None, timeout=None):
        _check_timeout(timeout)
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:
            raise ImportError("TorchDistComm needs PyTorch (pip install torch)") from exc
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistComm needs torch.distributed initialised first "
                               "(torch.distributed.init_process_group)")
        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = timeout

    def _device(self):
        torch = self._torch
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _to_transport(self, buf):
        torch = self._torch
        t = torch.from_dlpack(buf) if is_cupy_array(buf) else torch.from_numpy(
            np.ascontiguousarray(buf))
        return t.to(device=self._device(), dtype=torch.float64, copy=True)

    def _wait(self, work, n):
        if self.timeout is not None:
            self._deadline_wait(work.is_completed, lambda: None, n)
        work.wait()

    def _reduce_header(self, header):
        out = self._reduce(self._torch.from_numpy(header).to(self._device()))
        return out.get() if is_cupy_array(out) else out

    def _reduce(self, payload):
        dist = self._dist
        work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._wait(work, payload.numel())
        return self._back(payload)

    def _gather(self, payload):
        torch, dist = self._torch, self._dist
        rows = [torch.empty_like(payload) for _ in range(self.size)]
        work = dist.all_gather(rows, payload, group=self.group, async_op=True)
        self._wait(work, payload.numel())
        return self._back(torch.stack(rows))

    @staticmethod
    def _back(t):
        if t.device.type == "cuda":
            import cupy
            return cupy.from_dlpack(t)
        return t.numpy()
