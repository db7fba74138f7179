"""The invoices admin: finance drafts, adds lines, issues, records payment and
downloads the PDF; auditors read; other roles see nothing."""

from __future__ import annotations

import base64
import re
import zlib
from decimal import Decimal

import pytest
from django.contrib import admin
from django.core import mail
from django.urls import reverse

from billing import roles
from billing.invoice_document import render_pdf
from billing.models import CreditGrant, Invoice, InvoiceLine, Payment
from billing.services.grants import default_wallet
from billing.services.invoices import (
    invoice_add_line,
    invoice_create_draft,
    invoice_email_send,
    invoice_issue,
    pack_purchase_invoice,
)
from billing.services.packs import pack_purchase
from tests.billing.admin.conftest import make_staff, role_groups, staff_client  # noqa: F401 - fixtures
from tests.factories import CreditPackFactory, make_customer

pytestmark = pytest.mark.django_db


@pytest.fixture
def draft(db):
    customer = make_customer("globex", name="Globex Corp", email="ap@globex.test")
    invoice = invoice_create_draft(customer=customer, tax_rate=Decimal("10"))
    invoice_add_line(invoice_id=invoice.pk, kind=InvoiceLine.Kind.MANUAL, description="Onboarding workshop",
                     quantity=Decimal("2"), unit_price=Decimal("450"))
    invoice_add_line(invoice_id=invoice.pk, kind=InvoiceLine.Kind.CREDIT_NOTE, description="Goodwill credit",
                     quantity=Decimal("1"), unit_price=Decimal("-100"))
    invoice.refresh_from_db()
    return invoice


def test_every_invoicing_model_is_registered():
    registered = {model._meta.model_name for model in admin.site._registry if model._meta.app_label == "billing"}
    assert set(roles.INVOICING_MODELS) <= registered


@pytest.mark.parametrize(("role", "expected"), [("finance", 200), ("auditor", 200), ("sales_rep", 403),
                                                ("support", 403)])
def test_invoice_pages_follow_the_role(role, expected, draft, staff_client):  # noqa: F811
    client = staff_client(role)
    for model in roles.INVOICING_MODELS:
        assert client.get(reverse(f"admin:billing_{model}_changelist")).status_code == expected, model
    assert client.get(reverse("admin:billing_invoice_change", args=[draft.pk])).status_code == expected
    assert client.get(reverse("admin:billing_invoice_html", args=[draft.pk])).status_code == expected
    assert client.get(reverse("admin:billing_invoice_pdf", args=[draft.pk])).status_code == expected


def test_auditor_reads_but_cannot_issue_pay_or_void(draft, staff_client):  # noqa: F811
    client = staff_client("auditor")
    page = client.get(reverse("admin:billing_invoice_change", args=[draft.pk])).content.decode()
    assert "Onboarding workshop" in page
    assert f'/admin/billing/invoice/{draft.pk}/issue/' not in page
    for operation in ("issue", "void", "add_line", "record_payment"):
        url = reverse(f"admin:billing_invoice_{operation}", args=[draft.pk])
        assert client.post(url, {"reason": "x"}).status_code == 403, operation
    assert client.get(reverse("admin:billing_invoice_add")).status_code == 403
    draft.refresh_from_db()
    assert draft.status == Invoice.Status.DRAFT and draft.number is None


def test_finance_drafts_adds_a_line_issues_and_records_payment(staff_client, django_capture_on_commit_callbacks):  # noqa: F811
    client = staff_client("finance")
    customer = make_customer("initech", name="Initech", email="billing@initech.test")
    response = client.post(reverse("admin:billing_invoice_add"),
                           {"customer": customer.pk, "tax_rate": "20", "net_terms_days": "15", "memo": ""})
    invoice = Invoice.objects.get(customer=customer)
    assert response.status_code == 302 and invoice.status == Invoice.Status.DRAFT

    client.post(reverse("admin:billing_invoice_add_line", args=[invoice.pk]),
                {"kind": "manual", "description": "Priority support, March", "quantity": "1",
                 "unit_price": "250"})
    page = client.get(reverse("admin:billing_invoice_change", args=[invoice.pk])).content.decode()
    assert "Priority support, March" in page and f"/admin/billing/invoice/{invoice.pk}/issue/" in page

    with django_capture_on_commit_callbacks(execute=False):
        client.post(reverse("admin:billing_invoice_issue", args=[invoice.pk]))
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.ISSUED and invoice.number.startswith("INV-")
    assert invoice.total == Decimal("300.00") and invoice.net_terms_days == 15

    payment_url = reverse("admin:billing_invoice_record_payment", args=[invoice.pk])
    form = {"amount": "300.00", "reference": "wire 42", "token": "tok-pay-0000000000001",
            "received_at_0": "", "received_at_1": ""}
    client.post(payment_url, form)
    client.post(payment_url, form)  # the same page submitted twice pays once
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID
    assert Payment.objects.filter(invoice=invoice).count() == 1


def test_finance_pays_a_pack_invoice_and_the_credits_arrive(staff_client):  # noqa: F811
    customer = make_customer("umbrella", email="ap@umbrella.test")
    wallet = default_wallet(customer)
    pack = CreditPackFactory(code="growth", name="Growth pack", credits=Decimal("5000"), price=Decimal("400"))
    purchase = pack_purchase(wallet=wallet, pack=pack, pending_payment=True)
    invoice = pack_purchase_invoice(purchase_id=purchase.pk)
    client = staff_client("finance")
    client.post(reverse("admin:billing_invoice_record_payment", args=[invoice.pk]),
                {"amount": "400.00", "token": "tok-pay-0000000000002", "received_at_0": "", "received_at_1": ""})
    purchase.grant.refresh_from_db()
    assert purchase.grant.status == CreditGrant.Status.ACTIVE and purchase.grant.remaining == Decimal("5000")


