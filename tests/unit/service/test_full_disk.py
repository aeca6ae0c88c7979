"""A full disk is answered clearly (issue 12): 507 ``insufficient_storage`` in the JSON error shape
(never 500), ``/readyz`` says ``writable: false`` while searches go on, the free-space guard
(LOOKALIKE_MIN_FREE_MB) refuses writes before the disk is full, a failed checkpoint is not
retried on every write, and the service recovers by itself once space is freed."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.service import imagegen
from tests.unit.service.apihelpers import assert_error, auth, search


def _add(c, seed: int):
    return c.post("/v1/images", headers=auth(), files={"file": ("n.jpg", imagegen.jpeg(seed), "image/jpeg")})


def test_free_space_guard_refuses_writes_keeps_reads_and_recovers(make_client):
    with make_client(min_free_mb=1e12) as c:  # more free space than any disk has
        err = assert_error(_add(c, 501), 507, "insufficient_storage")
        assert "LOOKALIKE_MIN_FREE_MB" in err["message"] and "full" in err["message"]
        assert c.get("/readyz").json()["writable"] is False
        assert search(c, imagegen.jpeg(3), k=3).status_code == 200
        c.app.state.lookalike.storage.min_free_bytes = 0  # space was freed
        assert c.get("/readyz").json()["writable"] is True
        assert _add(c, 502).status_code == 201


class FullDiskStore:
    """The real store, except that writes and checkpoints fail with ENOSPC while ``full``."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.full = False
        self.checkpoints = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def add_upload(self, *a, **kw):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._inner.add_upload(*a, **kw)

    def checkpoint(self):
        self.checkpoints += 1
        if self.full or self.checkpoints_fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._inner.checkpoint()

    checkpoints_fail = False


def test_enospc_on_write_is_507_and_failed_checkpoints_do_not_storm(make_client, index_dir, caplog):
    from index import IndexStore

    holder = {}

    def opener(card, writable):
        holder["s"] = FullDiskStore(IndexStore.open(index_dir, card=card, writable=writable))
        return holder["s"]

    with make_client(index_opener=opener, checkpoint_every=1, min_free_mb=0) as c:
        store = holder["s"]
        store.full = True
        for seed in range(3):
            assert_error(_add(c, 600 + seed), 507, "insufficient_storage")
        assert search(c, imagegen.jpeg(4), k=3).status_code == 200
        store.full = False
        store.checkpoints_fail = True  # the writes fit, the full index saves do not
        with caplog.at_level(logging.ERROR, logger="service.state"):
            for seed in range(8):
                assert _add(c, 700 + seed).status_code == 201
        assert store.checkpoints == 1, store.checkpoints  # was one full save per write
        assert sum("checkpoint failed" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture()
def small_volume(tmp_path):
    """A 16 MB tmpfs (root only; skips with the reason otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "vol"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler.bin"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_real_full_volume(make_client, index_dir, small_volume, caplog):
    vol_index = small_volume / "idx"
    shutil.copytree(index_dir, vol_index)
    with make_client(index_dir=vol_index, min_free_mb=1, checkpoint_every=1) as c:
        assert _add(c, 801).status_code == 201
        filler = _fill(small_volume)
        state = c.app.state.lookalike
        # the guard answers first, before any byte is written
        assert_error(_add(c, 802), 507, "insufficient_storage")
        assert c.get("/readyz").json()["writable"] is False
        assert search(c, imagegen.jpeg(5), k=3).status_code == 200
        # without the guard the disk itself refuses: still 507, nothing half-written left behind
        state.storage.min_free_bytes = 0
        with caplog.at_level(logging.WARNING):
            statuses = [_add(c, 803 + i).status_code for i in range(5)]
        assert 500 not in statuses and set(statuses) <= {201, 507}, statuses
        assert 507 in statuses
        debris = [p.name for p in (vol_index / "uploads").iterdir() if p.name.endswith(".tmp")]
        assert not debris, debris
        acknowledged = len(state.store)
        # space freed: writes come back by themselves
        state.storage.min_free_bytes = 1024 * 1024
        filler.unlink()
        assert c.get("/readyz").json()["writable"] is True
        assert _add(c, 900).status_code == 201
        assert len(state.store) == acknowledged + 1
    from index import IndexStore
    from models import load_card

    reopened = IndexStore.open(vol_index, card=load_card(c.app.state.settings.model_dir))
    try:
        assert len(reopened) == acknowledged + 1  # nothing acknowledged was lost
        for f in (vol_index / "uploads").iterdir():  # no orphan: every upload file is indexed
            assert not f.name.startswith(".") and reopened.get_by_sha256(f.name.split(".")[0]) is not None, f.name
    finally:
        reopened.close()
