"""byol.py: the loss against hand computation, the target network (no gradient, EMA only, its
schedule), and the training loop's contract on CPU."""


import pytest
import torch

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, load_ckpt, read_log, tiny)

import byol
import common

# ------------------------------------------------------------------------------------------- loss


def test_byol_loss_hand_computed():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[4.0, 3.0], [0.0, 5.0], [0.0, -1.0]])
    # cos: 24/25, 0, -1 -> 2 - 2 cos: 0.08, 2, 4
    assert byol.byol_loss(p, z).item() == pytest.approx((0.08 + 2 + 4) / 3, rel=1e-6)


def test_byol_loss_range_and_identities():
    torch.manual_seed(0)
    p, z = torch.randn(32, 16), torch.randn(32, 16)
    assert byol.byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)  # p == z: aligned
    assert byol.byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)  # p == -z: opposite
    assert byol.byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)  # scale-free (normalized inside)
    loss = byol.byol_loss(p, z)
    assert 0 < loss.item() < 4
    for i in range(32):  # every per-sample term lies in [0, 4]
        assert 0 <= byol.byol_loss(p[i:i + 1], z[i:i + 1]).item() <= 4
    # equals the mean squared distance of the normalized vectors (paper Eq. 2)
    d = (p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, d)


def test_byol_loss_treats_z_as_constant():
    torch.manual_seed(0)
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol.byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- target network


def test_tau_schedule_endpoints():
    K = 1000
    assert byol.target_tau(0, K, 0.99) == pytest.approx(0.99)
    assert byol.target_tau(K, K, 0.99) == pytest.approx(1.0)
    assert byol.target_tau(K // 2, K, 0.99) == pytest.approx(0.995)  # halfway up the cosine
    taus = [byol.target_tau(k, K, 0.996) for k in range(0, K + 1, 50)]
    assert all(a < b for a, b in zip(taus, taus[1:]))  # rises monotonically


def test_no_gradient_reaches_the_target_and_it_changes_only_by_ema():
    torch.manual_seed(0)
    model = byol.BYOL("tiny", True, 64, 32)
    target = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    assert all(not t.requires_grad for t in target) and all(torch.equal(t, o) for t, o in zip(target, online))
    opt = common.LARS(common.param_groups(model, 1e-5), lr=1.0)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(t) in in_opt for t in target)  # the optimizer does not hold the target

    before = [t.clone() for t in target]
    p1, p2, t1, t2 = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    assert not t1.requires_grad and not t2.requires_grad
    loss = 2 * byol.byol_loss(torch.cat([p1, p2]), torch.cat([t2, t1]))
    loss.backward()
    assert all(t.grad is None for t in target)
    assert all(o.grad is not None for o in online)
    opt.step()
    assert all(torch.equal(t, b) for t, b in zip(target, before))  # the optimizer step did not move it
    assert not all(torch.equal(o, b) for o, b in zip(online, before))  # the online network moved
    tau = 0.9
    byol.common.ema_update(model.target_backbone, model.backbone, tau)
    byol.common.ema_update(model.target_projector, model.projector, tau)
    for t, b, o in zip(target, before, online):  # xi <- tau xi + (1 - tau) theta (paper Eq. 1)
        torch.testing.assert_close(t, tau * b + (1 - tau) * o)


def test_training_leaves_the_target_at_init_when_tau_is_one(tmp_path):
    """With tau_base = 1 the EMA never moves the target: after a real run it still equals the
    initial weights, so nothing else in the loop (optimizer, DDP, gradients) touches it."""
    cfg = tiny(byol.Config, tmp_path, tau_base=1.0, subset=128, batch_size=32, max_steps=4, probe_epochs=0,
               proj_hidden=64)
    byol.train(cfg)
    state, init = load_ckpt(cfg)["model"], initial_weights(cfg)
    target = [k for k in init if k.startswith(("target_backbone.", "target_projector.")) and "running" not in k
              and "num_batches" not in k]
    assert target and all(torch.equal(state[k], init[k]) for k in target)
    assert not torch.equal(state["backbone.0.weight"], init["backbone.0.weight"])  # while the online network learned