def test_html_view_shows_number_lines_and_totals_for_finance(draft, staff_client):  # noqa: F811
    invoice = invoice_issue(invoice_id=draft.pk)
    page = staff_client("finance").get(reverse("admin:billing_invoice_html", args=[invoice.pk])).content.decode()
    assert f"Invoice {invoice.number}" in page
    assert "Onboarding workshop" in page and "Goodwill credit" in page
    assert "800.00 USD" in page and "80.00 USD" in page and "880.00 USD" in page  # subtotal, 10 % tax, total


def _pdf_text(pdf: bytes) -> bytes:
    """The PDF with its page streams decoded (reportlab writes them ASCII85 + Flate encoded)."""
    chunks = [pdf]
    for raw in re.findall(rb"\bstream\r?\n(.*?)endstream", pdf, flags=re.DOTALL):
        try:
            chunks.append(zlib.decompress(base64.a85decode(raw.strip().removesuffix(b"~>"))))
        except (ValueError, zlib.error):
            continue
    return b"".join(chunks)


def test_pdf_is_a_pdf_with_every_line(draft, staff_client):  # noqa: F811
    invoice = invoice_issue(invoice_id=draft.pk)
    response = staff_client("finance").get(reverse("admin:billing_invoice_pdf", args=[invoice.pk]))
    assert response["Content-Type"] == "application/pdf"
    assert f'filename="{invoice.number}.pdf"' in response["Content-Disposition"]
    assert response.content.startswith(b"%PDF")
    text = _pdf_text(response.content)
    for expected in (b"Onboarding workshop", b"Goodwill credit", invoice.number.encode(), b"880.00 USD"):
        assert expected in text, expected

    plain = render_pdf(invoice, compress=False)
    assert b"Onboarding workshop" in plain and b"/FlateDecode" not in plain


def test_long_invoice_flows_onto_more_pages():
    customer = make_customer("longtail")
    invoice = invoice_create_draft(customer=customer)
    for n in range(120):
        invoice_add_line(invoice_id=invoice.pk, kind=InvoiceLine.Kind.MANUAL, description=f"Usage block {n:03d}",
                         quantity=Decimal(1), unit_price=Decimal("1.25"))
    invoice.refresh_from_db()
    pdf = render_pdf(invoice, compress=False)
    assert pdf.count(b"/Type /Page\n") >= 3  # about 40 lines per A4 page
    assert b"Usage block 000" in pdf and b"Usage block 119" in pdf and b"150.00 USD" in pdf


def test_issued_invoice_email_has_the_pdf_with_the_lines(draft):
    invoice = invoice_issue(invoice_id=draft.pk)
    assert invoice_email_send(invoice_id=invoice.pk)
    name, content, _ = mail.outbox[0].attachments[0]
    assert content.startswith(b"%PDF") and b"Onboarding workshop" in _pdf_text(content)


def test_finance_puts_a_customer_on_a_plan_and_closes_the_ended_period(staff_client):  # noqa: F811
    from datetime import timedelta

    from django.utils import timezone

    from billing.models import Plan, Subscription

    plan = Plan.objects.create(code="team", name="Team", base_fee=Decimal("99"), included_credits=Decimal("500"))
    customer = make_customer("wayne", email="ap@wayne.test")
    started = (timezone.now() - timedelta(days=40)).replace(microsecond=0)
    client = staff_client("finance")
    client.post(reverse("admin:billing_subscription_add"), {
        "customer": customer.pk, "plan": plan.pk,
        "start_at_0": started.strftime("%Y-%m-%d"), "start_at_1": started.strftime("%H:%M:%S")})
    subscription = Subscription.objects.get(customer=customer)
    page = client.get(reverse("admin:billing_subscription_change", args=[subscription.pk])).content.decode()
    assert f"/admin/billing/subscription/{subscription.pk}/close_period/" in page

    auditor = staff_client("auditor", "auditor-2")
    assert auditor.post(reverse("admin:billing_subscription_close_period", args=[subscription.pk])).status_code == 403
    client.force_login(subscription.created_by)
    client.post(reverse("admin:billing_subscription_close_period", args=[subscription.pk]))
    subscription.refresh_from_db()
    assert subscription.period_index == 1
    invoice = subscription.periods.get(index=0).invoice
    assert invoice.status == Invoice.Status.ISSUED and invoice.total == Decimal("99.00")


def test_invoice_list_filters_by_status_year_customer_and_finds_a_number(draft, staff_client):  # noqa: F811
    issued = invoice_issue(invoice_id=draft.pk)
    other = invoice_create_draft(customer=make_customer("other-co"))
    client = staff_client("auditor")
    changelist = reverse("admin:billing_invoice_changelist")

    def listed(**params) -> set[int]:
        response = client.get(changelist, params)
        assert response.status_code == 200
        return {invoice.pk for invoice in response.context["cl"].result_list}

    assert listed() == {issued.pk, other.pk}
    assert listed(status__exact="draft") == {other.pk}
    assert listed(year=str(issued.year)) == {issued.pk}
    assert listed(customer__id__exact=str(other.customer_id)) == {other.pk}
    assert listed(q=issued.number) == {issued.pk}
