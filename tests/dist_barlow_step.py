"""Run by tests/test_barlow.py under `torchrun --nproc_per_node=2` (CPU, gloo).

One Barlow Twins step on W processes (each holding B = N / W pairs) must give the loss and the
parameter gradients of one process holding all N pairs: the loss standardizes z with the global
batch's statistics and sums the cross-correlation matrix over processes, and DDP's averaged
gradient is not scaled by W. The one-process reference is computed before the process group
exists (so common's collectives are the identity there). SyncBatchNorm refuses CPU tensors, so both
models run their BatchNorm layers in eval mode: the encoder's batch statistics do not enter the
comparison (the loss's own standardization does: it is the thing under test).
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import barlow  # noqa: E402

torch.manual_seed(0)  # the same weights and the same global batch on every process
model = barlow.BarlowTwins("tiny", True, 64).eval()
reference = copy.deepcopy(model)
N, lambd = 16, 0.02  # lambd larger than the paper's so the off-diagonal gradient matters in the comparison
x1, x2 = torch.randn(N, 3, 32, 32), torch.randn(N, 3, 32, 32)

zr1, zr2 = reference(x1, x2)  # one process, all N pairs (no process group yet)
loss_ref = barlow.barlow_twins_loss(zr1, zr2, lambd)
loss_ref.backward()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
B = N // world
mine = slice(rank * B, (rank + 1) * B)
ddp = torch.nn.parallel.DistributedDataParallel(model)
z1, z2 = ddp(x1[mine], x2[mine])
loss = barlow.barlow_twins_loss(z1, z2, lambd)
loss.backward()

torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
worst = 0.0  # largest gradient difference relative to the largest reference gradient of the same tensor
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    if p.requires_grad:
        scale = q.grad.abs().max().item()  # float32 sums in another order: compare to the tensor's scale
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
        worst = max(worst, (p.grad - q.grad).abs().max().item() / scale)
print(f"rank {rank}: loss {loss.item():.6f} == {loss_ref.item():.6f}, max grad diff {worst:.2e} (relative)", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
