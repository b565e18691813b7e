"""moco.py: the loss against hand computation, the queue, the momentum encoder, shuffled BN, and the
training loop's contract on CPU."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, load_ckpt, read_log, tiny)

import common
import moco

# ------------------------------------------------------------------------------------------- loss


def test_moco_loss_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, -0.8]])
    T = 0.5
    # query 0: positive cos 0.6, negatives 1, -1, 0.6; query 1: positive 1, negatives 0, 0, -0.8
    loss0 = -math.log(math.exp(0.6 / T) / (math.exp(0.6 / T) + math.exp(1 / T) + math.exp(-1 / T) + math.exp(0.6 / T)))
    loss1 = -math.log(math.exp(1 / T) / (math.exp(1 / T) + 2 + math.exp(-0.8 / T)))
    assert moco.moco_loss(q, k, queue, T).item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_moco_loss_is_cross_entropy_with_positive_first_and_gradient_to_queries_only():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    T = 0.2
    losses = []
    for i in range(6):  # logits of query i: [positive, the 20 queue keys]
        logits = torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / T
        losses.append(-F.log_softmax(logits, 0)[0])
    loss = moco.moco_loss(q, k, queue, T)
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    loss.backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None  # keys are constants
    # a query equal to its key, orthogonal to every negative: -log(e^(1/T) / (e^(1/T) + K))
    e = torch.eye(4)
    expected = -math.log(math.exp(1 / T) / (math.exp(1 / T) + 2))
    assert moco.moco_loss(e[:2], e[:2], e[2:], T).item() == pytest.approx(expected, rel=1e-6)


def test_moco_loss_is_float32_under_bfloat16_inputs():
    torch.manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 16), dim=1) for n in (4, 4, 32))
    loss = moco.moco_loss(q.bfloat16(), k.bfloat16(), queue, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, moco.moco_loss(q.bfloat16().float(), k.bfloat16().float(), queue, 0.1))


# ------------------------------------------------------------------------------- queue and keys


def test_queue_holds_exactly_the_last_K_keys_oldest_first():
    K, n, D = 12, 4, 3
    queue, ptr, batches = torch.zeros(K, D), 0, []
    for step in range(7):  # 7 batches of 4 into a queue of 12: wraps around twice
        keys = torch.arange(step * n * D, (step + 1) * n * D, dtype=torch.float).view(n, D)
        batches.append(keys)
        ptr = moco.enqueue(queue, ptr, keys)
        assert ptr == (step + 1) * n % K
        if step >= 2:
            assert torch.equal(queue.roll(-ptr, 0), torch.cat(batches[-3:]))  # the last K keys, oldest first


class Recorder(nn.Module):
    """A per-image key function (no batch statistics) that remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1)[:, :5] * 2 + 1


def test_keys_are_encoded_in_the_shuffled_order_and_returned_in_image_order():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    rec = Recorder()
    keys = moco.keys_with_shuffling_bn(rec, x, perm, rank=0)
    torch.testing.assert_close(keys, F.normalize(x.flatten(1)[:, :5] * 2 + 1, dim=1))  # image i keeps its key
    seen = rec.seen[0]
    assert not torch.equal(seen, x) and torch.equal(seen, x[perm])  # the encoder saw the batch in perm's order


def test_split_batchnorm_normalizes_each_group_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(12, 4, 3, 3) * 3 + torch.arange(12.0).view(12, 1, 1, 1)  # groups with different statistics
    split = moco.SplitBatchNorm(4, group_size=4)
    nn.init.normal_(split.weight)
    nn.init.normal_(split.bias)
    parts = [nn.BatchNorm2d(4) for _ in range(3)]
    for p in parts:
        p.load_state_dict(split.state_dict())
    y = split(x)
    torch.testing.assert_close(y, torch.cat([p(c) for p, c in zip(parts, x.chunk(3))]))  # contiguous groups of 4
    torch.testing.assert_close(split.running_mean, torch.stack([p.running_mean for p in parts]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([p.running_var for p in parts]).mean(0))
    plain = nn.BatchNorm2d(4).eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split.eval()(x), plain(x))  # evaluation: the running statistics, as BatchNorm2d
    one = nn.BatchNorm2d(4)
    one.load_state_dict(split.train().state_dict())
    torch.testing.assert_close(split(x[:4]), one(x[:4]))  # a batch of one group: BatchNorm2d itself
    torch.testing.assert_close(split.running_mean, one.running_mean)


