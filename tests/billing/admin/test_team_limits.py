"""Team spending limits on the wallet page: finance sets and removes them, sees
what each team spent this month; auditors only look."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from billing.models import TeamSpendingLimit, Wallet
from billing.services.team_limits import team_limit_set
from billing.services.usage import ChargeRequest, usage_charge
from tests.factories import funded_wallet, make_feature


@pytest.fixture
def pooled(db):
    """A pooled wallet whose team ml may spend 10 credits a month and has spent 4."""
    wallet = funded_wallet("1000")
    feature = make_feature("api-call", "2")
    team_limit_set(wallet_id=wallet.pk, team="ml", monthly_limit=Decimal("10"))
    usage_charge(ChargeRequest(customer=wallet.customer, wallet_id=wallet.pk, feature=feature, quantity=Decimal(2),
                               event_id="a", properties={"team": "ml"}))
    wallet.refresh_from_db()
    return wallet


def _wallet_form(page, wallet, rows, initial=0):
    """The change form as the page shows it (other apps' inlines included), with
    the team limit rows replaced by ``rows``."""
    data = {"name": wallet.name, "policy": wallet.policy, "credit_limit": str(wallet.credit_limit), "_save": "Save"}
    for inline in page.context["inline_admin_formsets"]:
        formset = inline.formset
        if formset.model is TeamSpendingLimit:
            continue
        data.update({f"{formset.prefix}-{k}": v for k, v in formset.management_form.initial.items()})
        for form in formset.forms:
            for name, field in form.fields.items():
                value = form[name].value()
                if value is not None and value is not False:
                    data[form.add_prefix(name)] = field.prepare_value(value) if value is not True else "on"
    data.update({"team_limits-TOTAL_FORMS": str(len(rows)), "team_limits-INITIAL_FORMS": str(initial),
                 "team_limits-MIN_NUM_FORMS": "0", "team_limits-MAX_NUM_FORMS": "1000"})
    for n, row in enumerate(rows):
        data.update({f"team_limits-{n}-{key}": value for key, value in row.items()})
        data[f"team_limits-{n}-wallet"] = str(wallet.pk)
    return data


def test_finance_sets_limits_on_the_wallet_page_and_sees_the_month(staff_client, pooled):
    client = staff_client("finance")
    url = reverse("admin:billing_wallet_change", args=[pooled.pk])
    shown = client.get(url)
    page = shown.content.decode()
    assert "team spending limits" in page.lower() and "4.000000" in page  # ml spent 4 this month
    ml = TeamSpendingLimit.objects.get(wallet=pooled, team="ml")
    response = client.post(url, _wallet_form(shown, pooled, [
        {"id": str(ml.pk), "team": "ml", "monthly_limit": "25"},
        {"id": "", "team": "research", "monthly_limit": "300"},
    ], initial=1))
    assert response.status_code == 302, response.context["errors"]
    assert dict(TeamSpendingLimit.objects.filter(wallet=pooled).values_list("team", "monthly_limit")) == {
        "ml": Decimal("25"), "research": Decimal("300")}
    research = TeamSpendingLimit.objects.get(wallet=pooled, team="research")
    response = client.post(url, _wallet_form(shown, pooled, [
        {"id": str(ml.pk), "team": "ml", "monthly_limit": "25"},
        {"id": str(research.pk), "team": "research", "monthly_limit": "300", "DELETE": "on"},
    ], initial=2))
    assert response.status_code == 302
    assert list(TeamSpendingLimit.objects.filter(wallet=pooled).values_list("team", flat=True)) == ["ml"]
    bad = client.post(url, _wallet_form(shown, pooled, [{"id": str(ml.pk), "team": "ml", "monthly_limit": "-1"}],
                                        initial=1))
    assert bad.status_code == 200 and "A limit is 0 or more credits" in bad.content.decode()
    assert Wallet.objects.get(pk=pooled.pk).has_team_limits


def test_auditors_see_limits_but_cannot_change_them(staff_client, pooled):
    client = staff_client("auditor")
    url = reverse("admin:billing_wallet_change", args=[pooled.pk])
    shown = client.get(url)
    page = shown.content.decode()
    assert "team spending limits" in page.lower() and 'name="team_limits-0-monthly_limit"' not in page
    assert client.post(url, _wallet_form(shown, pooled, [{"id": "", "team": "x", "monthly_limit": "1"}])).status_code == 403
    assert not TeamSpendingLimit.objects.filter(team="x").exists()
    for name in ("billing_teamspendinglimit_changelist", "billing_teamspend_changelist"):
        assert client.get(reverse(f"admin:{name}")).status_code == 200


def test_finance_adds_a_limit_from_the_team_limits_page(staff_client, db):
    wallet = funded_wallet("10")
    client = staff_client("finance")
    response = client.post(reverse("admin:billing_teamspendinglimit_add"),
                           {"wallet": str(wallet.pk), "team": " design ", "monthly_limit": "40"})
    assert response.status_code == 302
    limit = TeamSpendingLimit.objects.get(wallet=wallet)
    assert (limit.team, limit.monthly_limit, limit.spends.get().spent) == ("design", Decimal("40"), Decimal("0"))
    assert Wallet.objects.get(pk=wallet.pk).has_team_limits
