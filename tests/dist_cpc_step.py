"""Run by tests/test_cpc.py under `torchrun --nproc_per_node=2` (CPU, gloo).

One CPC step on W processes (each holding B = N / W images) must give the loss and the parameter
gradients of one process holding all N images: the predictions of every process are scored
against the targets of the GLOBAL batch (common.gather_with_grad), and DDP's averaged gradient is
that of the mean over all predictions. CPC has no batch norm (layer norm only), so no statistics
need to be kept out: the comparison is exact up to float rounding.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import cpc  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same weights and the same global batch on every process
model = cpc.CPC("tiny", True, context_dim=16, context_blocks=2, pred_steps=3, target_dim=8, emb_scale=0.1)
steps = cpc.prediction_steps(8, 4, 3)  # rows 2, 3, 4 below
reference = copy.deepcopy(model)
N = 6
patches = torch.randn(N, 7, 7, 3, 8, 8)

B = N // world
mine = slice(rank * B, (rank + 1) * B)
ddp = torch.nn.parallel.DistributedDataParallel(model)
targets, preds = ddp(patches[mine])
loss, acc = cpc.cpc_loss(preds, common.gather_with_grad(targets.float()), steps, rank * B)
loss.backward()
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)  # every process averages over the same number of predictions
mean_loss /= world

targets_ref, preds_ref = reference(patches)
loss_ref, _ = cpc.cpc_loss(preds_ref, targets_ref, steps, 0)
loss_ref.backward()

torch.testing.assert_close(mean_loss, loss_ref.detach(), atol=1e-5, rtol=0)
worst = 0.0
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    worst = max(worst, (p.grad - q.grad).abs().max().item())
print(f"rank {rank}: loss {mean_loss.item():.6f} == {loss_ref.item():.6f}, max grad diff {worst:.2e}", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