def test_one_query_pass_normalizes_each_crop_on_its_own_as_the_demos_two_passes():
    """--symmetric encodes both crops in one pass; BN groups of a fixed size never mix the two crops."""
    torch.manual_seed(0)
    encoder = moco.MoCoEncoder("tiny", True, 16, mlp=True, bn_group_size=4)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) * 2 + 1  # crops with different statistics
    both = encoder(torch.cat([x1, x2]))
    torch.testing.assert_close(both, torch.cat([encoder(x1), encoder(x2)]))


def test_heads_of_v1_and_v2_and_split_batchnorm_in_the_encoder():
    v1 = moco.MoCoEncoder("tiny", True, 16, mlp=False, bn_group_size=8)
    v2 = moco.MoCoEncoder("tiny", True, 16, mlp=True, bn_group_size=2)
    assert isinstance(v1.head, nn.Linear) and [type(m) for m in v2.head] == [nn.Linear, nn.ReLU, nn.Linear]
    for encoder, n in [(v1, 8), (v2, 2)]:  # every BN of the tiny trunk, with its group size
        splits = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(splits) == 4 and all(isinstance(m, moco.SplitBatchNorm) and m.group_size == n for m in splits)
    assert v2(torch.randn(8, 3, 32, 32)).shape == (8, 16)


def test_config_refuses_impossible_values():
    with pytest.raises(ValueError, match="--queue_size=100 .* multiple of the 64 keys"):
        moco.Config(batch_size=64, queue_size=100)
    with pytest.raises(ValueError, match="--queue_size=192 .* 128 keys"):  # symmetric: 2 keys per image
        moco.Config(batch_size=64, queue_size=192, symmetric=True)
    with pytest.raises(ValueError, match="--bn_splits=3"):
        moco.Config(batch_size=64, bn_splits=3)
    with pytest.raises(ValueError, match="--version"):
        moco.Config(version=3)


