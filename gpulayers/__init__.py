"""gpulayers: pooling (max, average, sum, adaptive; 1-D, 2-D and 3-D), unpooling and
batch-norm layers with explicit forward and backward passes, one code base for NumPy
(CPU) and CuPy (NVIDIA GPUs).

    out, cache = gpulayers.max_pool_forward(x, {'pool_height': 2, 'pool_width': 2})
    dx = gpulayers.max_pool_backward(dout, cache)

Layer functions compute with the array module of their inputs; the backend
setting (``set_backend``, ``use_backend``, env ``GPULAYERS_BACKEND``) decides
where ``asarray``, the layer classes and the scripts put data.

``gpulayers.layers`` (layer classes) and ``gpulayers.gradcheck`` (CS231n's numeric
gradient helpers) come with the package; ``gpulayers.distributed`` (communicators for
synchronized batch norm) is imported on demand and imports mpi4py only when an
MPIComm is made.
"""
from .backend import (asarray, available_backends, backend_info, get_array_module,
                      get_backend, set_backend, to_numpy, use_backend)
from .batchnorm import (batchnorm_backward, batchnorm_forward, spatial_batchnorm_backward,
                        spatial_batchnorm_backward_general, spatial_batchnorm_forward,
                        spatial_batchnorm_forward_general)
from .pooling import (adaptive_avg_pool_backward, adaptive_avg_pool_forward,
                      adaptive_max_pool_backward, adaptive_max_pool_forward, avg_pool_backward,
                      avg_pool_forward, max_pool_backward, max_pool_backward_fast,
                      max_pool_backward_general, max_pool_backward_naive,
                      max_pool_backward_reshape, max_pool_forward, max_pool_forward_fast,
                      max_pool_forward_general, max_pool_forward_naive, max_pool_forward_reshape,
                      max_pool_indices, max_unpool_backward, max_unpool_forward,
                      sum_pool_backward, sum_pool_forward)
from . import gradcheck, layers  # noqa: E402  (gpulayers.layers / .gradcheck as attributes)

__version__ = "0.1.0"

__all__ = [
    "available_backends", "backend_info", "get_backend", "set_backend", "use_backend",
    "get_array_module", "asarray", "to_numpy",
    "max_pool_forward", "max_pool_backward",
    "max_pool_forward_naive", "max_pool_backward_naive",
    "max_pool_forward_reshape", "max_pool_backward_reshape",
    "max_pool_forward_general", "max_pool_backward_general",
    "max_pool_forward_fast", "max_pool_backward_fast",
    "max_pool_indices", "max_unpool_forward", "max_unpool_backward",
    "avg_pool_forward", "avg_pool_backward", "sum_pool_forward", "sum_pool_backward",
    "adaptive_avg_pool_forward", "adaptive_avg_pool_backward",
    "adaptive_max_pool_forward", "adaptive_max_pool_backward",
    "batchnorm_forward", "batchnorm_backward",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    "spatial_batchnorm_forward_general", "spatial_batchnorm_backward_general",
    "layers", "gradcheck",
]
