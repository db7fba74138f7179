from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from billing.services.api_keys import api_key_create


class Api:
    """An API client that sends JSON with one key and hands back (status, body)."""

    def __init__(self, raw_key: str | None):
        self.client = APIClient()
        if raw_key:
            self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")

    def _send(self, method: str, path: str, body=None, *, raw: str | bytes | None = None,
              content_type: str = "application/json", headers: dict | None = None):
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()}
        call = getattr(self.client, method)
        response = call(path, data=data, content_type=content_type, **extra) if data is not None else call(
            path, **extra)
        assert response["Content-Type"].startswith("application/json"), (response.status_code, response.content[:300])
        return response.status_code, response.json()

    def get(self, path, **kwargs):
        return self._send("get", path, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self._send("post", path, body, **kwargs)


def make_api(*scopes: str) -> Api:
    _, raw_key = api_key_create(name=f"test {' '.join(scopes)}", scopes=list(scopes))
    return Api(raw_key)


@pytest.fixture
def usage_api(db):
    return make_api("usage:write")


@pytest.fixture
def read_api(db):
    return make_api("balance:read")


@pytest.fixture
def admin_api(db):
    return make_api("admin")


def assert_error(status_body, status: int, code: str, field: str | None = None):
    status_code, body = status_body
    assert status_code == status, body
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    if field is not None:
        assert field in body["error"]["details"], body
    return body["error"]
