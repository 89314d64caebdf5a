"""Communicators for synchronized batch norm: one collective, ``allreduce_sum``.

Data-parallel training splits one batch over processes; synchronized batch
norm needs the per-channel sums of the *whole* batch. The batch-norm code
talks to the other processes only through an object with

- ``allreduce_sum(buf)``: ``buf`` is a small 1-D real array (NumPy or CuPy);
  returns the element-wise sum of every rank's ``buf``, an array of the same
  backend, shape and dtype (a new array; ``buf`` is not modified).
- ``size`` and ``rank``: number of processes and this process's index.

Implementations:

- :class:`LocalComm`: one process, the identity (tests, single-GPU runs).
- :class:`MPIComm`: mpi4py; NumPy buffers directly, CuPy buffers staged
  through host memory.
- :class:`NCCLComm`: ``cupy.cuda.nccl`` for CuPy buffers (NumPy buffers are
  staged through the device); :meth:`NCCLComm.from_mpi` builds one from an
  MPI communicator.
- :class:`TorchDistComm`: a ``torch.distributed`` process group (gloo on the CPU,
  NCCL on GPUs), for PyTorch users (``gpulayers.torch.nn.SyncBatchNorm`` uses it).

mpi4py, CuPy and torch are imported by the constructors, never by this module, so
``import gpulayers`` (and ``import gpulayers.distributed``) works without any of them.

Failures raise on every rank instead of hanging. A collective is only safe
when every rank enters it with the same element count, so each call sends one
extra element, a failure flag, ahead of the data: a rank whose local part
fails (its buffer cannot be converted, the device-to-host copy raises, ...)
still enters the collective with the flag set and zeros as data, and then
every rank raises :class:`CommError`. Errors of the transport itself (mpi4py's
``MPI.Exception``, ``NcclError``) are raised as :class:`CommError` naming the
rank and the operation. A rank that never arrives (it raised *outside* the
communicator, or died) cannot be detected by the others; pass ``timeout=`` to
turn that wait into a :class:`CommError` as well. After a CommError the
communicator must not be used again: end the job (``mpiexec`` tears down the
other ranks when one exits with an error).

Agreement on the element count is the caller's job: batch norm first reduces
a fixed-size header ``[1, C, C*C]`` and raises ``ValueError`` on every rank
when the channel counts differ.
"""
from __future__ import annotations

import time

import numpy as np

from .backend import is_cupy_array

__all__ = ["CommError", "LocalComm", "MPIComm", "NCCLComm", "TorchDistComm"]


class CommError(RuntimeError):
    """A collective failed; raised on every rank that could observe it.

    Attributes ``rank``, ``size`` and ``op`` name where and what failed.
    """

    def __init__(self, message, rank=None, size=None, op="allreduce_sum"):
        super().__init__(message)
        self.rank = rank
        self.size = size
        self.op = op


