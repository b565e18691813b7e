"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (CPU, gloo); with 2 or more GPUs,
`torchrun --standalone --nproc_per_node=2 tests/dist_simclr_step.py` runs it on CUDA with NCCL (README).

One SimCLR step on W processes (each holding B = N / W pairs) must give the loss and the parameter
gradients of one process holding all N pairs: the negatives span the global batch and DDP's
averaged gradient is not scaled by W. SyncBatchNorm refuses CPU tensors, so both models run their
BatchNorm layers in eval mode (fixed statistics): batch statistics do not enter the comparison.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import simclr  # noqa: E402

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare in full float32
torch.manual_seed(0)  # the same weights and the same global batch on every process
model = simclr.SimCLR("tiny", True, 32).eval().to(device)
reference = copy.deepcopy(model)
N, T = 16, 0.5
x1, x2 = torch.randn(N, 3, 32, 32).to(device), torch.randn(N, 3, 32, 32).to(device)

B = N // world
mine = slice(rank * B, (rank + 1) * B)
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
z1, z2 = ddp(torch.cat([x1[mine], x2[mine]])).chunk(2)
loss = simclr.nt_xent_loss(common.gather_with_grad(z1), common.gather_with_grad(z2), T)
loss.backward()

zr1, zr2 = reference(torch.cat([x1, x2])).chunk(2)
loss_ref = simclr.nt_xent_loss(zr1, zr2, T)
loss_ref.backward()

torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
worst = 0.0
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    if p.requires_grad:
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
        worst = max(worst, (p.grad - q.grad).abs().max().item())
print(f"rank {rank} ({device}): loss {loss.item():.6f} == {loss_ref.item():.6f}, max grad diff {worst:.2e}", flush=True)
dist.barrier()
dist.destroy_process_group()