def initial_weights(cfg):
    """The weights train(cfg) starts from: it builds its model right after seeding (common.setup)."""
    torch.manual_seed(cfg.seed)
    return byol.BYOL(cfg.arch, True, cfg.proj_hidden, cfg.proj_dim).state_dict()


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(byol, tmp_path, extra_keys=("z_std",), proj_hidden=64)
    assert results["steps"] == 16 and 0 < results["z_std"] < 1
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert all(0 <= r["loss"] <= 8 and "z_std" in r and cfg.tau_base <= r["tau"] < 1 for r in steps)
    # the target is checkpointed; it has left its initial weights but lags behind the online network
    state, init = load_ckpt(cfg)["model"], initial_weights(cfg)
    target, online, start = state["target_backbone.0.weight"], state["backbone.0.weight"], init["backbone.0.weight"]
    assert not torch.equal(target, start) and not torch.equal(target, online)
    assert (target - start).norm() < (online - start).norm()


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(byol, tmp_path, proj_hidden=64)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(byol, "byol_loss", monkeypatch, tmp_path, proj_hidden=64)


def test_the_optimizer_is_solo_learns_lars_and_the_official_one_a_flag_away(tmp_path):
    """The CIFAR recipe's LARS (solo-learn lars.py, byol.yaml): trust eta |w| / (|g| + wd |w|) with eta
    0.02, each layer's rate capped at lr, biases and BN neither adapted nor decayed ("larc")."""
    for form in ("larc", "byol"):
        cfg = tiny(byol.Config, tmp_path / form, subset=64, batch_size=32, max_steps=1, probe_epochs=0,
                   proj_hidden=64, **({} if form == "larc" else dict(lars_form="byol")))
        byol.train(cfg)
        groups = load_ckpt(cfg)["opt"]["param_groups"]
        assert [g["form"] for g in groups] == [form, form]
        assert all(g["eta"] == 0.02 and g["clip"] for g in groups)
        biases = next(g for g in groups if g["name"] == "biases")
        assert biases["lars_exclude"] and biases["weight_decay"] == 0


def test_blur_is_off_by_default_and_with_blur_the_papers(monkeypatch):
    """solo-learn's CIFAR recipe has no blur (asymmetric.yaml: gaussian_prob 0.0); --blur gives the
    paper's p = 1.0 / 0.1 with the official code's kernel, ~10% of the image side."""
    calls = []
    monkeypatch.setattr(common, "gaussian_blur", lambda x, **kw: calls.append(kw) or x)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    byol.byol_view(x, byol.Config(), blur_p=1.0, solarize_p=0.0)
    assert calls == []
    blur = byol.Config(blur=True)
    byol.byol_view(x, blur, blur_p=1.0, solarize_p=0.0)
    byol.byol_view(x, blur, blur_p=0.1, solarize_p=0.2)
    assert calls == [dict(p=1.0, kernel="side"), dict(p=0.1, kernel="side")]


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="--tau_base"):
        byol.Config(tau_base=1.5)
    with pytest.raises(ValueError, match="--crop_min"):
        byol.Config(crop_min=0.0)
    with pytest.raises(ValueError, match="--lars_form"):
        byol.Config(lars_form="sgd")


# ---------------------------------------------------------------------------------- learning


def test_the_predictor_is_on_the_online_path_only():
    """Paper Fig. 2: p = q(g(f(v))) online, t = g'(f'(v)) target: the predictor on the online side only."""
    torch.manual_seed(0)
    model = byol.BYOL("tiny", True, 64, 32)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    p1, p2, t1, t2 = model(x1, x2)  # BatchNorm on batch statistics: the same batch, the same outputs below
    for x, p, t in [(x1, p1, t1), (x2, p2, t2)]:
        torch.testing.assert_close(p, model.predictor(model.projector(model.backbone(x))))
        torch.testing.assert_close(t, model.target_projector(model.target_backbone(x)))


