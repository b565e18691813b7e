"""Run by tests/test_barlow.py under `torchrun --nproc_per_node=2` (CPU, gloo).

The official main.py on W processes, written out here: z standardized by a BatchNorm synchronized
across processes, C = bn(z1).T bn(z2) / N summed over processes by an in-place all_reduce that
autograd does not see (the gradient of the summed C flows back into this process's term alone),
DDP's mean of the gradients, then its LARS (weights and biases in two groups, the biases neither
adapted nor decayed, lrs 0.2 and 0.0048 per 256 images). Its gradient is 1/W of the gradient of
the global loss. barlow.py, with the flags its docstring gives for the official W-GPU run
(`--loss_scale=1/W` with the official LARS), must take the very same step.
The one-process reference is computed before the process group exists (common's collectives are
then the identity). SyncBatchNorm refuses CPU tensors, so the encoders run their BatchNorm layers
in eval mode; the loss's own standardization is synchronized by hand, as SyncBatchNorm does.
"""

import copy
import os
import re
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import barlow  # noqa: E402
import common  # noqa: E402

torch.manual_seed(0)  # the same weights and the same global batch on every process
model = barlow.BarlowTwins("tiny", True, 64).eval()
official, reference = copy.deepcopy(model), copy.deepcopy(model)
N, lambd = 16, 0.0051
x1, x2 = torch.randn(N, 3, 32, 32), torch.randn(N, 3, 32, 32)

zr1, zr2 = reference(x1, x2)  # one process, all N pairs: the gradient of the global loss
barlow.barlow_twins_loss(zr1, zr2, lambd).backward()

dist.init_process_group("gloo")
rank, W = dist.get_rank(), dist.get_world_size()
mine = slice(rank * N // W, (rank + 1) * N // W)


def synced_bn(z):
    """BatchNorm1d(affine=False) synchronized over processes, training mode: global mean, biased variance."""
    mean = dist_nn.all_reduce(z.sum(0)) / N
    var = dist_nn.all_reduce((z - mean).pow(2).sum(0)) / N
    return (z - mean) / (var + 1e-5).sqrt()


# the official step: C of the global batch, its gradient reaching this process's term only
ddp_official = torch.nn.parallel.DistributedDataParallel(official)  # kept alive: its hooks average the gradients
z1, z2 = ddp_official(x1[mine], x2[mine])
c = synced_bn(z1).T @ synced_bn(z2) / N  # this process's term of C
with torch.no_grad():
    others = c.clone()
    dist.all_reduce(others)  # C summed over processes ...
    others -= c  # ... less this process's term: a constant to autograd, as main.py's in-place all_reduce
c = c + others
off = c - torch.diag(torch.diagonal(c))
(torch.diagonal(c).add(-1).pow(2).sum() + lambd * off.pow(2).sum()).backward()

# this file with the flags its docstring states for the official W-GPU run
flags = re.search(r"`(--lars_form=byol[^`]*)`", barlow.__doc__).group(1).replace("1/W", str(1 / W)).split()
cfg = common.parse_config(barlow.Config, flags)
assert cfg.loss_scale == 1 / W and cfg.lars_form == "byol", flags
ddp = torch.nn.parallel.DistributedDataParallel(model)
z1, z2 = ddp(x1[mine], x2[mine])
(cfg.loss_scale * barlow.barlow_twins_loss(z1, z2, cfg.lambd)).backward()

worst_scale, worst_mine = 0.0, 0.0  # largest differences relative to the largest reference gradient of a tensor
for (name, p), q, r in zip(model.named_parameters(), official.parameters(), reference.parameters()):
    scale = r.grad.abs().max().item()
    torch.testing.assert_close(q.grad, r.grad / W, atol=1e-5 * scale, rtol=1e-4, msg=name)  # the official 1/W
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)  # this file == official
    worst_scale = max(worst_scale, (q.grad - r.grad / W).abs().max().item() / scale)
    worst_mine = max(worst_mine, (p.grad - q.grad).abs().max().item() / scale)

# one step of each optimizer at the peak lr of a batch of N: main.py's LARS, written out, and this file's
base = N / 256
lr, lr_biases = cfg.lr * base, cfg.lr_biases * base
opt = common.LARS(common.param_groups(model, cfg.weight_decay), lr=lr, momentum=0.9, eta=cfg.lars_eta,
                  clip=cfg.lars_clip, form=cfg.lars_form)  # as train() builds it
common.set_lr(opt, lr, biases=lr * lr_biases / lr)
opt.step()
with torch.no_grad():
    for p in official.parameters():
        bias = p.ndim == 1  # main.py: biases and BN parameters, lr 0.0048, no weight decay, no adaptation
        d = p.grad if bias else p.grad + 1e-6 * p
        if not bias and p.norm() > 0 and d.norm() > 0:
            d = d * 0.001 * p.norm() / d.norm()
        p -= (0.0048 if bias else 0.2) * base * d  # the first step: the momentum buffer is d
steps = [(p - q).abs().max().item() for p, q in zip(model.parameters(), official.parameters())]
assert max(steps) < 1e-7, max(steps)
print(f"rank {rank}: official gradient = global gradient / {W} (max rel diff {worst_scale:.1e}); this file's "
      f"gradient with loss_scale {cfg.loss_scale} = official (max rel diff {worst_mine:.1e}); "
      f"the same LARS step (max diff {max(steps):.1e})", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
