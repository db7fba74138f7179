"""Per-team spending limits on a pooled wallet (issue 4): a team over its month's
limit gets 402 ``team_limit_exceeded`` while other teams keep charging, under
concurrency too, and the limit starts afresh the next month."""

from __future__ import annotations

import threading
import zoneinfo
from datetime import datetime
from decimal import Decimal

import pytest
from django.db import connection

from billing.models import AuditEvent, Feature, LedgerEntry, TeamSpend, TeamSpendingLimit, UsageEvent
from billing.services import usage
from billing.services.team_limits import team_limit_remove, team_limit_set
from billing.services.usage import ChargeRequest, usage_charge, usage_charge_many
from tests.billing.api.conftest import assert_error, make_api
from tests.conftest import assert_ledger_consistent
from tests.factories import funded_wallet, make_feature


@pytest.fixture
def pooled(db):
    """acme's pooled wallet (1,000 credits), api-call at 2 credits; ml may spend 10 a month."""
    wallet = funded_wallet("1000")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    team_limit_set(wallet_id=wallet.pk, team="ml", monthly_limit=Decimal("10"))
    wallet.refresh_from_db()
    return wallet


@pytest.fixture
def usage_api(db):
    return make_api("usage:write")


def event(event_id, quantity="2", team="ml", **extra):
    body = {"customer": "acme", "feature": "api-call", "quantity": quantity, "event_id": event_id, **extra}
    if team is not None:
        body["properties"] = {"team": team}
    return body


def spent(wallet, team) -> Decimal:
    return TeamSpend.objects.get(team_limit__wallet=wallet, team_limit__team=team).spent


def test_a_team_over_its_limit_gets_402_with_its_own_code_and_nothing_is_charged(usage_api, pooled):
    assert usage_api.post("/api/v1/usage", event("a", "3"))[0] == 201  # 6 of 10
    pooled.refresh_from_db()
    before = (pooled.ledger_balance, LedgerEntry.objects.filter(wallet=pooled).count())
    answer = usage_api.post("/api/v1/usage", event("b", "3"))  # 6 more: 12 > 10
    assert_error(answer, 402, "team_limit_exceeded")
    details = answer[1]["error"]["details"]
    month = datetime.now(zoneinfo.ZoneInfo(pooled.customer.timezone)).strftime("%Y-%m")
    assert details == {"team": "ml", "limit": "10.000000", "spent": "6.000000", "requested": "6.000000",
                       "period": month, "event_id": "b"}
    pooled.refresh_from_db()
    assert (pooled.ledger_balance, LedgerEntry.objects.filter(wallet=pooled).count()) == before
    assert spent(pooled, "ml") == Decimal("6")
    # A replay answers the same refusal; the refused id stays refused (like insufficient_credits).
    assert usage_api.post("/api/v1/usage", event("b", "3")) == answer
    assert UsageEvent.objects.get(event_id="b").status == UsageEvent.Status.REJECTED
    # What still fits the team is charged: 4 credits make exactly 10.
    assert usage_api.post("/api/v1/usage", event("c", "2"))[0] == 201
    assert spent(pooled, "ml") == Decimal("10")
    assert_error(usage_api.post("/api/v1/usage", event("d", "0.000001")), 402, "team_limit_exceeded")
    assert_ledger_consistent(pooled)


def test_other_teams_no_team_and_unlimited_teams_keep_charging(usage_api, pooled):
    assert usage_api.post("/api/v1/usage", event("ml-1", "5"))[0] == 201  # ml at its limit
    assert_error(usage_api.post("/api/v1/usage", event("ml-2", "1")), 402, "team_limit_exceeded")
    # Another team without a limit, usage without a team, and a team given as a
    # number (only a string names a team) are not limited and not counted.
    assert usage_api.post("/api/v1/usage", event("search-1", "100", team="search"))[0] == 201
    assert usage_api.post("/api/v1/usage", event("none-1", "100", team=None))[0] == 201
    assert usage_api.post("/api/v1/usage", event("num-1", "100", properties={"team": 7}, team=None))[0] == 201
    # Teams are matched exactly: "ML" is not "ml".
    assert usage_api.post("/api/v1/usage", event("upper-1", "10", team="ML"))[0] == 201
    assert list(TeamSpend.objects.values_list("team_limit__team", "spent")) == [("ml", Decimal("10"))]
    # A second limited team has its own counter.
    team_limit_set(wallet_id=pooled.pk, team="search", monthly_limit=Decimal("500"))
    assert usage_api.post("/api/v1/usage", event("search-2", "1", team="search"))[0] == 201
    assert spent(pooled, "search") == Decimal("202")  # the 200 charged this month before its limit, plus 2


