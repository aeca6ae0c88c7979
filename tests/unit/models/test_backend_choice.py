"""``auto`` backend: measured on this machine, saved beside the model, re-measured elsewhere;
OpenVINO and the ONNX Runtime variants embed like torch fp32; thread counts change per call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import ModelCard, save_model
from models.backend_choice import (CHOICE_FILE, available_backends, choose_backend, measure_and_save,
                                   read_choice)
from models.backends import OnnxBackend, TorchBackend, load_backend
from models.net import EmbeddingNet

CARD = ModelCard(backbone="resnet18", embedding_dim=16, image_size=32, resize_size=36)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from models.export import export_onnx

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("choice") / "m"
    save_model(EmbeddingNet(CARD).eval(), d)
    export_onnx(d)
    return d


@pytest.fixture()
def model(onnx_model, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(onnx_model, d)
    return d


def _fake_measure(scores: dict[str, float], calls: list):
    def measure(model_dir, **kw):
        calls.append(1)
        return {n: {"startup_s": 0.1, "b1_ms": s, "b8_ms": 8 * s, "score_ms": 2 * s} for n, s in scores.items()}
    return measure


def test_auto_picks_the_measured_fastest_and_saves_it(model, monkeypatch):
    import models.backend_choice as bc

    calls: list = []
    monkeypatch.setattr(bc, "measure_backends", _fake_measure({"torch": 5.0, "onnx": 3.0, "openvino": 4.0}, calls))
    assert choose_backend(model) == "onnx"
    saved = json.loads((model / CHOICE_FILE).read_text())
    assert saved["choice"] == "onnx" and saved["key"]["fingerprint"] == json.loads((model / "card.json").read_text())["fingerprint"]
    # the same machine reuses the saved measurement: no second measurement
    monkeypatch.setattr(bc, "measure_backends", _fake_measure({"torch": 1.0, "onnx": 3.0}, calls))
    assert choose_backend(model) == "onnx" and len(calls) == 1


def test_another_cpu_kind_measures_again(model, monkeypatch):
    """An ISA limit (the AVX2 emulation switches) is another machine: the saved choice is not reused."""
    import models.backend_choice as bc

    calls: list = []
    monkeypatch.setattr(bc, "measure_backends", _fake_measure({"torch": 5.0, "onnx": 3.0}, calls))
    assert choose_backend(model) == "onnx"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert read_choice(model) is None
    monkeypatch.setattr(bc, "measure_backends", _fake_measure({"torch": 2.0, "onnx": 3.0}, calls))
    assert choose_backend(model) == "torch" and len(calls) == 2


def test_without_measurement_one_shot_commands_avoid_torch(model, monkeypatch):
    import models.backend_choice as bc

    monkeypatch.setattr(bc, "measure_backends", lambda *a, **k: pytest.fail("must not measure"))
    got = choose_backend(model, measure=False)
    assert got in ("openvino", "onnx") and got in available_backends(model)
    (model / "model.onnx").unlink()
    assert available_backends(model) == ["torch"] and choose_backend(model) == "torch"


def test_real_measurement_on_a_tiny_model(model):
    saved = measure_and_save(model)
    assert saved["choice"] in available_backends(model)
    for row in saved["measured"].values():
        assert row["b1_ms"] > 0 and row["b8_ms"] > 0 and row["score_ms"] == pytest.approx(row["b1_ms"] + row["b8_ms"] / 8, abs=0.02)
    assert load_backend(model, "auto").name == saved["choice"]


def test_a_read_only_model_dir_still_chooses(model, monkeypatch):
    import models.backend_choice as bc

    def refuse(*a):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(bc, "measure_backends", _fake_measure({"torch": 5.0, "onnx": 3.0}, []))
    monkeypatch.setattr(bc.os, "replace", refuse)
    assert choose_backend(model) == "onnx"
    assert not (model / CHOICE_FILE).exists()


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_ort_levels_and_threads_embed_like_torch(model, level):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = TorchBackend(model, bf16=False).embed_array(x)
    b = OnnxBackend(model, opt_level=level)
    assert np.abs(b.embed_array(x) - ref).max() <= 1e-4
    b.set_threads(2)
    assert b.threads == 2 and np.abs(b.embed_array(x) - ref).max() <= 1e-4
    with pytest.raises(ValueError, match="allowed"):
        OnnxBackend(model, opt_level="max")


def test_openvino_embeds_like_torch_fp32(model):
    pytest.importorskip("openvino")
    from models.backends import OpenVinoBackend

    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = TorchBackend(model, bf16=False).embed_array(x)
    b = OpenVinoBackend(model)
    batch = b.embed_array(x)
    assert np.abs(batch - ref).max() <= 1e-4
    # one image goes through the model compiled for batch 1 (faster); it answers like its batch row
    assert b._single is not None and list(b._single.inputs[0].get_partial_shape().to_shape()) == [1, 3, 32, 32]
    for i in range(len(x)):
        assert np.abs(b.embed_array(x[i:i + 1])[0] - batch[i]).max() <= 1e-5
    b.set_threads(2)
    assert np.abs(b.embed_array(x[:1]) - ref[:1]).max() <= 1e-4
    assert b.embed_array(x[:0]).shape == (0, 16)
    twin = b.fork()  # its own compiled models, both shapes
    assert np.abs(twin.embed_array(x[1:2]) - batch[1:2]).max() <= 1e-5
    assert np.abs(twin.embed_array(x[:3]) - batch[:3]).max() <= 1e-5


def test_torch_set_threads_follows(model):
    b = TorchBackend(model, bf16=False)
    before = torch.get_num_threads()
    try:
        b.set_threads(1)
        assert torch.get_num_threads() == 1 and b.threads == 1
    finally:
        torch.set_num_threads(before)


def test_one_shot_commands_count_import_and_start_up(model, monkeypatch):
    """`lookalike index search` answers one query: torch's fast forward does not pay for its import."""
    import models.backend_choice as bc

    rows = {"torch": {"import_s": 3.0, "startup_s": 0.5, "b1_ms": 5.0, "b8_ms": 40.0, "score_ms": 10.0},
            "onnx": {"import_s": 0.2, "startup_s": 0.1, "b1_ms": 9.0, "b8_ms": 80.0, "score_ms": 19.0}}
    monkeypatch.setattr(bc, "measure_backends", lambda *a, **k: rows)
    monkeypatch.setattr(bc, "available_backends", lambda d: ["torch", "onnx"])
    assert choose_backend(model) == "torch"
    assert choose_backend(model, measure=False, include_startup=True) == "onnx"


def test_one_shot_without_import_times_avoids_torch(model, monkeypatch):
    """A service start measures without import times; a one-shot command then does not pick torch
    for its fast forward alone."""
    import models.backend_choice as bc

    rows = {"torch": {"startup_s": 0.5, "b1_ms": 5.0, "b8_ms": 40.0, "score_ms": 10.0},
            "onnx": {"startup_s": 0.1, "b1_ms": 9.0, "b8_ms": 80.0, "score_ms": 19.0}}
    monkeypatch.setattr(bc, "measure_backends", lambda *a, imports=True, **k: rows)
    monkeypatch.setattr(bc, "available_backends", lambda d: ["torch", "onnx"])
    assert choose_backend(model) == "torch"
    assert choose_backend(model, measure=False, include_startup=True) == "onnx"


def test_measuring_gives_the_process_its_torch_threads_back(model):
    """Timing runs torch on one thread; a training run or forward later in the same process
    (threads: default) must not inherit that (it ran at half speed on 2 cores)."""
    from models.backend_choice import measure_backends

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rows = measure_backends(model, rounds=1, names=["torch", "onnx"], imports=False)
        assert set(rows) == {"torch", "onnx"} and rows["torch"]["b1_ms"] > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
