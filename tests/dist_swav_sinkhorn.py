"""Run by tests/test_swav.py under `torchrun --nproc_per_node=2` (CPU, gloo).

1. Distributed Sinkhorn: each of W processes holds B = N / W rows of the scores (and Q / W rows of
   a queue); its codes must equal its rows of the codes one process computes on all N (+ Q) rows.
2. One SwAV step (2 global + 2 small crops) on W processes must give the loss and the parameter
   gradients of one process holding the whole batch: codes from the global batch, and DDP's
   average of the per-process mean losses is the global mean.
The one-process references are computed before the process group exists (common's collectives
are then the identity). SyncBatchNorm refuses CPU tensors, so both models run their BatchNorm
layers in eval mode: batch statistics do not enter the comparison.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import swav  # noqa: E402

torch.manual_seed(0)  # the same data and weights on every process
N, Q, K, D, eps, iters, T = 16, 8, 10, 12, 0.05, 3, 0.1
z, queue, protos = (F.normalize(torch.randn(n, D), dim=1) for n in (N, Q, K))  # features, queue, prototypes
codes_ref = swav.sinkhorn(z @ protos.T, eps, iters)  # (N, K), one process
codes_queue_ref = swav.sinkhorn(torch.cat([z, queue]) @ protos.T, eps, iters)[:N]  # batch rows of (N + Q, K)

model = swav.SwAV("tiny", True, 32, 16, K).eval()
reference = copy.deepcopy(model)
x_big, x_small = torch.randn(2, N, 3, 32, 32), torch.randn(2, N, 3, 16, 16)  # (crops, images, ...)


def step(net, big, small):
    """Scores of 2 global + 2 small crops of the same images -> SwAV loss, codes from Sinkhorn."""
    B = big.shape[1]
    _, scores = net(big.flatten(0, 1), small.flatten(0, 1))
    scores = scores.view(4, B, K)
    codes = torch.stack([swav.sinkhorn(scores[i], eps, iters) for i in range(2)])
    return swav.swav_loss(scores, codes, T)


loss_ref = step(reference, x_big, x_small)
loss_ref.backward()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
B, q = N // world, Q // world
mine, my_queue = slice(rank * B, (rank + 1) * B), slice(rank * q, (rank + 1) * q)

codes = swav.sinkhorn(z[mine] @ protos.T, eps, iters)  # (B, K): sums over the batch span both processes
torch.testing.assert_close(codes, codes_ref[mine], atol=1e-6, rtol=1e-5)
codes_queue = swav.sinkhorn(torch.cat([z[mine], queue[my_queue]]) @ protos.T, eps, iters)[:B]
torch.testing.assert_close(codes_queue, codes_queue_ref[mine], atol=1e-6, rtol=1e-5)
sk_diff = max((codes - codes_ref[mine]).abs().max().item(), (codes_queue - codes_queue_ref[mine]).abs().max().item())

ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = step(ddp, x_big[:, mine], x_small[:, mine])
loss.backward()
dist.all_reduce(mean_loss := loss.detach().clone())  # each process's loss is the mean over its share
torch.testing.assert_close(mean_loss / world, loss_ref, atol=1e-5, rtol=1e-6)
worst = 0.0  # largest gradient difference relative to the largest reference gradient of the same tensor
for (name, p), r in zip(model.named_parameters(), reference.parameters()):
    scale = r.grad.abs().max().item()  # float32 sums in another order: compare to the tensor's scale
    torch.testing.assert_close(p.grad, r.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    worst = max(worst, (p.grad - r.grad).abs().max().item() / scale)
print(f"rank {rank}: sinkhorn max diff {sk_diff:.2e}, loss {mean_loss.item() / world:.6f} == {loss_ref.item():.6f}, "
      f"max grad diff {worst:.2e} (relative)", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
