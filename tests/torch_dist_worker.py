"""One rank of the 2-process gloo test of gpulayers.torch.nn.SyncBatchNorm and
TorchDistComm (tests/test_torch_distributed.py starts it twice).

    python tests/torch_dist_worker.py RANK WORLD INIT_FILE OUT_DIR

Every rank builds the same global batches from fixed seeds, takes its slice (equal and
unequal ones), runs two training steps of SyncBatchNorm and saves what it got to
OUT_DIR/rank{RANK}.npz; the test compares that with one process on the whole batch.
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpulayers.distributed import TorchDistComm  # noqa: E402
from gpulayers.torch import nn as gnn  # noqa: E402

CASES = {"equal": [4, 4], "unequal": [5, 2]}   # slices of the batch per rank
C = 3


def batch(case, step):
    g = torch.Generator().manual_seed(100 * step + len(case))
    n = sum(CASES[case])
    x = torch.randn(n, C, 4, 3, generator=g, dtype=torch.float64) * 2 + 1
    dout = torch.randn(n, C, 4, 3, generator=g, dtype=torch.float64)
    return x, dout


def main():
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    comm = TorchDistComm()
    buf = np.arange(4, dtype=np.float64) + rank
    before = buf.copy()
    total = comm.allreduce_sum(buf)
    out = {"allreduce": total, "allreduce_input_untouched": np.array(np.array_equal(buf, before)),
           "size": np.array(comm.size), "rank": np.array(comm.rank)}
    for case, sizes in CASES.items():
        lo = sum(sizes[:rank])
        bn = gnn.SyncBatchNorm(C, momentum=0.2).double()
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        for step in range(2):
            x, dout = batch(case, step)
            xs = x[lo:lo + sizes[rank]].clone().requires_grad_()
            bn.zero_grad()
            y = bn(xs)
            y.backward(dout[lo:lo + sizes[rank]])
            out[f"{case}_y{step}"] = y.detach().numpy()
            out[f"{case}_dx{step}"] = xs.grad.numpy()
            out[f"{case}_dw{step}"] = bn.weight.grad.numpy().copy()
            out[f"{case}_db{step}"] = bn.bias.grad.numpy().copy()
        out[f"{case}_rm"] = bn.running_mean.numpy().copy()
        out[f"{case}_rv"] = bn.running_var.numpy().copy()
        out[f"{case}_nbt"] = np.array(int(bn.num_batches_tracked))
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