# ---------------------------------------------------------------- key encoder and queue in train()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 3-step run that records every moving-average update (key encoder before and after, query
    encoder) and the keys of every step; returns them with its config and checkpoint."""
    updates, keys, real_ema, real_keys = [], [], common.ema_update, moco.keys_with_shuffling_bn

    def recording_ema(target, online, momentum):
        assert not any(p.requires_grad for p in target.parameters())  # no gradient ever reaches f_k
        before = [p.detach().clone() for p in target.parameters()]
        real_ema(target, online, momentum)
        updates.append((momentum, before, [p.detach().clone() for p in online.parameters()],
                        [p.detach().clone() for p in target.parameters()]))

    def recording_keys(*args, **kwargs):
        out = real_keys(*args, **kwargs)
        keys.append(out.clone())
        return out

    common.ema_update, moco.keys_with_shuffling_bn = recording_ema, recording_keys
    try:  # 3 steps of 64 images into a queue of 128 keys
        cfg = tiny(moco.Config, tmp_path_factory.mktemp("run"), subset=192, queue_size=128, key_momentum=0.9,
                   max_steps=3, probe_epochs=0)
        moco.train(cfg)
    finally:
        common.ema_update, moco.keys_with_shuffling_bn = real_ema, real_keys
    return cfg, load_ckpt(cfg), updates, keys


def test_key_encoder_follows_the_moving_average(short_run):
    _, state, updates, _ = short_run
    assert len(updates) == 3
    for momentum, before, query, after in updates:  # every step: theta_k <- 0.9 theta_k + 0.1 theta_q
        assert momentum == 0.9
        for k0, q, k1 in zip(before, query, after):
            torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q, atol=1e-6, rtol=1e-5)
        assert any(not torch.equal(k1, q) for q, k1 in zip(query, after))  # f_k lags behind f_q
    names = [n for n, _ in moco.MoCoEncoder("tiny", True, 128, True, 8).named_parameters()]
    for name, k1 in zip(names, updates[-1][3]):  # the checkpoint holds the key encoder after the last update
        assert torch.equal(state["key_encoder"][name], k1), name
    # BN running statistics are the key encoder's own, from its forward passes, not averaged
    assert not torch.equal(state["key_encoder"]["backbone.1.running_mean"], state["model"]["backbone.1.running_mean"])


def test_training_queue_holds_the_last_keys(short_run):
    _, state, _, keys = short_run
    assert len(keys) == 3 and state["queue_ptr"] == 3 * 64 % 128
    torch.testing.assert_close(state["queue"].roll(-state["queue_ptr"], 0), torch.cat(keys[-2:]), atol=0, rtol=0)
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(128))


def test_a_training_step_is_algorithm_1(tmp_path, monkeypatch):
    """Per step, in the paper's order: keys without gradient, loss, SGD step of f_q, momentum update
    of f_k, enqueue; so the keys of step t come from f_k before its update at step t."""
    events = []

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(moco, "keys_with_shuffling_bn", recording("keys", moco.keys_with_shuffling_bn))
    monkeypatch.setattr(moco, "moco_loss", recording("loss", moco.moco_loss))
    monkeypatch.setattr(torch.optim.SGD, "step", recording("update f_q", torch.optim.SGD.step))
    monkeypatch.setattr(common, "ema_update", recording("update f_k", common.ema_update))
    monkeypatch.setattr(moco, "enqueue", recording("enqueue", moco.enqueue))
    moco.train(tiny(moco.Config, tmp_path, subset=128, queue_size=128, max_steps=2, probe_epochs=0))
    assert events == ["keys", "loss", "update f_q", "update f_k", "enqueue"] * 2


def test_resume_refuses_other_settings(short_run):
    cfg = dataclasses.replace(short_run[0], queue_size=256, resume=True)
    with pytest.raises(common.RunError, match="queue_size=128"):
        moco.train(cfg)


def test_two_processes_share_the_queue_and_shuffle_across_processes(dist_scripts):
    out = dist_scripts("dist_moco_queue.py")
    assert out.count("queue identical on 2 processes, last 64 keys of both ranks in order") == 2, out


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(moco, tmp_path, extra_keys=("version",))
    assert results["steps"] == 16 and results["version"] == 2 and results["mlp"] is True
    assert "head.0.weight" in load_ckpt(cfg)["model"]  # the default: v2's MLP head
    log = read_log(cfg)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert {"z_std", "pos_cos"} <= set(log[1])  # log[0]: the monitor at random initialisation
    state = load_ckpt(cfg)
    assert state["queue"].shape == (4096, 128) and state["queue_ptr"] == 16 * 64


def test_resume_is_exact_including_queue_and_key_encoder(tmp_path):
    """v1 (its views, a linear head) with the symmetric loss, a queue that wraps around: weights, key
    encoder, queue, pointer."""
    assert_resumes_exactly(moco, tmp_path, version=1, mlp=False, symmetric=True, queue_size=256)
    state = load_ckpt(tiny(moco.Config, tmp_path / "b", version=1, mlp=False, symmetric=True, queue_size=256))
    assert {"model", "key_encoder", "queue", "queue_ptr", "opt"} <= set(state)
    assert "head.weight" in state["model"] and "head.0.weight" not in state["model"]  # --mlp=false: one fc layer
    assert state["queue_ptr"] == 8 * 128 % 256  # 8 steps of 2 x 64 keys: the queue was overwritten 4 times


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(moco, "moco_loss", monkeypatch, tmp_path)


def test_blur_is_the_official_loaders_pil_blur(tmp_path, monkeypatch):
    # loader.py: PIL's GaussianBlur(radius=sigma), sigma ~ U(0.1, 2), p 0.5: common's kernel sized by sigma
    calls, blur = [], common.gaussian_blur
    monkeypatch.setattr(common, "gaussian_blur", lambda x, **kw: calls.append(kw) or blur(x, **kw))
    moco.moco_view(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tiny(moco.Config, tmp_path, blur=True))
    assert calls == [dict(p=0.5, sigma=(0.1, 2.0), kernel="sigma")]


def test_views_of_v2_and_v1(monkeypatch):
    """v2: SimCLR's jitter at strength 0.5, (0.4, 0.4, 0.4, 0.1) on 80% of the views, then grayscale on 20%;
    v1 (InstDisc's): grayscale on 20% first, then a jitter with a hue of 0.4 on every view."""
    calls = []
    for name in ("color_jitter", "random_grayscale"):
        monkeypatch.setattr(common, name, lambda x, *args, _name=name, **kw: calls.append((_name, args, kw)) or x)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    moco.moco_view(x, moco.Config())
    assert calls == [("color_jitter", (0.4, 0.4, 0.4, 0.1), dict(p=0.8)), ("random_grayscale", (), dict(p=0.2))]
    calls.clear()
    moco.moco_view(x, moco.Config(version=1))
    assert calls == [("random_grayscale", (), dict(p=0.2)), ("color_jitter", (0.4, 0.4, 0.4, 0.4), {})]


def test_a_symmetric_step_sums_both_losses_of_unit_queries_at_the_scaled_lr(tmp_path, monkeypatch):
    """train() gives moco_loss L2-normalized queries (Eq. 1 is over cosines); --symmetric minimizes the SUM of
    the two directions (the demo's loss_12 + loss_21); SGD's lr is lr x batch / 256 (0.06 at 512)."""
    seen, real = [], moco.moco_loss

    def recording(q, k, queue, temperature):
        loss = real(q, k, queue, temperature)
        seen.append((q.detach(), loss.item()))
        return loss

    monkeypatch.setattr(moco, "moco_loss", recording)
    cfg = tiny(moco.Config, tmp_path, subset=128, symmetric=True, queue_size=128, max_steps=1, probe_epochs=0)
    moco.train(cfg)
    (record,) = read_log(cfg, steps=True)
    assert len(seen) == 2 and all(torch.allclose(q.norm(dim=1), torch.ones(len(q))) for q, _ in seen)
    assert record["loss"] == pytest.approx(seen[0][1] + seen[1][1], rel=1e-6)
    assert record["lr"] == pytest.approx(cfg.lr * cfg.batch_size / 256)  # no warmup: the base lr at step 0


# ------------------------------------------------- the resumed pointer, the head, defaults, evaluated features


def test_resume_restores_the_queue_pointer(tmp_path):
    """Stopped after 4 steps of 64 keys in a queue of 192, the oldest key sits at row 64: the resumed run must write
    its keys there (a pointer restarted at 0 would overwrite the newest keys and keep the oldest)."""
    assert_resumes_exactly(moco, tmp_path, queue_size=192)
    assert load_ckpt(tiny(moco.Config, tmp_path / "b", queue_size=192))["queue_ptr"] == 8 * 64 % 192


def test_v2_head_is_fc_relu_fc_with_a_trunk_wide_hidden_layer():
    """C builder.py (--mlp): dim_mlp = the trunk's width, fc (dim_mlp -> dim_mlp), ReLU, fc (dim_mlp -> 128), with
    biases (docstring: "MLP, trunk-wide"); the tiny trunk is 128 wide."""
    head = moco.MoCoEncoder("tiny", True, 16, mlp=True, bn_group_size=8).head
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(128, 128), (128, 16)]
    assert head[0].bias is not None and head[2].bias is not None


