"""clip.py: byte tokenizer, clip_loss against hand computation, the logit scale, caption sources
(TSV/CSV, COCO JSON), 2-process equality, and the training loop's contract on CPU."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, load_ckpt, read_log, tiny)

import clip
import common

TEXT = dict(embed_dim=32, text_width=32, text_layers=1, text_heads=2)  # a small text tower for CPU tests


def small_clip(context_length=77):
    return clip.CLIP("tiny", True, TEXT["embed_dim"], context_length, TEXT["text_width"], TEXT["text_layers"],
                     TEXT["text_heads"], 0.07)


# -------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_ascii_and_non_ascii():
    texts = ["a photo of a cat.", "café au lait", "日本語のテキスト", "emoji 🐱👍🏽 too", "", "tab\tnew\nline"]
    tokens = clip.tokenize(texts, 77)
    assert tokens.shape == (6, 77) and tokens.dtype == torch.long
    assert clip.detokenize(tokens) == texts
    for row, text in zip(tokens.tolist(), texts):
        b = list(text.encode("utf-8"))
        assert row[: len(b) + 2] == [clip.START, *b, clip.END]  # the bytes themselves are the tokens
        assert row[len(b) + 2:] == [clip.PAD] * (77 - len(b) - 2)
    assert tokens.max() < clip.VOCAB


def test_truncation_to_context_length_keeps_end_token_and_whole_characters():
    long = clip.tokenize(["x" * 100], 10)[0].tolist()
    assert long == [clip.START] + [ord("x")] * 8 + [clip.END]
    assert clip.detokenize(clip.tokenize(["x" * 100], 10)) == ["x" * 8]
    # "é" is 2 bytes, "日" 3: a cut never splits a character, the end token stays
    assert clip.detokenize(clip.tokenize(["é" * 10], 9)) == ["é" * 3]  # 7 bytes of room -> 3 characters
    row = clip.tokenize(["日本語"], 7)[0].tolist()  # 5 bytes of room -> 1 character
    assert row == [clip.START, *"日".encode(), clip.END, clip.PAD, clip.PAD]


def test_prompts_refuse_a_context_too_short_for_the_class_names():
    prompts = clip.prompt_tokens(["cat", "striped triangle"], 77)
    assert prompts.shape == (len(clip.TEMPLATES), 2, 77)
    assert clip.detokenize(prompts[1, 1:]) == [clip.TEMPLATES[1].format("striped triangle")]
    with pytest.raises(common.RunError, match="--context_length=20"):
        clip.prompt_tokens(["striped triangle"], 20)


def test_prompts_read_an_underscore_in_a_class_name_as_a_space():
    """CIFAR-100's names come from torchvision with underscores: "aquarium_fish" is captioned "aquarium fish"."""
    prompts = clip.prompt_tokens(["aquarium_fish"], 77)
    assert clip.detokenize(prompts[0, :1]) == [clip.TEMPLATES[0].format("aquarium fish")]


# ------------------------------------------------------------------------------------------- loss


def test_clip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalized: (1, 0), (0, 1)
    txt = torch.tensor([[1.0, 1.0], [0.0, -3.0]])  # normalized: (1, 1)/sqrt2, (0, -1)
    s = 2.0
    c = [[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), -1.0]]  # cosine(image i, text j)
    lse = lambda v: math.log(sum(math.exp(s * a) for a in v))  # noqa: E731
    i2t = [lse(c[i]) - s * c[i][i] for i in range(2)]  # each image picks its caption among the 2
    t2i = [lse([c[0][j], c[1][j]]) - s * c[j][j] for j in range(2)]  # each caption picks its image
    expected = 0.5 * (sum(i2t) / 2 + sum(t2i) / 2)
    assert clip.clip_loss(img, txt, s).item() == pytest.approx(expected, rel=1e-6)
    assert clip.clip_loss(img, txt, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_is_the_mean_of_the_two_cross_entropies_and_symmetric():
    torch.manual_seed(0)
    img, txt, s = torch.randn(8, 16), torch.randn(8, 16), 14.0
    a, b = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    i2t = torch.stack([F.cross_entropy(s * (b @ a[i]).view(1, -1), torch.tensor([i])) for i in range(8)]).mean()
    t2i = torch.stack([F.cross_entropy(s * (a @ b[j]).view(1, -1), torch.tensor([j])) for j in range(8)]).mean()
    loss = clip.clip_loss(img, txt, s)
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    torch.testing.assert_close(clip.clip_loss(txt, img, s), loss)  # swapping the towers: the same loss
    torch.testing.assert_close(clip.clip_loss(5 * img, 0.1 * txt, s), loss)  # normalized inside
    assert not torch.allclose(i2t, t2i)  # the two directions differ: the symmetry is not trivial
    # logit_scale is the multiplier (not its log): orthonormal pairs give -log(e^s / (e^s + N - 1))
    e = torch.eye(8)
    assert clip.clip_loss(e, e, 2.0).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 7)), rel=1e-6)