def test_batch_items_over_the_limit_are_rejected_one_by_one(usage_api, pooled):
    status, body = usage_api.post("/api/v1/usage/batch", {"events": [
        event("b1", "2"), event("b2", "2"), event("b3", "2", team="search"), event("b4", "2"), event("b5", "1"),
    ]})
    assert status == 200
    results = body["results"]
    assert [r["status"] for r in results] == ["charged", "charged", "charged", "rejected", "charged"]
    assert results[3]["error"]["code"] == "team_limit_exceeded"
    assert results[3]["error"]["details"]["spent"] == "8.000000"
    assert results[3]["error"]["details"]["requested"] == "4.000000"
    assert spent(pooled, "ml") == Decimal("10")  # 4 + 4 + 2
    # Replaying the batch changes nothing and answers the refusal again.
    again = usage_api.post("/api/v1/usage/batch", {"events": [event("b4", "2")]})[1]["results"][0]
    assert (again["status"], again["error"]["code"]) == ("duplicate", "team_limit_exceeded")
    assert_ledger_consistent(pooled)


def test_insufficient_credits_do_not_count_against_the_team(pooled, db):
    small = funded_wallet("3")
    team_limit_set(wallet_id=small.pk, team="ml", monthly_limit=Decimal("100"))
    feature = make_feature("image", "1")

    def charge(quantity, event_id):
        return usage_charge(ChargeRequest(customer=small.customer, wallet_id=small.pk, feature=feature,
                                          quantity=Decimal(quantity), event_id=event_id,
                                          properties={"team": "ml"}))

    assert charge("5", "x").body["error"]["code"] == "insufficient_credits"
    assert charge("3", "y").http_status == 201
    assert spent(small, "ml") == Decimal("3")


def test_the_database_function_still_charges_what_no_limit_concerns(monkeypatch, pooled):
    answered = []
    real = usage._charge_one_in_database
    monkeypatch.setattr(usage, "_charge_one_in_database",
                        lambda *a, **k: answered.append(real(*a, **k)) or answered[-1])
    api_call = Feature.objects.get(key="api-call")

    def charge(event_id, properties):
        return usage_charge(ChargeRequest(customer=pooled.customer, wallet_id=pooled.pk, feature=api_call,
                                          quantity=Decimal(1), event_id=event_id, properties=properties))

    assert charge("no-team", {}).http_status == 201
    assert charge("team", {"team": "ml"}).http_status == 201
    assert charge("unlimited-team", {"team": "search"}).http_status == 201
    unlimited = funded_wallet("10")
    assert usage_charge(ChargeRequest(customer=unlimited.customer, wallet_id=unlimited.pk, feature=api_call,
                                      quantity=Decimal(1), event_id="u", properties={"team": "ml"})).http_status == 201
    # The function answered the event without a team, the team without a limit and the
    # unlimited wallet's; it handed the limited team's event to the Python engine, which counted it.
    assert [result is not None for result in answered] == [True, False, True, True]
    assert spent(pooled, "ml") == Decimal("2")


def test_limits_start_afresh_next_month_in_the_customers_time_zone(db):
    wallet = funded_wallet("1000")
    wallet.customer.timezone = "America/New_York"
    wallet.customer.save(update_fields=["timezone"])
    feature = make_feature("api-call", "1")
    new_york = zoneinfo.ZoneInfo("America/New_York")
    team_limit_set(wallet_id=wallet.pk, team="ml", monthly_limit=Decimal("10"),
                   now=datetime(2026, 12, 10, tzinfo=new_york))

    def charge(event_id, quantity, at):
        return usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                          quantity=Decimal(quantity), event_id=event_id, properties={"team": "ml"}),
                            now=at)

    late_december = datetime(2026, 12, 31, 23, 30, tzinfo=new_york)  # already January in UTC
    assert charge("dec-1", "10", late_december).http_status == 201
    refused = charge("dec-2", "1", late_december)
    assert (refused.http_status, refused.body["error"]["details"]["period"]) == (402, "2026-12")
    january = datetime(2027, 1, 1, 0, 30, tzinfo=new_york)
    assert charge("jan-1", "10", january).http_status == 201
    assert charge("jan-2", "1", january).http_status == 402
    assert sorted(TeamSpend.objects.values_list("period_start", "spent")) == [
        (datetime(2026, 12, 1).date(), Decimal("10")), (datetime(2027, 1, 1).date(), Decimal("10"))]