def test_defaults_are_the_cifar10_demos():
    """colab/moco_cifar10_demo.ipynb: moco_k 4096, moco_m 0.99, moco_t 0.1, bn_splits 8, lr 0.06 at batch 512,
    weight decay 5e-4, moco_dim 128, asymmetric loss, crops of area (0.08, 1), cosine without warmup; 800 epochs (its
    table)."""
    cfg = moco.Config()
    recipe = dict(queue_size=4096, key_momentum=0.99, temperature=0.1, bn_splits=8, batch_size=512, weight_decay=5e-4,
                  proj_dim=128, symmetric=False, crop_min=0.08, warmup_epochs=0, epochs=800, arch="resnet18")
    assert {k: getattr(cfg, k) for k in recipe} == recipe
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(0.06)


def test_evaluated_features_and_encoder_pt_are_the_query_encoders_backbone(tmp_path, monkeypatch):
    """P v1 Sec. 4.1 (frozen pool5 of the query encoder f_q; docstring: h of f_q, not the head's output): the three
    evaluations score f_q's backbone, not the lagging key encoder's, and encoder.pt holds that backbone."""
    cfg = tiny(moco.Config, tmp_path, subset=128, queue_size=128, max_steps=2, probe_epochs=0)
    assert_features_and_encoder_are_the_backbone(moco, cfg, monkeypatch)