def test_logit_scale_starts_at_1_over_0_07_and_gets_its_gradient():
    model = small_clip()
    assert model.log_logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    img, txt, scale = model(torch.randn(4, 3, 32, 32), clip.tokenize(["a", "b", "c", "d"], 77))
    assert img.shape == txt.shape == (4, TEXT["embed_dim"]) and scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    clip.clip_loss(img, txt, scale).backward()
    assert model.log_logit_scale.grad is not None and model.log_logit_scale.grad.item() != 0


def test_logit_scale_is_clamped_at_100_after_the_step(tmp_path):
    cfg = tiny(clip.Config, tmp_path, init_temperature=0.005, max_steps=2, probe_epochs=0, log_every=1, **TEXT)
    clip.train(cfg)
    log = read_log(cfg)
    assert log[0]["logit_scale"] == pytest.approx(200, rel=1e-5)  # step 1 used the initial 1/0.005
    assert log[1]["logit_scale"] == pytest.approx(100, rel=1e-6)  # step 2 the clamped one
    assert load_ckpt(cfg)["model"]["log_logit_scale"].item() <= math.log(100) + 1e-6  # clamped after the last step too


def test_weight_decay_on_weights_only_not_gains_biases_or_the_logit_scale():
    """Paper Sec. 2.5: decoupled weight decay on all weights that are not gains or biases."""
    model = small_clip()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in common.param_groups(model, 0.2)}
    named = dict(model.named_parameters())
    for name in ("text.token_embedding.weight", "text.pos_embedding", "text.blocks.0.self_attn.in_proj_weight",
                 "text.blocks.0.linear1.weight", "backbone.0.weight", "image_proj.weight", "text_proj.weight"):
        assert id(named[name]) in groups["weights"], name  # weights: decayed
    gains = ("backbone.1.weight", "text.blocks.0.norm1.weight", "text.ln_final.weight", "log_logit_scale")
    for name in gains + tuple(n for n in named if n.endswith(("bias", "_bias"))):
        assert id(named[name]) in groups["biases"], name  # gains, biases and the scale: not decayed


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_text_feature_is_read_at_the_end_token_and_never_sees_what_follows(mode):
    torch.manual_seed(0)
    tower = clip.TextTower(16, 32, 2, 2).train(mode == "train")
    tokens = clip.tokenize(["a cat", "a striped disk"], 16)
    junk = tokens.clone()
    junk[0, 7:] = torch.randint(0, 256, (9,))  # the bytes after "a cat"'s end token
    changed = tokens.clone()
    changed[0, 2] = ord("b")  # a byte before it
    with torch.set_grad_enabled(mode == "train"):
        out, out_junk, out_changed = tower(tokens), tower(junk), tower(changed)
    torch.testing.assert_close(out_junk, out)  # causal: the end token sees nothing after itself
    assert not torch.allclose(out_changed[0], out[0], atol=1e-4)  # but it sees the caption
    torch.testing.assert_close(out_changed[1], out[1])


def test_two_processes_equal_one_process_on_the_global_batch(dist_scripts):
    """Loss and every gradient of a 2-process step equal 1 process on the global batch (BN in eval mode)."""
    out = dist_scripts("dist_clip_step.py")
    assert out.count("max grad diff") == 2, out


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="--captions"):
        clip.Config(captions="pairs.txt")
    with pytest.raises(ValueError, match="--text_width=30"):
        clip.Config(text_width=30, text_heads=4)
    with pytest.raises(ValueError, match="--init_temperature"):
        clip.Config(init_temperature=0)


# --------------------------------------------------------------------------------- caption files


def write_pngs(folder, n):
    """n synthetic images as PNG files in folder; returns their names and class names."""
    os.makedirs(folder, exist_ok=True)
    x, y = common.make_synthetic(n, 32, seed=3)
    names = [f"img_{i}.png" for i in range(n)]
    for name, img in zip(names, x):
        torchvision.io.write_png(img, os.path.join(folder, name))
    return names, [common.CLASS_NAMES["synthetic"][int(c)] for c in y]


def test_tsv_and_csv_caption_files_are_read(tmp_path):
    names, classes = write_pngs(tmp_path / "imgs", 3)
    with open(tmp_path / "pairs.tsv", "w", encoding="utf-8") as f:
        f.write("filepath\tcaption\n" + "".join(f"imgs/{n}\ta \"{c}\", café ☕\n" for n, c in zip(names, classes)))
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([(f"imgs/{n}", f"a {c}, with a comma") for n, c in zip(names, classes)])
    tsv = clip.read_caption_file(str(tmp_path / "pairs.tsv"), "")
    assert tsv == [(str(tmp_path / "imgs" / n), f"a \"{c}\", café ☕") for n, c in zip(names, classes)]
    rows = clip.read_caption_file(str(tmp_path / "pairs.csv"), "")
    assert rows == [(str(tmp_path / "imgs" / n), f"a {c}, with a comma") for n, c in zip(names, classes)]
    with open(tmp_path / "bad.tsv", "w") as f:
        f.write("imgs/missing.png\ta caption\n")
    with pytest.raises(common.RunError, match="1 image files missing"):
        clip.read_caption_file(str(tmp_path / "bad.tsv"), "")


