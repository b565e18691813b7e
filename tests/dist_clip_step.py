"""Run by tests/test_clip.py under `torchrun --nproc_per_node=2` (CPU, gloo).

One CLIP step on W processes (each holding B = N / W image-caption pairs) must give the loss and
the gradients of every parameter (image and text towers, projections, the logit scale) of one
process holding all N pairs: each image's negatives are the captions of the GLOBAL batch, and DDP's
averaged gradient is not scaled by W. SyncBatchNorm refuses CPU tensors, so the image trunk's
BatchNorm layers run in eval mode (fixed statistics) in both models; the text tower has none.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip  # noqa: E402
import common  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same weights and the same global batch on every process
model = clip.CLIP("tiny", True, 32, 24, 32, 2, 2, 0.07)
model.backbone.eval()
reference = copy.deepcopy(model)
N = 16
images = torch.randn(N, 3, 32, 32)
tokens = clip.tokenize([f"caption {i}: {'ünïcödé ' * (i % 3)}" for i in range(N)], 24)

B = N // world
mine = slice(rank * B, (rank + 1) * B)
ddp = torch.nn.parallel.DistributedDataParallel(model)
img, txt, scale = ddp(images[mine], tokens[mine])
loss = clip.clip_loss(common.gather_with_grad(img), common.gather_with_grad(txt), scale)
loss.backward()

img_ref, txt_ref, scale_ref = reference(images, tokens)
loss_ref = clip.clip_loss(img_ref, txt_ref, scale_ref)
loss_ref.backward()

torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
worst = 0.0
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    assert q.grad is not None and q.grad.abs().sum() > 0, name  # every parameter takes part
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    worst = max(worst, (p.grad - q.grad).abs().max().item())
print(f"rank {rank}: loss {loss.item():.6f} == {loss_ref.item():.6f}, max grad diff {worst:.2e}", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