def test_a_limit_set_mid_month_counts_what_the_team_already_spent(usage_api, db):
    wallet = funded_wallet("1000")
    wallet.customer.external_id = "acme"
    wallet.customer.save(update_fields=["external_id"])
    make_feature("api-call", "2")
    assert usage_api.post("/api/v1/usage", event("early", "3"))[0] == 201  # 6 credits, no limit yet
    team_limit_set(wallet_id=wallet.pk, team="ml", monthly_limit=Decimal("10"))
    answer = usage_api.post("/api/v1/usage", event("late", "3"))
    assert_error(answer, 402, "team_limit_exceeded")
    assert answer[1]["error"]["details"]["spent"] == "6.000000"


def test_changing_and_removing_limits(pooled, usage_api):
    assert usage_api.post("/api/v1/usage", event("a", "5"))[0] == 201
    assert_error(usage_api.post("/api/v1/usage", event("b", "1")), 402, "team_limit_exceeded")
    team_limit_set(wallet_id=pooled.pk, team="ml", monthly_limit=Decimal("12"))
    assert usage_api.post("/api/v1/usage", event("c", "1"))[0] == 201
    limit = TeamSpendingLimit.objects.get(wallet=pooled, team="ml")
    team_limit_remove(team_limit_id=limit.pk)
    pooled.refresh_from_db()
    assert not pooled.has_team_limits
    assert usage_api.post("/api/v1/usage", event("d", "100"))[0] == 201
    assert list(AuditEvent.objects.filter(object_type="billing.teamspendinglimit").order_by("pk").values_list(
        "action", flat=True)) == ["team_limit.set", "team_limit.set", "team_limit.remove"]
    with pytest.raises(Exception, match="team must be"):
        team_limit_set(wallet_id=pooled.pk, team="  ", monthly_limit=Decimal("1"))
    with pytest.raises(Exception, match="monthly_limit"):
        team_limit_set(wallet_id=pooled.pk, team="ml", monthly_limit=Decimal("-1"))


@pytest.mark.django_db(transaction=True)
def test_threads_of_one_team_never_exceed_its_limit_together(db):
    wallet = funded_wallet("1000")
    feature = make_feature("api-call", "1")
    team_limit_set(wallet_id=wallet.pk, team="ml", monthly_limit=Decimal("20"))
    barrier = threading.Barrier(12)
    answers: list = []

    def client(i: int) -> None:
        team = "ml" if i < 8 else "search"
        try:
            barrier.wait()
            for n in range(6):
                request = ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature,
                                        quantity=Decimal("1.5"), event_id=f"{team}-{i}-{n}",
                                        properties={"team": team})
                # Half the clients send one-event batches: both engines' paths meet the same counter.
                result = usage_charge_many([request])[0] if i % 2 else usage_charge(request)
                answers.append((team, result.http_status, result.body.get("error", {}).get("code")))
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    ml_charged = [a for a in answers if a[0] == "ml" and a[1] == 201]
    # 20 credits fit 13 charges of 1.5 (19.5); the other 35 ml events are refused for the team.
    assert len(ml_charged) == 13
    assert {a[2] for a in answers if a[0] == "ml" and a[1] != 201} == {"team_limit_exceeded"}
    assert all(status == 201 for team, status, _ in answers if team == "search")  # 24 events, unaffected
    assert spent(wallet, "ml") == Decimal("19.5")
    assert UsageEvent.objects.filter(wallet=wallet, status="charged", properties__team="ml").count() == 13
    wallet.refresh_from_db()
    assert wallet.ledger_balance == Decimal("1000") - Decimal("19.5") - 24 * Decimal("1.5")
    assert_ledger_consistent(wallet)


def test_check_says_whether_the_team_may_still_spend(pooled):
    api = make_api("usage:write")
    assert api.post("/api/v1/usage", event("a", "4"))[0] == 201  # 8 of 10
    check = {"customer": "acme", "feature": "api-call", "quantity": "1", "properties": {"team": "ml"}}
    assert api.post("/api/v1/usage/check", check)[1]["allowed"] is True  # 2 more fit
    assert api.post("/api/v1/usage/check", {**check, "quantity": "2"})[1]["allowed"] is False
    assert api.post("/api/v1/usage/check", {**check, "quantity": "2", "properties": {"team": "search"}})[1][
        "allowed"] is True
