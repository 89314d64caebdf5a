"""Layer classes holding parameters, gradients, running stats and caches.

Keyword arguments are named like PyTorch's modules, in PyTorch's order; every layer
also takes ``data_format='channels_first'`` (or ``'channels_last'``: (N, *spatial, C)
input and output, Keras's name). Each layer has
``forward(x)`` and ``backward(dout)``; backward returns dx and stores the
parameter gradients in ``grads``. Parameters live on the backend chosen by
``to(backend)`` (default: the current backend, see gpulayers.set_backend).

    bn = BatchNorm2d(64)
    out = bn.forward(x)
    dx = bn.backward(dout)       # bn.grads['gamma'], bn.grads['beta']
"""
from __future__ import annotations

import numpy as np

from . import backend, batchnorm, pooling

__all__ = ["Layer",
           "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
           "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d",
           "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
           "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class Layer:
    """Base class: params/grads dicts, train()/eval(), to(), state_dict()."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self.cache = None
        self.backend = backend.get_backend()

    def train(self, mode=True):
        """Switch to training mode (or to eval mode with mode=False); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to eval mode; returns self."""
        return self.train(False)

    def to(self, name):
        """Move parameters, gradients and buffers to backend ``name``; returns self."""
        xp = backend.backend_module(name)
        for store in (self.params, self.grads, self.buffers):
            for k, v in store.items():
                store[k] = xp.asarray(backend.to_numpy(v)) if v is not None else None
        self.backend = name
        self.cache = None
        return self

    def state_dict(self):
        """Copies of parameters and buffers, as NumPy arrays."""
        state = {k: backend.to_numpy(v).copy() for k, v in self.params.items()}
        state.update({k: backend.to_numpy(v).copy() for k, v in self.buffers.items()
                      if v is not None})
        return state

    def load_state_dict(self, state):
        """Load arrays saved by state_dict (ValueError on missing keys or shapes)."""
        xp = backend.backend_module(self.backend)
        for store in (self.params, self.buffers):
            for k, v in store.items():
                if k not in state:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: missing key {k!r}; "
                                     f"got {sorted(state)}")
                new = np.asarray(backend.to_numpy(state[k]))
                if v is not None and new.shape != tuple(v.shape):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {k!r} has shape "
                                     f"{new.shape}, expected {tuple(v.shape)}")
                store[k] = xp.asarray(new, dtype=None if v is None else v.dtype)
        return self

    def _need_cache(self):
        if self.cache is None:
            raise ValueError(f"{type(self).__name__}.backward called before forward")
        return self.cache

    def __call__(self, x):
        return self.forward(x)


_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _sizes(value, name, d):
    """An int (NumPy's too) or a d-sequence of ints, as given; ValueError naming the value
    otherwise (the pooling functions check the values themselves)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != d:
        what = "an int" if d == 1 else f"an int or a tuple of {d} ints"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(value)


def _check_rank(layer, x, d):
    ndim = getattr(x, "ndim", None)
    if ndim != d + 2:
        raise ValueError(f"{type(layer).__name__} expects x of shape {_SHAPES[d]}, got "
                         f"{'a ' + type(x).__name__ if ndim is None else f'{ndim}-D shape'} "
                         f"{tuple(getattr(x, 'shape', ()))}")


class _Pool(Layer):
    """Shared part of the pooling layers of rank ``_d``: PyTorch's kernel_size, stride
    and padding as pool_param."""

    _d = 2

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 data_format="channels_first"):
        super().__init__()
        d = self._d
        kernel = _sizes(kernel_size, "kernel_size", d)
        self.pool_param = {"kernel_size": kernel,
                           "stride": kernel if stride is None else _sizes(stride, "stride", d),
                           "pad": _sizes(padding, "padding", d), "ceil_mode": ceil_mode,
                           "data_format": data_format}

    def _check(self, x):
        _check_rank(self, x, self._d)


class _MaxPool(_Pool):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False, data_format="channels_first"):
        super().__init__(kernel_size, stride, padding, ceil_mode, data_format)
        self.pool_param["dilation"] = _sizes(dilation, "dilation", self._d)
        self.return_indices = return_indices
        self.indices = None

    def forward(self, x):
        """x of this layer's rank -> out; ``indices`` holds PyTorch's flat indices when
        ``return_indices`` is True (for MaxUnpool)."""
        self._check(x)
        out, self.cache = pooling.max_pool_forward(x, self.pool_param)
        self.indices = pooling.max_pool_indices(self.cache) if self.return_indices else None
        return out

    def backward(self, dout):
        """dout shaped like out -> dx shaped like x."""
        return pooling.max_pool_backward(dout, self._need_cache())


