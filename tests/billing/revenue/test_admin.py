"""Refunds, credit notes, the revenue report and the grant's revenue schedule
in the admin, per role."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing import roles
from billing.credit_note_document import render_pdf
from billing.models import CreditNote, PackPurchase, RefundRequest
from billing.services.packs import pack_purchase
from billing.services.refunds import refund_approve, refund_request
from billing.tasks import revenue_check
from tests.billing.revenue.conftest import charge

pytestmark = pytest.mark.django_db


@pytest.fixture
def login(client, make_staff):
    def as_role(role: str, username: str):
        user = make_staff(role, username)
        client.force_login(user)
        return client, user

    return as_role


def _month() -> str:
    return timezone.localtime().strftime("%Y-%m")


def test_support_requests_in_the_admin_and_another_finance_person_approves(bought, login):
    _, purchase = bought
    client, support = login(roles.SUPPORT, "sup")
    page = client.get(reverse("admin:billing_refundrequest_add") + f"?grant={purchase.grant_id}")
    assert page.status_code == 200
    response = client.post(reverse("admin:billing_refundrequest_add"),
                           {"grant": purchase.grant_id, "credits": "250", "reason": "Unused"})
    refund = RefundRequest.objects.get()
    assert response.status_code == 302 and refund.requested_by == support and refund.credits == Decimal("250")
    assert client.post(reverse("admin:billing_refundrequest_approve", args=[refund.pk]), {}).status_code == 403

    client, _ = login(roles.FINANCE, "checker")
    page = client.get(reverse("admin:billing_refundrequest_change", args=[refund.pk]))
    assert "Approve and refund" in page.content.decode()
    client.post(reverse("admin:billing_refundrequest_approve", args=[refund.pk]), {})
    refund.refresh_from_db()
    assert refund.status == RefundRequest.Status.REFUNDED
    note = CreditNote.objects.get()
    assert note.amount == Decimal("25.00")
    html = client.get(reverse("admin:billing_creditnote_html", args=[note.pk])).content.decode()
    assert note.number in html and "25.00 USD" in html
    pdf = client.get(reverse("admin:billing_creditnote_pdf", args=[note.pk]))
    assert pdf["Content-Type"] == "application/pdf" and pdf.content.startswith(b"%PDF")


def test_the_requester_sees_no_approve_button_and_a_form_error_is_not_a_500(bought, login):
    _, purchase = bought
    client, finance = login(roles.FINANCE, "maker")
    refund = refund_request(grant_id=purchase.grant_id, credits=None, reason="All", requested_by=finance)
    page = client.get(reverse("admin:billing_refundrequest_change", args=[refund.pk])).content.decode()
    assert "Approve and refund" not in page
    client.post(reverse("admin:billing_refundrequest_approve", args=[refund.pk]), {})
    assert RefundRequest.objects.get().status == RefundRequest.Status.PENDING_APPROVAL
    both = client.post(reverse("admin:billing_refundrequest_add"),
                       {"grant": purchase.grant_id, "credits": "1", "all_unused": "on", "reason": "x"})
    assert both.status_code == 200 and "one of the two" in both.content.decode()
    too_many = client.post(reverse("admin:billing_refundrequest_add"),
                           {"grant": purchase.grant_id, "credits": "5000", "reason": "x"}, follow=True)
    assert "5000" in too_many.content.decode() and RefundRequest.objects.count() == 1


def test_the_revenue_report_page_and_its_csv(bought, api_feature, login, make_staff):
    wallet, purchase = bought
    charge(wallet, api_feature, 400)
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("100"), reason="x",
                            requested_by=make_staff(roles.FINANCE, "maker"))
    refund_approve(refund_id=refund.pk, user=make_staff(roles.FINANCE, "checker"))
    client, _ = login(roles.AUDITOR, "aud")
    url = reverse("admin:billing_revenue_report")
    page = client.get(url, {"month": _month(), "currency": "USD"})
    body = page.content.decode()
    assert page.status_code == 200
    assert 'class="value cd-recognized">40.00<' in body and 'class="value cd-deferred">50.00<' in body
    assert 'class="value cd-refunds">10.00<' in body and 'class="value cd-reconciles">yes<' in body
    assert "Deferred roll-forward" in body and "cd-mismatch" not in body
    exported = client.get(url, {"month": _month(), "currency": "USD", "format": "csv"})
    assert exported["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(exported.content.decode())))
    assert rows[0] == ["month", "currency", "section", "item", "credits", "amount"]
    by_item = {row[3]: row for row in rows[1:]}
    assert by_item["Usage of prepaid credits"][4:] == ["400.000000", "40.00"]
    assert by_item["Deferred at month end"][5] == "50.00"
    assert by_item["Credit notes (1)"][4:] == ["100.000000", "10.00"]
    assert by_item["Reconciles"][5] == "yes"
    assert client.get(url, {"month": "garbage"}).status_code == 200


def test_a_failed_nightly_check_shows_a_banner_on_the_report(bought, login, django_capture_on_commit_callbacks):
    _, purchase = bought
    PackPurchase.objects.filter(pk=purchase.pk).update(total_price=Decimal("1.00"))
    with django_capture_on_commit_callbacks(execute=True):
        revenue_check()
    client, _ = login(roles.FINANCE, "fin")
    body = client.get(reverse("admin:billing_revenue_report")).content.decode()
    assert "cd-revenue-mismatch" in body and f"purchase #{purchase.pk} totals 1.0000" in body


@pytest.mark.parametrize("role, report, notes, add_refund", [
    (roles.FINANCE, 200, 200, 200), (roles.AUDITOR, 200, 200, 403), (roles.SUPPORT, 403, 403, 200),
    (roles.SALES_REP, 403, 403, 403), (roles.SALES_MANAGER, 403, 403, 403),
])
def test_pages_per_role(bought, login, role, report, notes, add_refund):
    client, _ = login(role, "someone")
    assert client.get(reverse("admin:billing_revenue_report")).status_code == report
    assert client.get(reverse("admin:billing_creditnote_changelist")).status_code == notes
    assert client.get(reverse("admin:billing_refundrequest_add")).status_code == add_refund


def test_the_grant_page_shows_its_revenue_schedule_to_finance_only(bought, api_feature, login):
    wallet, purchase = bought
    charge(wallet, api_feature, 123)
    url = reverse("admin:billing_creditgrant_change", args=[purchase.grant_id])
    client, _ = login(roles.FINANCE, "fin")
    body = client.get(url).content.decode()
    assert "Revenue schedule" in body and 'class="value cd-deferred">87.70<' in body
    assert "Request a refund of unused credits" in body
    client, _ = login(roles.SALES_REP, "rep")
    assert "Revenue schedule" not in client.get(url).content.decode()


def test_lists_have_filters_and_search(bought, login, make_staff):
    _, purchase = bought
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("5"), reason="Unused seats",
                            requested_by=make_staff(roles.FINANCE, "maker"))
    refund_approve(refund_id=refund.pk, user=make_staff(roles.FINANCE, "checker"))
    client, _ = login(roles.AUDITOR, "aud")
    listing = reverse("admin:billing_refundrequest_changelist")
    refunds = client.get(listing, {"q": "buyer", "status__exact": "refunded"})
    assert refunds.status_code == 200 and f">#{purchase.grant_id}<" in refunds.content.decode()
    assert f">#{purchase.grant_id}<" not in client.get(listing, {"q": "nobody"}).content.decode()
    assert f">#{purchase.grant_id}<" not in client.get(listing, {"status__exact": "rejected"}).content.decode()
    note = CreditNote.objects.get()
    notes = client.get(reverse("admin:billing_creditnote_changelist"), {"q": note.number})
    assert note.number in notes.content.decode()


def test_the_credit_note_pdf_carries_its_line(bought, make_staff):
    _, purchase = bought
    refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("12.5"), reason="Too many",
                            requested_by=make_staff(roles.FINANCE, "maker"))
    note = refund_approve(refund_id=refund.pk, user=make_staff(roles.FINANCE, "checker")).credit_note
    pdf = render_pdf(note, compress=False)
    for text in (note.number, "12.5", "1.25 USD", "Too many"):
        assert text.encode() in pdf


def test_list_pages_cost_the_same_queries_for_more_rows(pack, login, make_staff):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing.services.grants import default_wallet
    from tests.factories import make_customer

    maker, checker = make_staff(roles.FINANCE, "maker"), make_staff(roles.FINANCE, "checker")
    client, _ = login(roles.AUDITOR, "aud")

    def refund_some(count):
        for _ in range(count):
            wallet = default_wallet(make_customer())
            purchase = pack_purchase(wallet=wallet, pack=pack)
            refund = refund_request(grant_id=purchase.grant_id, credits=Decimal("3"), reason="x", requested_by=maker)
            refund_approve(refund_id=refund.pk, user=checker)

    def queries(url):
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        return len(captured)

    pages = [reverse("admin:billing_refundrequest_changelist"), reverse("admin:billing_creditnote_changelist")]
    refund_some(2)
    few = [queries(url) for url in pages]
    refund_some(4)
    assert [queries(url) for url in pages] == few


def test_the_dashboard_counts_pending_refunds_and_links_the_report(bought, login, make_staff):
    _, purchase = bought
    refund_request(grant_id=purchase.grant_id, credits=Decimal("1"), reason="x",
                   requested_by=make_staff(roles.SUPPORT, "sup"))
    client, _ = login(roles.FINANCE, "fin")
    page = client.get(reverse("admin:index")).content.decode()
    assert '<td class="cd-pending-refunds">1</td>' in page and reverse("admin:billing_revenue_report") in page
    client, _ = login(roles.SALES_REP, "rep")
    page = client.get(reverse("admin:index")).content.decode()
    assert "cd-pending-refunds" not in page and reverse("admin:billing_revenue_report") not in page
