"""--dataset=folder: an ImageNet-style tree read through a DataLoader. Subsets hold every class, stray
files are not classes, resume is exact, and a malformed tree is one clear error."""

import os

import pytest
import torch
import torchvision

from conftest import assert_resumes_exactly, tiny

import common
import simclr


def make_tree(root, classes=3, images=6, splits=("train", "val")):
    """root/<split>/class<c>/<i>.png, small random images of different sizes."""
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in range(classes):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(images):
                img = (torch.rand(3, 30 + 3 * i, 36, generator=g) * 255).to(torch.uint8)
                torchvision.io.write_png(img, str(root / split / f"class{c}" / f"{i}.png"))
    return root


def load(tmp_path, tree, **overrides):
    cfg = tiny(simclr.Config, tmp_path, dataset="folder", data_dir=str(tree), image_size=28,
               **{"batch_size": 2, "subset": 0, **overrides})
    return common.load_data(cfg, common.setup(cfg))


def test_a_subset_is_drawn_from_every_class_and_is_the_same_each_time(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=3, images=6)
    data = load(tmp_path, tree, subset=6)
    labels = data.labels("train").tolist()
    assert len(labels) == 6 and len(set(labels)) >= 2  # the first 6 files would all be class0
    assert load(tmp_path, tree, subset=6).labels("train").tolist() == labels  # same seed: same images
    assert torch.equal(data.labels("pretrain"), data.labels("train"))


def test_pretraining_images_are_decoded_at_8_7_of_image_size(tmp_path):
    """Room for random crops: pretraining images are decoded at round(image_size * 8 / 7), 73 px for 64 and 37 for
    32 (the 28 of the other tests gives 32, as would 28 + 4); train and val at image_size."""
    tree = make_tree(tmp_path / "tree", classes=2, images=2)
    for size, big in ((64, 73), (32, 37)):
        cfg = tiny(simclr.Config, tmp_path, dataset="folder", data_dir=str(tree), image_size=size, batch_size=2,
                   subset=0)
        data = common.load_data(cfg, common.setup(cfg))
        assert data.pretrain[0][0].shape == (3, big, big), size
        assert data.train[0][0].shape == data.test[0][0].shape == (3, size, size)


def test_train_and_val_with_as_many_but_other_classes_is_a_clear_error(tmp_path):
    """The same number of class folders is not enough: their names must match, or label 1 would mean two things."""
    tree = make_tree(tmp_path / "tree", classes=2, images=2)
    os.rename(tree / "val" / "class1", tree / "val" / "classX")
    with pytest.raises(common.RunError, match="only in train: class1; only in val: classX"):
        load(tmp_path, tree)


def test_a_subset_depends_on_the_seed_and_leaves_val_whole(tmp_path):
    """subset=N draws N training images with cfg.seed (another seed, another draw); val keeps all its images."""
    tree = make_tree(tmp_path / "tree", classes=3, images=6)
    a, b = load(tmp_path, tree, subset=6), load(tmp_path, tree, subset=6, seed=1)
    assert [path for path, _ in a.train.items] != [path for path, _ in b.train.items]
    assert len(a.labels("test")) == 18


def test_a_stray_file_is_not_a_class(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=2, images=3)
    for split in ("train", "val"):
        (tree / split / "README.txt").write_text("not a class")
    data = load(tmp_path, tree)
    assert data.classes == ["class0", "class1"]  # ImageFolder's labels count the directories only
    assert sorted(set(data.labels("train").tolist())) == [0, 1]


def test_train_and_val_with_other_classes_is_a_clear_error(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=2, images=2)
    make_tree(tmp_path / "tree", classes=3, images=2, splits=("val",))  # val has class2, train has not
    with pytest.raises(common.RunError, match="only in val: class2"):
        load(tmp_path, tree)


def test_a_class_without_images_is_a_clear_error(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=2, images=2)
    os.makedirs(tree / "train" / "empty_class")
    with pytest.raises(common.RunError, match=r"train.*empty_class"):
        load(tmp_path, tree)


def test_resume_mid_epoch_is_exact_on_folder_data(tmp_path):
    """The DataLoader draws no number from the global random state, so a resumed run's augmentations are
    those of the uninterrupted run (8 steps straight == 4 steps, stop in the middle of the first epoch of 6
    steps, resume to 8)."""
    tree = make_tree(tmp_path / "tree", classes=2, images=12)
    assert_resumes_exactly(simclr, tmp_path, dataset="folder", data_dir=str(tree), image_size=28, subset=24,
                           batch_size=4)