class MaxPool1d(_MaxPool):
    """Max pooling over (N, C, L) (PyTorch's nn.MaxPool1d arguments, in its order)."""
    _d = 1


class MaxPool2d(_MaxPool):
    """Max pooling over (N, C, H, W) (PyTorch's nn.MaxPool2d arguments, in its order).

    After forward, ``indices`` holds PyTorch-style flat indices when
    ``return_indices`` is True (for MaxUnpool2d).
    """
    _d = 2


class MaxPool3d(_MaxPool):
    """Max pooling over (N, C, D, H, W) (PyTorch's nn.MaxPool3d arguments, in its order)."""
    _d = 3


class _AvgPool(_Pool):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None, data_format="channels_first"):
        super().__init__(kernel_size, stride, padding, ceil_mode, data_format)
        self.pool_param["count_include_pad"] = count_include_pad
        if divisor_override is not None:
            self.pool_param["divisor_override"] = divisor_override

    def forward(self, x):
        """x of this layer's rank -> out."""
        self._check(x)
        out, self.cache = pooling.avg_pool_forward(x, self.pool_param)
        return out

    def backward(self, dout):
        """dout shaped like out -> dx shaped like x."""
        return pooling.avg_pool_backward(dout, self._need_cache())


class AvgPool1d(_AvgPool):
    """Average pooling over (N, C, L) (PyTorch's nn.AvgPool1d arguments: no divisor_override)."""
    _d = 1

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, data_format="channels_first"):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad,
                         data_format=data_format)


class AvgPool2d(_AvgPool):
    """Average pooling over (N, C, H, W) (PyTorch's nn.AvgPool2d arguments)."""
    _d = 2


class AvgPool3d(_AvgPool):
    """Average pooling over (N, C, D, H, W) (PyTorch's nn.AvgPool3d arguments)."""
    _d = 3


class _MaxUnpool(Layer):
    """Max unpooling of rank ``_d``: ``forward(x, indices, output_size=None)``. As in
    PyTorch, the default output size is (in - 1)*stride - 2*padding + kernel_size per axis;
    a layer made without kernel_size needs output_size."""

    _d = 2

    def __init__(self, kernel_size=None, stride=None, padding=0, data_format="channels_first"):
        super().__init__()
        self.data_format = data_format
        d = self._d
        self.kernel_size = None if kernel_size is None else _sizes(kernel_size, "kernel_size", d)
        self.stride = self.kernel_size if stride is None else _sizes(stride, "stride", d)
        self.padding = _sizes(padding, "padding", d)

    def _default_size(self, x):
        if self.kernel_size is None:
            raise ValueError(f"{type(self).__name__} made without kernel_size needs output_size")
        d = self._d
        k, s, p = ((v,) * d if isinstance(v, int) else v
                   for v in (self.kernel_size, self.stride, self.padding))
        spatial = x.shape[1:-1] if self.data_format == "channels_last" else x.shape[2:]
        return tuple((n - 1) * s_ - 2 * p_ + k_ for n, k_, s_, p_ in zip(spatial, k, s, p))

    def forward(self, x, indices, output_size=None):
        """x, indices: (N, C, *in); output_size: the d spatial sizes or the full shape
        (default: from kernel_size, stride, padding) -> out (N, C, *output_size)."""
        _check_rank(self, x, self._d)
        size = self._default_size(x) if output_size is None else output_size
        out, self.cache = pooling.max_unpool_forward(x, indices, size,
                                                     data_format=self.data_format)
        return out

    def __call__(self, x, indices, output_size=None):
        return self.forward(x, indices, output_size)

    def backward(self, dout):
        """dout shaped like out -> dx shaped like x."""
        return pooling.max_unpool_backward(dout, self._need_cache())


class MaxUnpool1d(_MaxUnpool):
    """Max unpooling over (N, C, L) (PyTorch's nn.MaxUnpool1d)."""
    _d = 1


class MaxUnpool2d(_MaxUnpool):
    """Max unpooling over (N, C, H, W) (PyTorch's nn.MaxUnpool2d)."""
    _d = 2


class MaxUnpool3d(_MaxUnpool):
    """Max unpooling over (N, C, D, H, W) (PyTorch's nn.MaxUnpool3d)."""
    _d = 3


class _AdaptivePool(Layer):
    _d = 2

    def __init__(self, output_size, data_format="channels_first"):
        super().__init__()
        self.output_size = output_size
        self.data_format = data_format