def _check_buffer(buf):
    """Raise TypeError/ValueError unless ``buf`` is a 1-D real NumPy or CuPy array."""
    if not (isinstance(buf, np.ndarray) or is_cupy_array(buf)):
        raise TypeError(f"allreduce_sum needs a NumPy or CuPy array, got {type(buf).__name__}")
    if buf.ndim != 1:
        raise ValueError(f"allreduce_sum needs a 1-D array, got shape {tuple(buf.shape)}")
    if buf.dtype.kind not in "iuf":
        raise TypeError(f"allreduce_sum needs a real integer or floating array, got dtype {buf.dtype}")


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
    """Shared frame of MPIComm and NCCLComm: failure flag + data in one float64 collective.

    Subclasses implement ``_to_transport(buf)`` (the buffer as the float64
    array the transport reduces), ``_payload(data, n, failed)`` (the array
    ``[flag, data...]``) and ``_reduce(payload)`` (the collective).
    """

    rank = 0
    size = 1
    timeout = None

    def allreduce_sum(self, buf):
        """Sum ``buf`` over all ranks.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy; K must be equal on
          all ranks

        Returns:
        - out: array of shape (K,) with buf's backend and dtype, the sum over
          ranks (float64 arithmetic; integers are rounded back)

        Raises CommError on every rank when the call fails on any rank, or on
        this rank when the transport fails or the timeout expires.
        """
        n = _flat_size(buf)
        local_error = None
        try:
            _check_buffer(buf)
            data = self._to_transport(buf)
        except Exception as exc:  # still enter the collective, flagged
            local_error = exc
            data = None
        try:
            reduced = self._reduce(self._payload(data, n, failed=local_error is not None))
        except CommError:
            raise
        except Exception as exc:
            raise CommError(f"rank {self.rank} of {self.size}: allreduce_sum of {n} elements "
                            f"failed in {type(self).__name__}: {type(exc).__name__}: {exc}",
                            self.rank, self.size) from exc
        failed = int(round(float(reduced[0])))
        if failed:
            where = (f"here: {type(local_error).__name__}: {local_error}" if local_error is not None
                     else "not here")
            raise CommError(f"rank {self.rank} of {self.size}: allreduce_sum of {n} elements "
                            f"failed on {failed} of {self.size} ranks ({where})",
                            self.rank, self.size) from local_error
        try:
            return self._from_transport(reduced[1:], buf)
        except Exception as exc:
            raise CommError(f"rank {self.rank} of {self.size}: allreduce_sum of {n} elements: "
                            f"copying the result back failed: {type(exc).__name__}: {exc}",
                            self.rank, self.size) from exc

    @staticmethod
    def _from_transport(reduced, like):
        """The reduced float64 data as an array of ``like``'s backend, device and dtype."""
        if like.dtype.kind != "f":
            reduced = reduced.round()
        out = reduced.astype(like.dtype, copy=True)
        if is_cupy_array(like) and not is_cupy_array(out):
            import cupy
            with like.device:
                out = cupy.asarray(out)
        elif not is_cupy_array(like) and is_cupy_array(out):
            out = out.get()
        return out

    def _deadline_wait(self, done, on_timeout, n):
        """Poll ``done()`` until it is True or ``self.timeout`` seconds pass."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        while not done():
            if time.monotonic() > deadline:
                on_timeout()
                raise CommError(f"rank {self.rank} of {self.size}: allreduce_sum of {n} "
                                f"elements timed out after {self.timeout} s (another rank "
                                "failed or never called it); this communicator is unusable now",
                                self.rank, self.size)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalComm:
    """A single-process communicator: ``allreduce_sum`` returns a copy of its input.

    Batch norm with ``bn_param['comm'] = LocalComm()`` computes exactly what
    it computes without a communicator; tests use it to run the comm code
    path in one process.
    """

    rank = 0
    size = 1

    def allreduce_sum(self, buf):
        """Sum over one rank.

        Inputs:
        - buf: 1-D real array of shape (K,), NumPy or CuPy

        Returns:
        - out: a copy of buf (same backend, shape and dtype)
        """
        _check_buffer(buf)
        return buf.copy()

    def __repr__(self):
        return "LocalComm()"


class MPIComm(_FlaggedComm):
    """``allreduce_sum`` over an MPI communicator (mpi4py).

    NumPy buffers are reduced directly; CuPy buffers are copied to the host,
    reduced and copied back to the device they came from (the buffers are a
    few per-channel numbers, so staging costs little and needs no CUDA-aware
    MPI).

    Inputs:
    - comm: an ``mpi4py.MPI.Comm``; default ``MPI.COMM_WORLD``
    - timeout: None (block, the default) or seconds after which a rank still
      waiting for the others raises CommError (uses a non-blocking
      ``Iallreduce`` polled with short sleeps)
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
        return np.asarray(buf, dtype=np.float64)

    def _payload(self, data, n, failed):
        payload = np.zeros(n + 1, dtype=np.float64)
        payload[0] = 1.0 if failed else 0.0
        if data is not None:
            payload[1:] = data
        return payload

    def _reduce(self, payload):
        out = np.empty_like(payload)
        MPI = self._MPI
        if self.timeout is None:
            self.comm.Allreduce(payload, out, op=MPI.SUM)
        else:
            request = self.comm.Iallreduce(payload, out, op=MPI.SUM)
            self._deadline_wait(request.Test, lambda: None, payload.size - 1)
        return out



