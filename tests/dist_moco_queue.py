"""Run by tests/test_moco.py under `torchrun --nproc_per_node=2` (CPU, gloo).

1. Shuffled keys across processes: each process encodes a random part of the global batch that
   holds images of the other process too, and gets back the keys of its own images in order, equal
   to one process encoding the global batch (BN in eval mode: per-image keys).
2. The queue after a short 2-process training run is identical on both processes, holds exactly
   the last K keys (oldest first from the pointer on), and those are the keys that both processes
   used as positives, in rank order; every step shuffled the keys by the same permutation on both.
"""

import os
import pathlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402

import moco  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

# 1. shuffle and unshuffle across processes ------------------------------------------------------
torch.manual_seed(0)  # the same weights and the same global batch on every process
encoder = moco.MoCoEncoder("tiny", True, 16, True, 1).eval()
N = 16
B = N // world
x = torch.randn(N, 3, 32, 32)
perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))  # the same on both processes
seen = []
hook = encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
keys = moco.keys_with_shuffling_bn(encoder, x[rank * B:(rank + 1) * B], perm, rank)
hook.remove()
expected = F.normalize(encoder(x), dim=1)[rank * B:(rank + 1) * B]  # this process's images keep their keys
torch.testing.assert_close(keys, expected, atol=1e-6, rtol=0)
mine = [int((x - img).flatten(1).abs().sum(1).argmin()) for img in seen[0]]  # global indices this process encoded
everyone = [None] * world
dist.all_gather_object(everyone, mine)
assert sorted(sum(everyone, [])) == list(range(N)), everyone  # the processes split the global batch
assert any(i // B != rank for i in mine), mine  # and this process encoded images of another process

# 2. the queue after training -------------------------------------------------------------------
positives, perms, last = [], [], {}
real_loss, real_enqueue, real_keys = moco.moco_loss, moco.enqueue, moco.keys_with_shuffling_bn


def recording_loss(q, k, queue, temperature):
    positives.append(k.detach().clone())  # this process's keys (its rows of the global batch)
    return real_loss(q, k, queue, temperature)


def recording_keys(key_encoder, x_k, perm, rank):
    perms.append(perm.clone())
    return real_keys(key_encoder, x_k, perm, rank)


def recording_enqueue(queue, ptr, keys):
    ptr = real_enqueue(queue, ptr, keys)
    last["queue"], last["ptr"] = queue.clone(), ptr
    return ptr


moco.moco_loss, moco.enqueue = recording_loss, recording_enqueue
moco.keys_with_shuffling_bn = recording_keys
steps, K = 5, 64  # 5 steps of 32 global keys: the queue of 64 wrapped around twice
cfg = tiny(moco.Config, pathlib.Path(sys.argv[1]), subset=256, batch_size=32, queue_size=K, max_steps=steps,
           probe_epochs=0)
moco.train(cfg)

queues = [torch.empty_like(last["queue"]) for _ in range(world)]
dist.all_gather(queues, last["queue"])
assert all(torch.equal(q, last["queue"]) for q in queues), "the queues differ between processes"
local = torch.stack(positives)  # (steps, B, D)
gathered = [torch.empty_like(local) for _ in range(world)]
dist.all_gather(gathered, local)
global_keys = torch.cat(gathered, 1)  # (steps, N, D): per step, rank 0's keys then rank 1's
expected = global_keys[-(K // global_keys.shape[1]):].flatten(0, 1)  # the last K keys, oldest first
assert last["ptr"] == steps * cfg.batch_size % K
assert torch.equal(last["queue"].roll(-last["ptr"], 0), expected), "the queue is not the last K keys of both ranks"
assert not torch.allclose(gathered[0], gathered[1])  # the two ranks' keys really differ
all_perms = [torch.empty_like(torch.stack(perms)) for _ in range(world)]
dist.all_gather(all_perms, torch.stack(perms))
assert len(perms) == steps and all(torch.equal(p, all_perms[0]) for p in all_perms), "the shuffles differ"
assert len({tuple(p.tolist()) for p in perms}) == steps  # a new permutation every step
print(f"rank {rank}: queue identical on {world} processes, last {K} keys of both ranks in order; "
      f"shuffle crossed processes ({sum(i // B != rank for i in mine)}/{B} images from the other rank)", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