class _AdaptiveAvgPool(_AdaptivePool):
    def forward(self, x):
        """x of this layer's rank -> out (N, C, *output_size)."""
        _check_rank(self, x, self._d)
        out, self.cache = pooling.adaptive_avg_pool_forward(x, self.output_size,
                                                            data_format=self.data_format)
        return out

    def backward(self, dout):
        """dout shaped like out -> dx shaped like x."""
        return pooling.adaptive_avg_pool_backward(dout, self._need_cache())


class _AdaptiveMaxPool(_AdaptivePool):
    def __init__(self, output_size, return_indices=False, data_format="channels_first"):
        super().__init__(output_size, data_format)
        self.return_indices = return_indices
        self.indices = None

    def forward(self, x):
        """x of this layer's rank -> out (N, C, *output_size); ``indices`` as MaxPool's."""
        _check_rank(self, x, self._d)
        out, self.cache = pooling.adaptive_max_pool_forward(x, self.output_size,
                                                            data_format=self.data_format)
        self.indices = pooling.max_pool_indices(self.cache) if self.return_indices else None
        return out

    def backward(self, dout):
        """dout shaped like out -> dx shaped like x."""
        return pooling.adaptive_max_pool_backward(dout, self._need_cache())


class AdaptiveAvgPool1d(_AdaptiveAvgPool):
    """Adaptive average pooling over (N, C, L) (PyTorch's nn.AdaptiveAvgPool1d)."""
    _d = 1


class AdaptiveAvgPool2d(_AdaptiveAvgPool):
    """Adaptive average pooling over (N, C, H, W); output_size=1 is global average pooling."""
    _d = 2


class AdaptiveAvgPool3d(_AdaptiveAvgPool):
    """Adaptive average pooling over (N, C, D, H, W) (PyTorch's nn.AdaptiveAvgPool3d)."""
    _d = 3


class AdaptiveMaxPool1d(_AdaptiveMaxPool):
    """Adaptive max pooling over (N, C, L) (PyTorch's nn.AdaptiveMaxPool1d)."""
    _d = 1


class AdaptiveMaxPool2d(_AdaptiveMaxPool):
    """Adaptive max pooling over (N, C, H, W) (PyTorch's nn.AdaptiveMaxPool2d)."""
    _d = 2


class AdaptiveMaxPool3d(_AdaptiveMaxPool):
    """Adaptive max pooling over (N, C, D, H, W) (PyTorch's nn.AdaptiveMaxPool3d)."""
    _d = 3


