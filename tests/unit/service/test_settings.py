"""Settings: env prefix, validated limits, no start without an API key unless read-only."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings

KEY = "k" * 20


def test_defaults_are_the_documented_limits():
    s = Settings(api_key=KEY)
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.max_pixels == 40_000_000
    assert s.max_side == 8192
    assert s.cors_origins == []
    assert s.writes_enabled is True
    assert s.max_body_bytes > s.max_upload_bytes


def test_refuses_writes_without_an_api_key(monkeypatch):
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    with pytest.raises(ValidationError, match="LOOKALIKE_API_KEY"):
        Settings()
    with pytest.raises(ValidationError, match="LOOKALIKE_API_KEY"):
        Settings(api_key="   ")


def test_read_only_needs_no_key(monkeypatch):
    monkeypatch.delenv("LOOKALIKE_API_KEY", raising=False)
    s = Settings(writes_enabled=False)
    assert s.api_key is None


def test_short_key_refused():
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(api_key="short")


def test_environment_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKALIKE_API_KEY", KEY)
    monkeypatch.setenv("LOOKALIKE_MAX_K", "7")
    monkeypatch.setenv("LOOKALIKE_DEFAULT_K", "5")
    monkeypatch.setenv("LOOKALIKE_BACKEND", "onnx")
    monkeypatch.setenv("LOOKALIKE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LOOKALIKE_CORS_ORIGINS", '["https://example.org"]')
    s = Settings()
    assert (s.max_k, s.default_k, s.backend, s.model_dir) == (7, 5, "onnx", tmp_path)
    assert s.cors_origins == ["https://example.org"]
    assert s.api_key.get_secret_value() == KEY
    assert KEY not in repr(s)  # the key never shows in logs


@pytest.mark.parametrize("field,value", [("backend", "tensorflow"), ("max_batch", 0), ("max_k", 0),
                                         ("port", 70000), ("batch_wait_ms", -1)])
def test_bad_values_name_the_setting(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(api_key=KEY, **{field: value})


def test_default_k_within_max_k():
    with pytest.raises(ValidationError, match="default_k"):
        Settings(api_key=KEY, max_k=5, default_k=10)
