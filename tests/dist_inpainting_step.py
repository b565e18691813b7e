"""Run by tests/test_inpainting.py under `torchrun --nproc_per_node=2` (CPU, gloo).

One context-encoder step as train() takes it, with both networks wrapped in DDP: D called twice (real
and detached predicted regions) before its backward, then F's joint loss through D. On W processes
each holding N / W images, the gradients of D and of F must equal those of one process holding all N
(random regions, so the images' holes and bands differ in size: the per-image normalisation of the
reconstruction loss is what makes the averages agree). SyncBatchNorm refuses CPU tensors, so
both networks run their BatchNorm layers in eval mode: batch statistics do not enter the comparison.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import inpainting  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same weights, images and masks on every process
model, disc = inpainting.ContextEncoder("tiny", True, 32).eval(), inpainting.Discriminator(32, 16).eval()
reference, reference_disc = copy.deepcopy(model), copy.deepcopy(disc)
N = 8
img, region, fill = torch.rand(N, 3, 32, 32), inpainting.random_regions(N, 32), torch.tensor([0.5, 0.4, 0.3])


def gan_step(model, disc, img, region):
    """D's loss and gradients (then cleared), F's joint loss and gradients, as in train()."""
    hole, target = inpainting.hole_in(region, 1), img * 2 - 1
    pred = model(common.normalize(inpainting.mask_image(img, hole, fill)))
    d_loss = inpainting.discriminator_loss(disc(target * region), disc(pred.detach() * region))
    d_loss.backward()
    d_grads = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad(set_to_none=True)
    loss = (0.999 * inpainting.reconstruction_loss(pred, target, hole, region, 10.0) +
            0.001 * inpainting.adversarial_loss(disc(pred * region)))
    loss.backward()
    return d_grads


mine = slice(rank * N // world, (rank + 1) * N // world)
ddp, ddp_disc = torch.nn.parallel.DistributedDataParallel(model), torch.nn.parallel.DistributedDataParallel(disc)
d_grads = gan_step(ddp, ddp_disc, img[mine], region[mine])
d_grads_ref = gan_step(reference, reference_disc, img, region)

worst = 0.0
for g, g_ref in zip(d_grads, d_grads_ref):
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    worst = max(worst, (g - g_ref).abs().max().item())
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    worst = max(worst, (p.grad - q.grad).abs().max().item())
print(f"rank {rank}: D and F gradients equal one process on the global batch, max grad diff {worst:.2e}", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