class _BatchNorm(Layer):
    """Batch-norm layers follow PyTorch's modules, whose names they carry: by default the
    'torch' convention (momentum 0.1, running_var starting at ones, unbiased running
    variance), so a fresh ``BatchNorm2d(C).eval()`` is the identity up to eps, like
    ``torch.nn.BatchNorm2d(C).eval()``. ``convention='cs231n'`` gives the function API's
    default. ``affine=False`` has no gamma/beta parameters (the layer uses ones and zeros)."""

    _ranks = {}   # input ndim -> (forward, backward) functions

    def __init__(self, num_features, eps=1e-5, momentum=None, affine=True,
                 track_running_stats=True, convention="torch", comm=None, dtype=np.float32,
                 data_format="channels_first"):
        super().__init__()
        if convention not in ("cs231n", "torch"):
            raise ValueError(f"convention must be 'cs231n' or 'torch', got {convention!r}")
        if (isinstance(num_features, (bool, np.bool_))
                or not isinstance(num_features, (int, np.integer)) or num_features <= 0):
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        xp = backend.backend_module()
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.convention = convention
        self.comm = comm
        self.track_running_stats = track_running_stats
        self.dtype = np.dtype(dtype)
        self.data_format = data_format
        if self.affine:
            self.params = {"gamma": xp.ones(num_features, dtype=dtype),
                           "beta": xp.zeros(num_features, dtype=dtype)}
        if track_running_stats:
            self.buffers = {"running_mean": xp.zeros(num_features, dtype=dtype),
                            "running_var": (xp.ones if convention == "torch" else xp.zeros)(
                                num_features, dtype=dtype)}

    def _bn_param(self):
        mode = "train" if (self.training or not self.track_running_stats) else "test"
        p = {"mode": mode, "eps": self.eps, "convention": self.convention,
             "data_format": self.data_format}
        if self.momentum is not None:
            p["momentum"] = self.momentum
        if self.comm is not None and mode == "train":
            p["comm"] = self.comm
        if self.track_running_stats:
            p["running_mean"] = self.buffers["running_mean"]
            p["running_var"] = self.buffers["running_var"]
        return p

    def _affine(self):
        """(gamma, beta): the parameters, or ones and zeros when affine=False."""
        if self.affine:
            return self.params["gamma"], self.params["beta"]
        xp = backend.backend_module(self.backend)
        return (xp.ones(self.num_features, dtype=self.dtype),
                xp.zeros(self.num_features, dtype=self.dtype))

    _warm = None   # (the settings it holds for, batchnorm's _WarmForward, backward, x's key)

    def forward(self, x):
        warm = self._warm
        if (warm is not None and self.training is warm[0] and self.eps is warm[1]
                and self.momentum is warm[2] and self.convention is warm[3]
                and self.comm is None and self.data_format is warm[4]
                and self.affine is warm[5] and self.track_running_stats is warm[6]):
            # the same settings as a forward that ran batchnorm's warmed CUDA path: run it
            # again when the arrays match too (batchnorm._warm_run checks the rest)
            gamma, beta = ((self.params["gamma"], self.params["beta"]) if warm[5]
                           else self._affine())
            buffers = self.buffers
            rm, rv = ((buffers["running_mean"], buffers["running_var"]) if warm[6]
                      else (None, None))
            out = None
            if (x.__class__, x.shape, x.strides, x.dtype, gamma.__class__, gamma.shape,
                    gamma.strides, gamma.dtype, beta.__class__, beta.shape, beta.strides,
                    beta.dtype) == warm[9]:
                out = batchnorm._warm_run(warm[7], x, gamma, beta, rm, rv)
            if out is not None:
                self.cache = out[1]
                self._backward_fn = warm[8]
                if warm[6] and warm[7].train:
                    buffers["running_mean"], buffers["running_var"] = out[2], out[3]
                return out[0]
        ndim = getattr(x, "ndim", None)
        if ndim not in self._ranks:
            shapes = " or ".join({2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)",
                                  5: "(N, C, D, H, W)"}[r] for r in self._ranks)
            raise ValueError(f"{type(self).__name__} expects x of shape {shapes}, got "
                             f"{ndim}-D shape {tuple(getattr(x, 'shape', ()))}")
        forward, self._backward_fn = self._ranks[ndim]
        p = self._bn_param()
        gamma, beta = self._affine()
        probe = dict(p) if x.__class__ is not np.ndarray and self.comm is None else None
        out, self.cache = forward(x, gamma, beta, p)
        if self.track_running_stats and p["mode"] == "train":
            self.buffers["running_mean"] = p["running_mean"]
            self.buffers["running_var"] = p["running_var"]
        self._warm = None
        if probe is not None:
            op = ("batchnorm_forward" if forward is batchnorm.batchnorm_forward
                  else "spatial_batchnorm_forward")
            entry = batchnorm._warm_entry(x, gamma, beta, probe, op)
            if entry is not None:
                self._warm = (self.training, self.eps, self.momentum, self.convention,
                              self.data_format, self.affine, self.track_running_stats,
                              entry, self._backward_fn,
                              (x.__class__, x.shape, x.strides, x.dtype, gamma.__class__,
                               gamma.shape, gamma.strides, gamma.dtype, beta.__class__,
                               beta.shape, beta.strides, beta.dtype))
        return out

    def backward(self, dout):
        cache = self._need_cache()
        dx, dgamma, dbeta = self._backward_fn(dout, cache)
        if self.affine:
            self.grads = {"gamma": dgamma, "beta": dbeta}
        return dx


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs (PyTorch's nn.BatchNorm1d arguments and
    defaults, plus ``convention`` ('torch' by default) and ``comm``; momentum defaults by
    convention)."""

    _ranks = {2: (batchnorm.batchnorm_forward, batchnorm.batchnorm_backward),
              3: (batchnorm.spatial_batchnorm_forward, batchnorm.spatial_batchnorm_backward)}


class BatchNorm2d(_BatchNorm):
    """Spatial batch norm over (N, C, H, W) inputs (PyTorch's nn.BatchNorm2d
    arguments and defaults, plus ``convention`` ('torch' by default) and ``comm``)."""

    _ranks = {4: (batchnorm.spatial_batchnorm_forward, batchnorm.spatial_batchnorm_backward)}


class BatchNorm3d(_BatchNorm):
    """Spatial batch norm over (N, C, D, H, W) inputs (PyTorch's nn.BatchNorm3d
    arguments and defaults, plus ``convention`` ('torch' by default) and ``comm``)."""

    _ranks = {5: (batchnorm.spatial_batchnorm_forward, batchnorm.spatial_batchnorm_backward)}
