"""Run by tests/test_common.py under `torchrun --nproc_per_node=2` (CPU, gloo): common.py's own
cross-process behaviour.

1. Logger: a progress line that only the clock asks for (rank 0, PROGRESS_SECONDS=0) holds no
   collective, so the processes' collectives stay paired (here a stand-in for DDP's gradient
   all-reduce after every step); a NaN stops every process at the same counted step, naming the
   earliest bad step over processes.
2. gather_with_grad's backward leaves the incoming gradient alone: another branch that autograd
   hands the same gradient tensor still gets its own, not one summed over processes.
3. linear_eval: every process trains the same classifier, so both return the same linear_top1.
"""

import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
rt = common.Runtime(rank, world, torch.device("cpu"), torch.float32, False)

# 1. Logger ----------------------------------------------------------------------------------------
common.PROGRESS_SECONDS = 0.0  # rank 0's clock asks for a line after every step
out_dir = tempfile.mkdtemp() if rank == 0 else ""
cfg = SimpleNamespace(log_every=5, batch_size=8, out_dir=out_dir, arch="tiny")
log = common.Logger(cfg, rt, steps_per_epoch=100, start_step=0, stop_step=20)
bad_step = {0: 13, 1: 11}[rank]  # 0-based: rank 1's loss goes bad first
stopped = None
for step in range(20):
    grads = torch.ones(1000)
    dist.all_reduce(grads)  # what DDP does during every backward
    assert grads[0].item() == world, "a collective was paired with another process's other collective"
    try:
        log.step(step, loss=torch.tensor(float("nan") if step >= bad_step else 1.0))
    except common.RunError as e:
        stopped = (step, str(e))
        break
assert stopped is not None and stopped[0] == 14, stopped  # done = 15: the first counted step after step 11
assert "at step 12;" in stopped[1], stopped  # the earliest over processes (1-based)
print(f"logger: rank {rank} stopped after step {stopped[0] + 1}: {stopped[1][:40]}")

# 2. gather_with_grad's backward -------------------------------------------------------------------
torch.manual_seed(rank)
x, p = torch.randn(3, 4, requires_grad=True), torch.randn(3 * world, 4, requires_grad=True)
c = p * 1  # z + c below: autograd hands the same gradient tensor to both branches
z = common.gather_with_grad(x)
((z + c) ** 2).sum().backward()
expected = 2 * (z + c).detach()  # d/dc of this process's loss
torch.testing.assert_close(p.grad, expected, atol=0, rtol=0)
print(f"gather_with_grad: rank {rank} shared gradient untouched")

# 3. linear_eval -----------------------------------------------------------------------------------
g = torch.Generator().manual_seed(0)  # the same data on every process; random labels and a small lr: the init shows


def images(n):
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 4, (n,), generator=g)


train, test = images(128), images(200)
data = common.Data("random", train, train, test, ["a", "b", "c", "d"], rt, 32, 0)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()).eval()
top1 = common.linear_eval(lambda u: net(common.to_float(u)), data, rt, epochs=1, batch_size=32, lr=1e-4)
both = common.all_gather(torch.tensor([top1]))
assert both[0] == both[1], both.tolist()
print(f"linear_eval: rank {rank} top1 {top1:.4f}, the same on both")

dist.barrier()
dist.destroy_process_group()
