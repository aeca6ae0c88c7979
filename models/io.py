"""Saving and loading models: safetensors weights + ``card.json``. Pickle is refused."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from models.card import CARD_FILE, WEIGHTS_FILE, ModelCard, compute_fingerprint

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


class UnsafeCheckpointError(ValueError):
    """A pickle-based checkpoint was offered; lookalike only loads safetensors."""


def _looks_like_pickle(path: Path) -> bool:
    try:
        head = path.read_bytes()[:4] if path.stat().st_size < 64 else open(path, "rb").read(4)
    except OSError:
        return False
    # zip (torch.save) or raw pickle protocol 2+
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def refuse_pickle(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` if ``path`` is a pickle/torch.save file."""
    p = Path(path)
    if p.suffix.lower() in _PICKLE_SUFFIXES or (p.is_file() and _looks_like_pickle(p)):
        raise UnsafeCheckpointError(
            f"{p}: refusing to load a pickle checkpoint (it can run arbitrary code); "
            "lookalike loads only .safetensors weights with a card.json. Convert trusted weights with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )


def load_safetensors_state(path: str | Path) -> dict:
    """Load a safetensors file into a state dict (torch tensors); pickles are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    refuse_pickle(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such weights file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a valid safetensors file ({exc})") from None


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file, one per line; blank lines and ``#`` comments skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names no class.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: class list not found")
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise ValueError(f"{p}: class list is empty")
    return names


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename or a new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file in the same folder, fsync,
    rename, fsync the folder. The one atomic-write helper of the project (models, checkpoints,
    index files, uploads).

    Readers see the old file or the new one, never a torn one; once this returns, the new one
    survives a crash. The file is made world-readable (a service may run as another user than
    the trainer).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model must be readable by a service running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_model(model, directory: str | Path) -> ModelCard:
    """Save ``model`` (an :class:`~models.net.EmbeddingNet`) as safetensors + card.json.

    Returns the card with its fingerprint filled in. Files are written atomically.
    """
    import dataclasses

    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"format": "pt"})
    atomic_write(d / WEIGHTS_FILE, blob)
    card = dataclasses.replace(model.card, fingerprint="")
    card = dataclasses.replace(card, fingerprint=compute_fingerprint(d / WEIGHTS_FILE, card))
    atomic_write(d / CARD_FILE, card.canonical_json(with_fingerprint=True).encode())
    model.card = card
    return card


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model dir, a run dir containing ``model/``, or a card/weights file path."""
    p = Path(path)
    if p.is_file():
        refuse_pickle(p)
        p = p.parent
    if (p / "model" / CARD_FILE).is_file():
        p = p / "model"
    if not (p / CARD_FILE).is_file():
        raise FileNotFoundError(f"{p}: not a lookalike model (no {CARD_FILE}); pass a run or model directory")
    return p


def load_card(path: str | Path, *, verify: bool = True) -> ModelCard:
    """Load the card of a model dir; with ``verify`` check its fingerprint against the weights."""
    d = resolve_model_dir(path)
    card = ModelCard.load(d)
    if verify:
        weights = d / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: weights missing")
        actual = compute_fingerprint(weights, card)
        if card.fingerprint and actual != card.fingerprint:
            raise ValueError(
                f"{d}: fingerprint mismatch: card says {card.fingerprint[:16]}…, weights+card hash to "
                f"{actual[:16]}… (weights or card were modified)"
            )
    return card


def load_model(path: str | Path, *, map_location: str = "cpu"):
    """Load an :class:`~models.net.EmbeddingNet` in eval mode from a model or run directory."""
    from models.net import EmbeddingNet

    d = resolve_model_dir(path)
    card = load_card(d, verify=True)
    model = EmbeddingNet(card)
    state = load_safetensors_state(d / WEIGHTS_FILE)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
