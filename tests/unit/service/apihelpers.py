"""Small helpers shared by the service tests (unit and e2e)."""

from __future__ import annotations

API_KEY = "test-key-0123456789abcdef"


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def search(client, data: bytes, k: int | None = None, filename: str = "q.jpg", content_type: str = "image/jpeg"):
    fields = {} if k is None else {"k": str(k)}
    return client.post("/v1/search", files={"file": (filename, data, content_type)}, data=fields)


def assert_error(resp, status: int, code: str | None = None) -> dict:
    """The response has ``status`` and the one error shape (with ``code`` if given), no paths or traces."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    text = resp.text
    assert "Traceback" not in text and "/tmp" not in text and "/work" not in text and ".py" not in text, text
    return body["error"]
