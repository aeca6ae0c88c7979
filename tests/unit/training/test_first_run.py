"""A first run on any folder: no class lists, a corrupt JPEG and a stray file, few classes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.helpers import make_image_folder
from training.data import choose_p, class_lists_present, drop_unreadable, make_splits, too_small_warning


def _messy_folder(root: Path) -> Path:
    make_image_folder(root, n_classes=20, per_class=5, size=24)
    (root / "class_03" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"x" * 200)  # a JPEG cut short
    (root / "class_05" / "notes.txt").write_text("not an image")
    (root / "class_07" / "fake.png").write_text("<html>not a png</html>")
    return root


def test_unreadable_files_are_skipped_and_named(tmp_path):
    root = _messy_folder(tmp_path / "data")
    skipped: list = []
    splits = make_splits(root, train_classes=None, test_classes=None, test_fraction=0.4, val_fraction=0.2,
                         skipped=skipped)
    splits = drop_unreadable(splits, skipped=skipped)
    named = {p.name: reason for p, reason in skipped}
    assert set(named) == {"broken.jpg", "notes.txt", "fake.png"}
    assert "not an image file" in named["notes.txt"]
    kept = {p.name for s in splits.values() for p in s.paths}
    assert not kept & set(named)
    assert sum(len(s) for s in splits.values()) == 20 * 5  # every generated image is kept
    for s in splits.values():  # labels still index classes
        assert sorted(set(s.labels)) == list(range(len(s.classes)))


def test_class_split_by_fraction_is_seeded_and_disjoint(tmp_path):
    root = make_image_folder(tmp_path / "data", n_classes=20, per_class=2, size=16)
    a = make_splits(root, train_classes=None, test_classes=None, test_fraction=0.4, seed=3)
    b = make_splits(root, train_classes=None, test_classes=None, test_fraction=0.4, seed=3)
    assert a["test"].classes == b["test"].classes and len(a["test"].classes) == 8
    assert not set(a["train"].classes) & set(a["test"].classes)


def test_missing_class_list_names_the_fix(tmp_path):
    root = make_image_folder(tmp_path / "data", n_classes=4, per_class=2, size=16)
    with pytest.raises(FileNotFoundError, match="--data.train_classes null --data.test_classes null"):
        make_splits(root, train_classes="splits/cub_train_classes.txt", test_classes="splits/cub_test_classes.txt")


def test_p_follows_the_number_of_classes(caplog):
    labels = [c for c in range(10) for _ in range(3)] + [10]  # 10 classes with pairs, one singleton
    with caplog.at_level(logging.WARNING, logger="training.data"):
        assert choose_p(16, labels) == 10
    assert "using P=10" in caplog.text and "--data.p" in caplog.text
    assert choose_p(4, labels) == 4
    with pytest.raises(ValueError, match="at least 2"):
        choose_p(16, [0, 0, 1])


def test_p_lowered_for_several_processes_stays_a_multiple_of_them():
    """Under torchrun the global batch is split by whole classes, so a lowered P must divide."""
    labels = [c for c in range(11) for _ in range(3)]  # 11 classes with pairs
    assert choose_p(16, labels, multiple_of=2) == 10
    assert choose_p(16, labels, multiple_of=3) == 9
    assert choose_p(16, labels, multiple_of=1) == 11
    assert choose_p(8, labels, multiple_of=3) == 8  # not lowered: the user's P is checked by the sampler


def test_too_small_warning():
    assert too_small_warning(3, 60) is not None
    assert too_small_warning(46, 2700) is None


def test_class_lists_present(tmp_path):
    root = make_image_folder(tmp_path / "data", n_classes=4, per_class=2, size=16)
    assert not class_lists_present(root, "splits/cub_train_classes.txt", "splits/cub_test_classes.txt")
    assert not class_lists_present(root, None, None)
    (root / "test.txt").write_text("class_00\n")
    assert class_lists_present(root, "splits/train.txt", "test.txt")