def test_tsv_caption_file_trains_a_few_steps(tmp_path):
    names, classes = write_pngs(tmp_path / "imgs", 24)
    with open(tmp_path / "pairs.tsv", "w", encoding="utf-8") as f:
        f.write("".join(f"imgs/{n}\ta photo of a {c}. ünïcödé\n" for n, c in zip(names, classes)))
    cfg = tiny(clip.Config, tmp_path, captions=str(tmp_path / "pairs.tsv"), subset=24, batch_size=8, epochs=2,
               max_steps=4, log_every=1, **TEXT)
    results = clip.train(cfg)
    log = read_log(cfg)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert results["steps"] == 4 and 0 <= results["zero_shot_top1"] <= 1  # zero-shot on --dataset's test set


def test_coco_captions_json_trains_a_few_steps(tmp_path):
    names, classes = write_pngs(tmp_path / "coco" / "train2017", 8)  # the COCO layout: images next to annotations/
    os.makedirs(tmp_path / "coco" / "annotations")
    coco = {"images": [{"id": 100 + i, "file_name": n, "height": 32, "width": 32} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": 100 + i, "caption": f" {t} {c} "} for k, (i, c, t) in enumerate(
                (i, c, t) for i, c in enumerate(classes) for t in ("a photo of a", "there is one"))]}
    path = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(coco))
    rows = clip.read_caption_file(str(path), "")
    assert len(rows) == 16
    assert rows[1] == (str(tmp_path / "coco" / "train2017" / names[0]), f"there is one {classes[0]}")
    cfg = tiny(clip.Config, tmp_path, captions=str(path), subset=16, batch_size=8, epochs=2, max_steps=3,
               probe_epochs=1, **TEXT)
    results = clip.train(cfg)
    assert results["steps"] == 3 and math.isfinite(results["knn_top1"]) and 0 <= results["zero_shot_top1"] <= 1


def test_stl10_classes_demo_pretrains_on_the_labelled_images_only(tmp_path):
    """STL-10's unlabeled images (label -1) have no class name: the demo must not caption them."""
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    np.savez(tmp_path / "stl10.npz", x_train=images(64), y_train=np.arange(64) % 10, x_test=images(20),
             y_test=np.arange(20) % 10, x_unlabeled=images(256))
    cfg = tiny(clip.Config, tmp_path, dataset="stl10", data_dir=str(tmp_path), subset=0, batch_size=16, max_steps=2,
               probe_epochs=0, **TEXT)
    clip.train(cfg)
    log = read_log(cfg)
    assert log[1]["step"] == 2 and log[1]["epoch"] == 0.5  # 64 / 16 = 4 steps per epoch, not (64 + 256) / 16


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(clip, tmp_path, extra_keys=("zero_shot_top1", "logit_scale"), **TEXT)
    assert results["steps"] == 16 and 0 <= results["zero_shot_top1"] <= 1
    log = read_log(cfg)
    assert any("zero_shot_top1" in r and r.get("epoch") == 1 for r in log)  # zero-shot monitor after epoch 1
    assert all("logit_scale" in r for r in log if "loss" in r)


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(clip, tmp_path, **TEXT)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(clip, "clip_loss", monkeypatch, tmp_path, **TEXT)


def test_text_feature_is_the_output_at_the_end_token_itself():
    """Sec. 2.4: the feature is the top layer's activation AT the [EOS] token: changing only the END token's
    embedding changes it (a feature read one position earlier would, causal, never see it)."""
    torch.manual_seed(0)
    tower = clip.TextTower(16, 32, 2, 2).eval()
    tokens = clip.tokenize(["a cat", "a striped disk"], 16)
    with torch.no_grad():
        before = tower(tokens)
        tower.token_embedding.weight[clip.END] += torch.randn(32)
        after = tower(tokens)
    assert not torch.allclose(before, after, atol=1e-3, rtol=0)


def test_the_crop_is_square_and_the_only_augmentation(monkeypatch):
    """Sec. 2.3: a random square crop of area (crop_min, 1), nothing else."""
    calls = []
    monkeypatch.setattr(common, "random_resized_crop", lambda x, *args, **kw: calls.append((args, kw)) or x)
    view = clip.clip_view(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8), clip.Config(crop_min=0.3))
    assert calls == [((32,), dict(scale=(0.3, 1.0), ratio=(1.0, 1.0)))]
    torch.testing.assert_close(view, common.normalize(torch.ones(2, 3, 32, 32)))


