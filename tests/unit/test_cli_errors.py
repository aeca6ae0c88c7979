"""User errors of `lookalike serve` and `lookalike index build` end in one clear line and exit 2."""

from __future__ import annotations

from lookalike.cli import main
from models.io import load_card
from tests.helpers import save_seeded_model


def test_serving_an_index_of_another_model_fails_in_one_line(tmp_path, capsys):
    from index.store import IndexStore

    a = save_seeded_model(tmp_path / "model_a", seed=0)
    b = save_seeded_model(tmp_path / "model_b", seed=1)
    store = IndexStore.create(tmp_path / "index", card=load_card(a), images_root=tmp_path, model_dir=a)
    store.close()
    rc = main(["serve", "--model", str(b), "--index", str(tmp_path / "index"), "--read-only", "--no-reexec"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(a.resolve()) in err and str(b.resolve()) in err
    assert load_card(a).fingerprint[:12] in err and load_card(b).fingerprint[:12] in err


def test_indexing_an_empty_folder_fails_with_a_clear_message(tmp_path, capsys):
    model = save_seeded_model(tmp_path / "model")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    rc = main(["index", "build", "--model", str(model), "--images", str(tmp_path / "empty"), "--out",
               str(tmp_path / "idx")])
    assert rc == 2
    assert "no image files found" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()  # no empty index left behind
