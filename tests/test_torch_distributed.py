"""gpulayers.torch.nn.SyncBatchNorm and gpulayers.distributed.TorchDistComm over 2
processes on gloo (tests/torch_dist_worker.py), against one process on the whole batch."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_dist_worker as worker  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch_dist")
    init = tmp / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "torch_dist_worker.py"),
                               str(r), str(WORLD), str(init), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the gloo workers did not finish in 180 s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(WORLD)]


def test_torch_dist_comm(ranks):
    for r, out in enumerate(ranks):
        assert int(out["size"]) == WORLD and int(out["rank"]) == r
        np.testing.assert_array_equal(out["allreduce"], 2 * np.arange(4) + 1)
        assert bool(out["allreduce_input_untouched"])


def test_torch_dist_comm_imports_no_torch():
    code = ("import sys, gpulayers.distributed as d; d.TorchDistComm; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(HERE))


@pytest.mark.parametrize("case", list(worker.CASES))
def test_sync_batchnorm_equals_one_process(ranks, case):
    sizes = worker.CASES[case]
    ref = torch.nn.BatchNorm2d(worker.C, momentum=0.2).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    tol = dict(rtol=1e-10, atol=1e-12)
    for step in range(2):
        x, dout = worker.batch(case, step)
        x = x.clone().requires_grad_()
        ref.zero_grad()
        y = ref(x)
        y.backward(dout)
        xhat = ((y - ref.bias[:, None, None]) / ref.weight[:, None, None]).detach()
        lo = 0
        dw_sum = 0
        for r, n in enumerate(sizes):
            out = ranks[r]
            sl = slice(lo, lo + n)
            np.testing.assert_allclose(out[f"{case}_y{step}"], y[sl].detach().numpy(), **tol)
            np.testing.assert_allclose(out[f"{case}_dx{step}"], x.grad[sl].numpy(), **tol)
            # each rank's weight.grad / bias.grad: its local share, as torch's SyncBatchNorm
            local_dw = (dout[sl] * xhat[sl]).sum(dim=(0, 2, 3)).numpy()
            local_db = dout[sl].sum(dim=(0, 2, 3)).numpy()
            np.testing.assert_allclose(out[f"{case}_dw{step}"], local_dw, **tol)
            np.testing.assert_allclose(out[f"{case}_db{step}"], local_db, **tol)
            dw_sum = dw_sum + out[f"{case}_dw{step}"]
            lo += n
        np.testing.assert_allclose(dw_sum, ref.weight.grad.numpy(), **tol)
    for r in range(WORLD):
        np.testing.assert_allclose(ranks[r][f"{case}_rm"], ref.running_mean.numpy(), **tol)
        np.testing.assert_allclose(ranks[r][f"{case}_rv"], ref.running_var.numpy(), **tol)
        assert int(ranks[r][f"{case}_nbt"]) == 2
