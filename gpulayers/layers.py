"""Layer classes holding parameters, gradients, running stats and caches.

Keyword arguments are named like PyTorch's modules. Each layer has
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

__all__ = ["Layer", "MaxPool2d", "AvgPool2d", "MaxUnpool2d", "BatchNorm1d", "BatchNorm2d"]


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


def _window(kernel_size):
    """(kh, kw) of an int (NumPy's too) or a pair; ValueError naming the value otherwise."""
    if isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, (bool, np.bool_)):
        return int(kernel_size), int(kernel_size)
    try:
        kh, kw = kernel_size
    except (TypeError, ValueError):
        raise ValueError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}") \
            from None
    return kh, kw


class _Pool(Layer):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        kh, kw = _window(kernel_size)
        self.pool_param = {"pool_height": kh, "pool_width": kw,
                           "stride": stride if stride is not None else (kh, kw),
                           "pad": padding, "ceil_mode": ceil_mode}


class MaxPool2d(_Pool):
    """Max pooling layer (PyTorch's nn.MaxPool2d arguments).

    After forward, ``indices`` holds PyTorch-style flat indices when
    ``return_indices`` is True (for MaxUnpool2d).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                 return_indices=False):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.pool_param["dilation"] = dilation
        self.return_indices = return_indices
        self.indices = None

    def forward(self, x):
        """x: (N, C, H, W) -> out (N, C, Ho, Wo)."""
        out, self.cache = pooling.max_pool_forward(x, self.pool_param)
        self.indices = pooling.max_pool_indices(self.cache) if self.return_indices else None
        return out

    def backward(self, dout):
        """dout: (N, C, Ho, Wo) -> dx (N, C, H, W)."""
        return pooling.max_pool_backward(dout, self._need_cache())


class AvgPool2d(_Pool):
    """Average pooling layer (PyTorch's nn.AvgPool2d arguments)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.pool_param["count_include_pad"] = count_include_pad

    def forward(self, x):
        """x: (N, C, H, W) -> out (N, C, Ho, Wo)."""
        out, self.cache = pooling.avg_pool_forward(x, self.pool_param)
        return out

    def backward(self, dout):
        """dout: (N, C, Ho, Wo) -> dx (N, C, H, W)."""
        return pooling.avg_pool_backward(dout, self._need_cache())


class MaxUnpool2d(Layer):
    """Max unpooling layer: ``forward(x, indices, output_size)``."""

    def forward(self, x, indices, output_size):
        """x, indices: (N, C, Ho, Wo); output_size (H, W) -> out (N, C, H, W)."""
        out, self.cache = pooling.max_unpool_forward(x, indices, output_size)
        return out

    def __call__(self, x, indices, output_size):
        return self.forward(x, indices, output_size)

    def backward(self, dout):
        """dout: (N, C, H, W) -> dx (N, C, Ho, Wo)."""
        return pooling.max_unpool_backward(dout, self._need_cache())


class _BatchNorm(Layer):
    """Batch-norm layers follow PyTorch's modules, whose names they carry: by default the
    'torch' convention (momentum 0.1, running_var starting at ones, unbiased running
    variance), so a fresh ``BatchNorm2d(C).eval()`` is the identity up to eps, like
    ``torch.nn.BatchNorm2d(C).eval()``. ``convention='cs231n'`` gives the function API's
    default. ``affine=False`` has no gamma/beta parameters (the layer uses ones and zeros)."""

    _forward = None
    _backward = None

    def __init__(self, num_features, eps=1e-5, momentum=None, affine=True,
                 track_running_stats=True, convention="torch", comm=None, dtype=np.float32):
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
        if self.affine:
            self.params = {"gamma": xp.ones(num_features, dtype=dtype),
                           "beta": xp.zeros(num_features, dtype=dtype)}
        if track_running_stats:
            self.buffers = {"running_mean": xp.zeros(num_features, dtype=dtype),
                            "running_var": (xp.ones if convention == "torch" else xp.zeros)(
                                num_features, dtype=dtype)}

    def _bn_param(self):
        mode = "train" if (self.training or not self.track_running_stats) else "test"
        p = {"mode": mode, "eps": self.eps, "convention": self.convention}
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

    def forward(self, x):
        p = self._bn_param()
        gamma, beta = self._affine()
        out, self.cache = type(self)._forward(x, gamma, beta, p)
        if self.track_running_stats and p["mode"] == "train":
            self.buffers["running_mean"] = p["running_mean"]
            self.buffers["running_var"] = p["running_var"]
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = type(self)._backward(dout, self._need_cache())
        if self.affine:
            self.grads = {"gamma": dgamma, "beta": dbeta}
        return dx


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, D) inputs (PyTorch's nn.BatchNorm1d arguments and defaults,
    plus ``convention`` ('torch' by default) and ``comm``; momentum defaults by convention)."""

    _forward = staticmethod(batchnorm.batchnorm_forward)
    _backward = staticmethod(batchnorm.batchnorm_backward)


class BatchNorm2d(_BatchNorm):
    """Spatial batch norm over (N, C, H, W) inputs (PyTorch's nn.BatchNorm2d
    arguments and defaults, plus ``convention`` ('torch' by default) and ``comm``)."""

    _forward = staticmethod(batchnorm.spatial_batchnorm_forward)
    _backward = staticmethod(batchnorm.spatial_batchnorm_backward)
