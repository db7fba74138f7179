import pytest
import yaml
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import path

from billing.errors import Conflict
from tests.billing.api.conftest import assert_error


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v1/usage/", "/api/v2/usage", "/api/",
                                  "/api/v1/grants/abc/void", "/api/v1/reservations/abc"])
def test_unknown_api_urls_are_404_in_the_envelope(usage_api, path):
    assert_error(usage_api.get(path), 404, "not_found")
    assert_error(usage_api.post(path, {}), 404, "not_found")


def test_unknown_customer_paths_never_reach_the_database_badly(read_api):
    for external_id in ("%00", "x" * 5000, "%ED%A0%80"):
        assert_error(read_api.get(f"/api/v1/customers/{external_id}/balance"), 404, "not_found")


def test_options_and_head_are_answered(read_api):
    assert read_api._send("options", "/api/v1/usage")[0] == 200
    assert read_api.client.head("/api/v1/customers/nobody").status_code == 404


def test_wrong_method_is_405_in_the_envelope(usage_api, read_api):
    assert_error(usage_api.get("/api/v1/usage"), 405, "method_not_allowed")
    assert_error(usage_api._send("delete", "/api/v1/usage"), 405, "method_not_allowed")
    assert_error(read_api._send("put", "/api/v1/customers/acme", {}), 405, "method_not_allowed")


def test_unexpected_errors_are_a_logged_500_envelope(usage_api, monkeypatch, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("billing.api.usage.parse_usage", explode)
    assert_error(usage_api.post("/api/v1/usage", {}), 500, "internal_error")
    assert "boom" in caplog.text


def _plain_django_view_that_fails(request):
    raise RuntimeError("outside DRF")


urlpatterns = [path("api/v1/boom", _plain_django_view_that_fails)]


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__)
def test_exceptions_outside_drf_views_get_the_500_envelope(caplog):
    client = Client(raise_request_exception=False)
    response = client.get("/api/v1/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "outside DRF" in caplog.text


def test_billing_errors_keep_their_code_and_status(admin_api, monkeypatch):
    def refuse(**kwargs):
        raise Conflict("Busy.", details={"why": "test"})

    monkeypatch.setattr("billing.api.customers.customer_create", refuse)
    error = assert_error(admin_api.post("/api/v1/customers", {"external_id": "a", "name": "A"}), 409, "conflict")
    assert error["details"] == {"why": "test"}


@pytest.mark.django_db
def test_schema_and_docs_are_public_and_describe_every_endpoint():
    client = Client()
    response = client.get("/api/v1/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    paths = set(schema["paths"])
    assert {
        "/api/v1/customers", "/api/v1/customers/{external_id}", "/api/v1/customers/{external_id}/balance",
        "/api/v1/customers/{external_id}/ledger", "/api/v1/customers/{external_id}/grants",
        "/api/v1/grants/{grant_id}/void", "/api/v1/features", "/api/v1/features/{key}/costs", "/api/v1/usage",
        "/api/v1/usage/batch", "/api/v1/usage/check", "/api/v1/reservations",
        "/api/v1/reservations/{reservation_id}/capture", "/api/v1/reservations/{reservation_id}/release",
    } <= paths
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    usage = schema["paths"]["/api/v1/usage"]["post"]["responses"]
    assert {"201", "400", "401", "402", "403", "404", "409"} <= set(usage)
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()


@pytest.mark.django_db
def test_schema_validates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/usage/batch" in (tmp_path / "schema.yaml").read_text()


@pytest.mark.django_db
def test_schema_states_the_limits_the_api_enforces():
    """What the API refuses with 400 the schema does not offer as valid (found by fuzzing the schema)."""
    schema = yaml.safe_load(Client().get("/api/v1/schema/").content)
    ledger = schema["paths"]["/api/v1/customers/{external_id}/ledger"]["get"]["parameters"]
    limit = next(p for p in ledger if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 500)
    grants = schema["paths"]["/api/v1/customers/{external_id}/grants"]["post"]["parameters"]
    assert next(p for p in grants if p["name"] == "Idempotency-Key")["schema"]["minLength"] == 1
    body = schema["paths"]["/api/v1/customers"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    created = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert created["properties"]["external_id"]["minLength"] == 1 and created["properties"]["name"]["minLength"] == 1
    capture = schema["paths"]["/api/v1/reservations/{reservation_id}/capture"]["post"]["requestBody"]
    captured = schema["components"]["schemas"][
        capture["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert captured["properties"]["properties"]["type"] == "object"  # null is refused, so not offered
    batch = schema["paths"]["/api/v1/usage/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    events = schema["components"]["schemas"][batch["$ref"].rsplit("/", 1)[1]]["properties"]["events"]
    assert (events["minItems"], events["maxItems"]) == (1, 1000)  # [] and 1,001 events are a 400


_FIRST_SCHEMAS_AT_ONCE = """
import threading, django
django.setup()
from django.test import Client
barrier, statuses = threading.Barrier(6), []
def fetch():
    barrier.wait()
    statuses.append(Client().get("/api/v1/schema/").status_code)
threads = [threading.Thread(target=fetch) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sorted(statuses))
"""


def test_the_first_schema_requests_of_a_process_at_once_all_succeed():
    """drf-spectacular loads its extensions lazily on the first generation; six threads of a
    fresh process asking at once (a web worker's pool) all get the schema (a race gave a 500)."""
    import os
    import subprocess
    import sys

    from django.conf import settings

    db = settings.DATABASES["default"]
    url = f"postgresql://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or ''}:{db['PORT'] or ''}/{db['NAME']}"
    if db["HOST"].startswith("/"):
        url = f"postgresql://{db['USER']}:{db['PASSWORD']}@/{db['NAME']}?host={db['HOST']}"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL=url, LOG_LEVEL="CRITICAL")
    done = subprocess.run([sys.executable, "-c", _FIRST_SCHEMAS_AT_ONCE], env=env, capture_output=True, text=True,
                          timeout=120, cwd=settings.BASE_DIR)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str([200] * 6), done.stdout[-500:]