def test_adamw_lr_is_scaled_by_the_batch_and_decays_weights_only(tmp_path):
    """train()'s AdamW: lr x batch / 256 (linear scaling), weight decay on the group "weights" only, not on the
    gains, biases and logit scale of the group "biases" (paper Sec. 2.5)."""
    cfg = tiny(clip.Config, tmp_path, subset=64, batch_size=32, max_steps=1, probe_epochs=0, **TEXT)
    clip.train(cfg)
    groups = {g["name"]: g for g in load_ckpt(cfg)["opt"]["param_groups"]}
    assert groups["weights"]["lr"] == groups["biases"]["lr"] == pytest.approx(cfg.lr * 32 / 256)  # no warmup: step 0
    assert groups["weights"]["weight_decay"] == cfg.weight_decay and groups["biases"]["weight_decay"] == 0.0
    assert len(groups["weights"]["params"]) + len(groups["biases"]["params"]) == len(list(small_clip().parameters()))


# ------------------------------------------- demo captions, zero-shot, schedule, results, evaluated features


def test_demo_captions_draw_a_template_per_image_and_per_step():
    """Docstring (--captions=classes): each image's caption is its class name in a template drawn at random per
    image and per step: over 128 images of 2 classes every one of the 8 templates appears, each with the right name."""
    torch.manual_seed(0)
    prompts, y = clip.prompt_tokens(["cat", "dog"], 77), torch.tensor([0, 1] * 64)
    first, second = clip.class_captions(y, prompts), clip.class_captions(y, prompts)
    texts = clip.detokenize(first)
    assert all(t.endswith("cat." if c == 0 else "dog.") for t, c in zip(texts, y.tolist()))
    assert set(texts) == {t.format(c) for t in clip.TEMPLATES for c in ("cat", "dog")}
    assert not torch.equal(first, second)  # another draw at the next step


def test_zero_shot_scores_the_test_images_against_each_classs_prompt_ensemble(tmp_path):
    """P Sec. 3.1.4: a class's embedding is the renormalized mean of its templates' normalized text embeddings, scored
    on --dataset's TEST images. Template 0 points each class at the other one, the 7 others at the right one: the
    ensemble gets every test image right, template 0 alone none; the training images carry the opposite labels."""
    class Towers(torch.nn.Module):  # dark image -> (1, 0), bright -> (0, 1); prompt row t*2 + c -> e_c (t = 0: e_1-c)
        def encode_image(self, x):
            return torch.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3))], 1)

        def encode_text(self, tokens):
            c, t = torch.arange(len(tokens)) % 2, torch.arange(len(tokens)) // 2
            return F.one_hot(torch.where(t == 0, 1 - c, c), 2).float()

    x, y = torch.zeros(8, 3, 4, 4, dtype=torch.uint8), (torch.arange(8) >= 4).long()
    x[4:] = 255
    rt = common.setup(tiny(clip.Config, tmp_path))
    data = common.Data("toy", (x, y), (x, 1 - y), (x, y), ["a", "b"], rt, 4, 0)
    assert clip.zero_shot_top1(Towers(), clip.prompt_tokens(["a", "b"], 77), data, rt) == 1.0


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """P Sec. 2.5 (warmup, then cosine; here warmup_epochs x steps per epoch for its 2000 steps): linear from 0,
    then cosine to 0 at epochs x steps per epoch. 4 steps per epoch, 3 epochs, 1 of warmup, stopped after 6 steps."""
    assert_warmup_then_cosine(clip, tmp_path, **TEXT)


def test_results_report_the_learned_logit_scale_not_its_log(tmp_path):
    """results.json's logit_scale is the multiplier exp(log_logit_scale) after the last step (1/0.07 ~ 14.3 at init,
    P Sec. 2.5), not the learned log (~2.66)."""
    cfg = tiny(clip.Config, tmp_path, max_steps=2, probe_epochs=0, **TEXT)
    results = clip.train(cfg)
    scale = math.exp(load_ckpt(cfg)["model"]["log_logit_scale"].item())
    assert results["logit_scale"] == pytest.approx(scale, abs=1e-3) and scale > 10


def test_evaluated_features_and_encoder_pt_are_the_image_trunks_h(tmp_path, monkeypatch):
    """Docstring: knn_top1, probe_top1 and linear_top1 score the image tower's pooled trunk output h, before the
    projection to the joint space (P App. A.3 probes the image encoder); encoder.pt holds that trunk alone."""
    cfg = tiny(clip.Config, tmp_path, max_steps=2, probe_epochs=0, **TEXT)
    assert_features_and_encoder_are_the_backbone(clip, cfg, monkeypatch)
