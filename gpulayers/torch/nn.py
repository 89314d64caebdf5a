"""torch.nn modules running on gpulayers' operators.

Each class subclasses the torch.nn module of its name and changes only ``forward``: the
constructor arguments, attributes, ``extra_repr``, parameters, buffers and state_dict
keys (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``)
are torch's own, so a checkpoint of torch's modules loads into these with
``strict=True`` and the other way round, and ``isinstance(m, torch.nn.BatchNorm2d)``
holds.

:class:`SyncBatchNorm` takes torch.nn.SyncBatchNorm's arguments (``process_group``)
plus ``comm=``: any gpulayers communicator; by default a
:class:`gpulayers.distributed.TorchDistComm` over ``process_group`` when
torch.distributed is initialised with more than one rank (gloo on the CPU, NCCL on
GPUs -- torch's own SyncBatchNorm refuses CPU tensors).
"""
from __future__ import annotations

import torch

from .. import torch as _F

__all__ = ["MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
           "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
           "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
           "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]

_nn = torch.nn


def _max_pool(fn):
    def forward(self, input):
        return fn(input, self.kernel_size, self.stride, self.padding, self.dilation,
                  ceil_mode=self.ceil_mode, return_indices=self.return_indices)
    return forward


class MaxPool1d(_nn.MaxPool1d):
    """torch.nn.MaxPool1d on gpulayers.torch.max_pool1d."""
    forward = _max_pool(_F.max_pool1d)


class MaxPool2d(_nn.MaxPool2d):
    """torch.nn.MaxPool2d on gpulayers.torch.max_pool2d."""
    forward = _max_pool(_F.max_pool2d)


class MaxPool3d(_nn.MaxPool3d):
    """torch.nn.MaxPool3d on gpulayers.torch.max_pool3d."""
    forward = _max_pool(_F.max_pool3d)


class AvgPool1d(_nn.AvgPool1d):
    """torch.nn.AvgPool1d on gpulayers.torch.avg_pool1d."""

    def forward(self, input):
        return _F.avg_pool1d(input, self.kernel_size, self.stride, self.padding,
                             self.ceil_mode, self.count_include_pad)


def _avg_pool(fn):
    def forward(self, input):
        return fn(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                  self.count_include_pad, self.divisor_override)
    return forward


class AvgPool2d(_nn.AvgPool2d):
    """torch.nn.AvgPool2d on gpulayers.torch.avg_pool2d."""
    forward = _avg_pool(_F.avg_pool2d)


class AvgPool3d(_nn.AvgPool3d):
    """torch.nn.AvgPool3d on gpulayers.torch.avg_pool3d."""
    forward = _avg_pool(_F.avg_pool3d)


def _adaptive_avg(fn):
    def forward(self, input):
        return fn(input, self.output_size)
    return forward


def _adaptive_max(fn):
    def forward(self, input):
        return fn(input, self.output_size, self.return_indices)
    return forward


class AdaptiveAvgPool1d(_nn.AdaptiveAvgPool1d):
    """torch.nn.AdaptiveAvgPool1d on gpulayers.torch.adaptive_avg_pool1d."""
    forward = _adaptive_avg(_F.adaptive_avg_pool1d)


class AdaptiveAvgPool2d(_nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d on gpulayers.torch.adaptive_avg_pool2d."""
    forward = _adaptive_avg(_F.adaptive_avg_pool2d)


class AdaptiveAvgPool3d(_nn.AdaptiveAvgPool3d):
    """torch.nn.AdaptiveAvgPool3d on gpulayers.torch.adaptive_avg_pool3d."""
    forward = _adaptive_avg(_F.adaptive_avg_pool3d)


class AdaptiveMaxPool1d(_nn.AdaptiveMaxPool1d):
    """torch.nn.AdaptiveMaxPool1d on gpulayers.torch.adaptive_max_pool1d."""
    forward = _adaptive_max(_F.adaptive_max_pool1d)


class AdaptiveMaxPool2d(_nn.AdaptiveMaxPool2d):
    """torch.nn.AdaptiveMaxPool2d on gpulayers.torch.adaptive_max_pool2d."""
    forward = _adaptive_max(_F.adaptive_max_pool2d)


class AdaptiveMaxPool3d(_nn.AdaptiveMaxPool3d):
    """torch.nn.AdaptiveMaxPool3d on gpulayers.torch.adaptive_max_pool3d."""
    forward = _adaptive_max(_F.adaptive_max_pool3d)


def _unpool(fn):
    def forward(self, input, indices, output_size=None):
        return fn(input, indices, self.kernel_size, self.stride, self.padding, output_size)
    return forward


class MaxUnpool1d(_nn.MaxUnpool1d):
    """torch.nn.MaxUnpool1d on gpulayers.torch.max_unpool1d."""
    forward = _unpool(_F.max_unpool1d)


class MaxUnpool2d(_nn.MaxUnpool2d):
    """torch.nn.MaxUnpool2d on gpulayers.torch.max_unpool2d."""
    forward = _unpool(_F.max_unpool2d)


class MaxUnpool3d(_nn.MaxUnpool3d):
    """torch.nn.MaxUnpool3d on gpulayers.torch.max_unpool3d."""
    forward = _unpool(_F.max_unpool3d)


def _bn_step(module):
    """torch's _BatchNorm.forward bookkeeping: (training for the op, momentum factor,
    running_mean, running_var); counts num_batches_tracked; momentum=None is the
    cumulative moving average (factor 1 / num_batches_tracked)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    keep = not module.training or module.track_running_stats
    return (bn_training, factor, module.running_mean if keep else None,
            module.running_var if keep else None)


class _BatchNormForward:
    def forward(self, input):
        self._check_input_dim(input)
        training, factor, rm, rv = _bn_step(self)
        return _F.batch_norm(input, rm, rv, self.weight, self.bias, training, factor, self.eps)


class BatchNorm1d(_BatchNormForward, _nn.BatchNorm1d):
    """torch.nn.BatchNorm1d ((N, C) or (N, C, L)) on gpulayers.torch.batch_norm."""


class BatchNorm2d(_BatchNormForward, _nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on gpulayers.torch.batch_norm."""


class BatchNorm3d(_BatchNormForward, _nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on gpulayers.torch.batch_norm."""


class SyncBatchNorm(_nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on gpulayers' synchronized batch norm.

    Inputs: torch.nn.SyncBatchNorm's (num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype), plus ``comm``: a gpulayers
    communicator to use instead of a TorchDistComm over ``process_group``.

    In training the statistics are those of the whole batch over all ranks (equal or
    unequal slices), the running statistics are the same on every rank, dx is the
    whole-batch gradient and weight.grad / bias.grad hold this rank's local share, as with
    torch's SyncBatchNorm (DistributedDataParallel all-reduces them).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device, dtype)
        self.comm = comm
        self._torch_comm = None

    def _communicator(self):
        if self.comm is not None:
            return self.comm
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._torch_comm is None or self._torch_comm.group is not self.process_group:
            from ..distributed import TorchDistComm
            self._torch_comm = TorchDistComm(self.process_group)
        return self._torch_comm if self._torch_comm.size > 1 else None

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        training, factor, rm, rv = _bn_step(self)
        comm = self._communicator() if (training and self.training) else None
        if comm is None:
            return _F.batch_norm(input, rm, rv, self.weight, self.bias, training, factor,
                                 self.eps)
        return _F.sync_batch_norm(input, self.weight, self.bias, rm, rv, factor, self.eps,
                                  comm)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, comm=None):
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, making gpulayers SyncBatchNorm
        layers (with ``comm`` when given) from every batch-norm layer of ``module``."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, comm=comm)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group, comm))
        del module
        return out
