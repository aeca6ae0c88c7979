"""Card, fingerprint, safetensors round trip, pickle refusal, registry, preprocessing, backends."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import ModelCard, Preprocess, UnsafeCheckpointError, load_card, load_model, save_model
from models.backbones import available_backbones, build_backbone
from models.backends import OnnxBackend, TorchBackend, l2_normalize
from models.net import EmbeddingNet, build_activation

CARD = ModelCard(backbone="resnet18", embedding_dim=16, image_size=32, resize_size=36)


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet(CARD).eval()
    card = save_model(net, tmp_path / "m")
    return tmp_path / "m", net, card


def test_output_is_unit_norm_float32(saved):
    _, net, _ = saved
    out = net(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_roundtrip_identical_and_fingerprint(saved):
    d, net, card = saved
    assert len(card.fingerprint) == 64 and load_card(d).fingerprint == card.fingerprint
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_model(d)(x), net(x))


def test_tampered_weights_detected(saved):
    d, _, _ = saved
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_card(d)


def test_pickle_refused(tmp_path, saved):
    d, net, _ = saved
    p = tmp_path / "model.pt"
    torch.save(net.state_dict(), p)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_model(p)
    # a pickle disguised under the safetensors name is refused by content
    (d / "model.safetensors").write_bytes(p.read_bytes())
    with pytest.raises(UnsafeCheckpointError):
        from models.io import load_safetensors_state

        load_safetensors_state(d / "model.safetensors")


def test_card_rejects_unknown_keys_and_bad_values(tmp_path):
    d = dataclasses.asdict(CARD) | {"colour": 1}
    with pytest.raises(ValueError, match="unknown model card keys"):
        ModelCard.from_dict(d)
    with pytest.raises(ValueError, match="metric"):
        dataclasses.replace(CARD, metric="l2")
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(CARD, resize_size=8)


def test_registry_names_allowed_set():
    assert {"resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "vit_b_16"} <= set(available_backbones())
    with pytest.raises(ValueError, match="allowed"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match="allowed"):
        build_backbone("resnet18", weights="NOT_A_WEIGHT")
    with pytest.raises(ValueError, match="allowed"):
        build_activation("swish")


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_other_backbones_feature_dims(name):
    m, dim = build_backbone(name)
    assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, dim)


def test_local_safetensors_backbone_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src, _ = build_backbone("resnet18")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    dst, _ = build_backbone("resnet18", weights=str(tmp_path / "bb.safetensors"))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)


def test_mlp_head_and_activations():
    card = dataclasses.replace(CARD, head="mlp", head_hidden=8, activation="prelu")
    assert EmbeddingNet(card).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_preprocess_matches_torchvision_eval():
    from torchvision.transforms import v2

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = Preprocess(CARD)(img)
    pil = Preprocess(CARD).resize(img)
    tv = v2.Compose([v2.PILToTensor(), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(list(CARD.mean), list(CARD.std))])(pil)
    np.testing.assert_allclose(ours, tv.numpy(), atol=1e-5)
    assert ours.shape == (3, 32, 32) and ours.dtype == np.float32


def test_backends_agree_and_onnx_needs_no_torch(saved):
    from models.export import export_onnx

    d, _, _ = saved
    _, diff = export_onnx(d)
    assert diff <= 1e-4
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)) for i in range(3)]
    a = TorchBackend(d, bf16=False).embed_images(imgs)
    b = OnnxBackend(d).embed_images(imgs)
    assert np.abs(a - b).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert TorchBackend(d).embed_images([]).shape == (0, 16)


def test_onnx_backend_imports_without_torch(saved, tmp_path):
    """The serving path (decode + preprocess + ONNX) must not import torch."""
    import subprocess
    import sys

    from models.export import export_onnx

    d, _, _ = saved
    export_onnx(d)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from models import decode_image\nfrom models.backends import OnnxBackend\nimport numpy as np\n"
        f"b = OnnxBackend({str(d)!r}); print(b.embed_array(np.zeros((1,3,32,32),np.float32)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 16)" in out.stdout


def test_l2_normalize_zero_rows():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])


def test_saved_files_are_world_readable(saved):
    d, _, _ = saved
    for f in ("model.safetensors", "card.json"):
        assert (d / f).stat().st_mode & 0o044 == 0o044, f


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    import os
    import stat

    from models.io import atomic_write

    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # readable by a service running as another user
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    from models import io as model_io

    target = tmp_path / "f.bin"
    model_io.atomic_write(target, b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        model_io.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_runtime_forks_embed_alike_and_keep_their_own_thread_counts(saved):
    """A fork (a second inference thread's handle) gives the same embeddings and sets its thread
    count without touching the original's; torch does not fork (one inference thread)."""
    from models.backends import OpenVinoBackend
    from models.export import export_onnx

    d, _, _ = saved
    export_onnx(d)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    classes = [OnnxBackend]
    try:
        import openvino  # noqa: F401

        classes.append(OpenVinoBackend)
    except ImportError:
        pass
    for cls in classes:
        b = cls(d, threads=1)
        twin = b.fork()
        assert twin is not b and twin.card == b.card
        np.testing.assert_allclose(twin.embed_array(x), b.embed_array(x), atol=1e-6)
        twin.set_threads(2)
        assert (b.threads, twin.threads) == (1, 2)
        np.testing.assert_allclose(twin.embed_array(x), b.embed_array(x), atol=1e-5)
    assert TorchBackend(d, bf16=False).fork() is None