def test_a_training_step_swaps_the_views_and_moves_the_whole_target_by_the_scheduled_tau(tmp_path, monkeypatch):
    """Per step: v ~ T (blur 1.0, solarize 0.0), v' ~ T' (0.1, 0.2) (Table 6); each prediction regresses the OTHER
    view's target, [p1, p2] against [t2, t1] (Sec. 3.1); then f' and g' both move by tau(k) of the cosine (Eq. 1)."""
    views, losses, emas, outs = [], [], [], []
    real_view, real_loss, real_ema, real_forward = byol.byol_view, byol.byol_loss, common.ema_update, byol.BYOL.forward
    monkeypatch.setattr(byol, "byol_view", lambda x, cfg, **kw: views.append(kw) or real_view(x, cfg, **kw))
    monkeypatch.setattr(byol, "byol_loss", lambda p, z: losses.append((p, z)) or real_loss(p, z))
    monkeypatch.setattr(common, "ema_update", lambda t, o, m: emas.append((t, o, m)) or real_ema(t, o, m))
    monkeypatch.setattr(byol.BYOL, "forward", lambda self, x1, x2: outs.append((self, real_forward(self, x1, x2)))
                        or outs[-1][1])
    cfg = tiny(byol.Config, tmp_path, subset=128, batch_size=32, max_steps=2, probe_epochs=0, proj_hidden=64)
    byol.train(cfg)  # 4 steps per epoch, 2 of them run
    assert views == [dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2)] * 2
    for (p, z), (_, (p1, p2, t1, t2)) in zip(losses, outs, strict=True):
        assert torch.equal(p, torch.cat([p1, p2])) and torch.equal(z, torch.cat([t2, t1]))
    m, tau = outs[0][0], [byol.target_tau(k, 4, cfg.tau_base) for k in range(2)]
    assert emas == [(m.target_backbone, m.backbone, tau[0]), (m.target_projector, m.projector, tau[0]),
                    (m.target_backbone, m.backbone, tau[1]), (m.target_projector, m.projector, tau[1])]


# ------------------------------------------------------------- schedule, heads, defaults, evaluated features


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """Paper Sec. 3.3 and S (warmup_cosine): linear warmup from 0 over warmup_epochs x steps per epoch, then cosine
    to 0 at epochs x steps per epoch. 4 steps per epoch, 3 epochs, 1 of warmup, stopped after 6 steps."""
    assert_warmup_then_cosine(byol, tmp_path, proj_hidden=64)


def test_projector_and_predictor_are_fc_bn_relu_fc_with_an_output_bias():
    """Paper Sec. 3.3: fc (proj_hidden), BN, ReLU, fc (proj_dim), for g and q alike; the output fc keeps its bias as
    S's (docstring table: "MLP output layer: a bias (S)")."""
    model = byol.BYOL("tiny", True, 64, 32)  # the tiny trunk: 128 wide
    for net, d_in in [(model.projector, 128), (model.predictor, 32)]:
        assert [type(m) for m in net] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
        assert [(m.in_features, m.out_features) for m in net[::3]] == [(d_in, 64), (64, 32)]
        assert net[0].bias is not None and net[3].bias is not None


def test_defaults_are_solo_learns_cifar_recipe():
    """S scripts/pretrain/cifar/byol.yaml (docstring table): projector and predictor 4096 hidden, 256 out, base_tau
    0.99, LARS lr 1.0 per 256 (eta 0.02, clip_lr), weight decay 1e-5, batch 256, 1000 epochs, 10 warmup epochs."""
    cfg = byol.Config()
    recipe = dict(proj_hidden=4096, proj_dim=256, tau_base=0.99, lr=1.0, lars_form="larc", lars_eta=0.02,
                  lars_clip=True, weight_decay=1e-5, batch_size=256, epochs=1000, warmup_epochs=10, blur=False)
    assert {k: getattr(cfg, k) for k in recipe} == recipe


def test_evaluated_features_and_encoder_pt_are_the_online_backbones(tmp_path, monkeypatch):
    """Paper Sec. 3.1 ("at the end of training ... only keep the encoder f_theta"; App. C.1 on y = f_theta): the
    three evaluations score the ONLINE backbone, not the target's, and encoder.pt holds it."""
    cfg = tiny(byol.Config, tmp_path, max_steps=2, probe_epochs=0, proj_hidden=64)
    assert_features_and_encoder_are_the_backbone(byol, cfg, monkeypatch)