class NCCLComm(_FlaggedComm):
    """``allreduce_sum`` over an NCCL communicator (``cupy.cuda.nccl``), one GPU per rank.

    The reduction runs on the current CuPy stream of the communicator's
    device. NumPy buffers are staged through the device and come back as
    NumPy arrays.

    Inputs:
    - comm: a ``cupy.cuda.nccl.NcclCommunicator``, or a tuple
      ``(nranks, unique_id, rank)`` to create one on the current device
      (``unique_id`` from ``nccl.get_unique_id()`` on one rank, shared with
      the others)
    - timeout: None (wait on the stream, the default) or seconds after which
      a rank still waiting aborts the NCCL communicator and raises CommError

    Use :meth:`from_mpi` to create the communicator from an MPI job.
    """

    def __init__(self, comm, timeout=None):
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

    @classmethod
    def from_mpi(cls, mpi_comm=None, device=None, timeout=None):
        """An NCCLComm over the same processes as an MPI communicator.

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
        return cls((size, unique_id, rank), timeout=timeout)

    def _to_transport(self, buf):
        cupy = self._cupy
        with cupy.cuda.Device(self.device_id):
            return cupy.asarray(buf, dtype=cupy.float64)

    def _payload(self, data, n, failed):
        cupy = self._cupy
        with cupy.cuda.Device(self.device_id):
            payload = cupy.zeros(n + 1, dtype=cupy.float64)
            if data is not None:
                payload[1:] = data
            if failed:
                payload[0] = 1.0
        return payload

    def _reduce(self, payload):
        cupy, nccl = self._cupy, self._nccl
        with cupy.cuda.Device(self.device_id):
            out = cupy.empty_like(payload)
            stream = cupy.cuda.get_current_stream()
            self.comm.allReduce(payload.data.ptr, out.data.ptr, payload.size,
                                nccl.NCCL_FLOAT64, nccl.NCCL_SUM, stream.ptr)
            if self.timeout is not None:
                event = stream.record()
                self._deadline_wait(lambda: event.done, self.comm.abort, payload.size - 1)
            check = getattr(self.comm, "check_async_error", None)
            if check is not None:
                check()
        return out


class TorchDistComm(_FlaggedComm):
    """``allreduce_sum`` over a ``torch.distributed`` process group.

    The buffer crosses to a torch tensor (``torch.from_numpy`` / ``torch.from_dlpack``, no
    copy), is copied into the float64 payload ``[flag, data...]`` on the group's device
    (the CPU for gloo, the current CUDA device for NCCL; so NumPy buffers work over NCCL
    and CuPy buffers over gloo, staged) and reduced with ``dist.all_reduce``; the result
    is a new array of the buffer's backend, device and dtype (the buffer is not modified).
    The failure flag and ``timeout`` work as in :class:`MPIComm`.

    Inputs:
    - group: a process group (``dist.new_group(...)``) or None, the default group;
      torch.distributed must be initialised (``dist.init_process_group``)
    - timeout: None (block, the default) or seconds after which a rank still waiting
      raises CommError (an ``async_op`` all-reduce polled with short sleeps)
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
        return t.to(device=self._device(), dtype=torch.float64)

    def _payload(self, data, n, failed):
        torch = self._torch
        payload = torch.zeros(n + 1, dtype=torch.float64, device=self._device())
        if data is not None:
            payload[1:] = data
        if failed:
            payload[0] = 1.0
        return payload

    def _reduce(self, payload):
        dist = self._dist
        if self.timeout is None:
            dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group)
        else:
            work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group,
                                   async_op=True)
            self._deadline_wait(work.is_completed, lambda: None, payload.numel() - 1)
            work.wait()
        if payload.device.type == "cuda":
            import cupy
            return cupy.from_dlpack(payload)
        return payload.numpy()
