"""Invoices over the API: a customer's invoices (cursor list, status filter),
one invoice with lines and totals, its PDF; drafts stay invisible."""

from __future__ import annotations

from datetime import UTC, timedelta
from decimal import Decimal

import pytest

from billing.models import InvoiceLine
from billing.services.invoices import invoice_add_line, invoice_create_draft, invoice_issue, payment_record
from tests.billing.api.conftest import Api, assert_error
from tests.billing.invoicing.test_admin import _pdf_text
from tests.factories import make_customer

pytestmark = pytest.mark.django_db


def make_invoice(customer, *amounts: str, issue: bool = True):
    invoice = invoice_create_draft(customer=customer, tax_rate=Decimal("10"))
    for n, amount in enumerate(amounts):
        invoice_add_line(invoice_id=invoice.pk, kind=InvoiceLine.Kind.MANUAL, description=f"Line {n + 1}",
                         quantity=Decimal(2), unit_price=Decimal(amount))
    return invoice_issue(invoice_id=invoice.pk) if issue else invoice


@pytest.fixture
def invoices(db):
    customer = make_customer("acme", email="ap@acme.test")
    first = make_invoice(customer, "10.50", "4")
    second = make_invoice(customer, "100")
    payment_record(invoice_id=second.pk, amount=Decimal("220.00"))
    make_invoice(customer, "1", issue=False)
    make_invoice(make_customer("other"), "5")
    return first, second


def test_get_one_invoice_with_lines_totals_and_due_date(invoices, read_api):
    first, _ = invoices
    status, body = read_api.get(f"/api/v1/invoices/{first.number}")
    assert status == 200
    assert {k: body[k] for k in ("number", "customer", "status", "currency", "subtotal", "tax", "total",
                                 "amount_paid", "amount_due")} == {
        "number": first.number, "customer": "acme", "status": "issued", "currency": "USD", "subtotal": "29.0000",
        "tax": "2.9000", "total": "31.9000", "amount_paid": "0.0000", "amount_due": "31.9000"}
    assert (body["issued_at"], body["due_at"]) == (first.issued_at.astimezone(UTC).isoformat(),
                                                   first.due_at.astimezone(UTC).isoformat())
    assert first.due_at - first.issued_at == timedelta(days=30)
    assert [(line["description"], line["quantity"], line["unit_price"], line["amount"]) for line in body["lines"]] == [
        ("Line 1", "2.000000", "10.5000000000", "21.0000"), ("Line 2", "2.000000", "4.0000000000", "8.0000")]
    assert body["pdf_url"] == f"/api/v1/invoices/{first.number}/pdf"


def test_list_newest_first_cursor_and_status_filter_without_drafts(invoices, read_api):
    first, second = invoices
    status, page = read_api.get("/api/v1/customers/acme/invoices?limit=1")
    assert status == 200 and [i["number"] for i in page["results"]] == [second.number]
    status, rest = read_api.get(f"/api/v1/customers/acme/invoices?limit=1&cursor={page['next_cursor']}")
    assert [i["number"] for i in rest["results"]] == [first.number] and rest["next_cursor"] is None
    status, paid = read_api.get("/api/v1/customers/acme/invoices?status=paid")
    assert [(i["number"], i["status"]) for i in paid["results"]] == [(second.number, "paid")]
    assert_error(read_api.get("/api/v1/customers/acme/invoices?status=draft"), 400, "invalid_request", "status")
    assert_error(read_api.get("/api/v1/customers/nobody/invoices"), 404, "not_found", "customer")


def test_invoice_reads_need_a_key_with_the_scope(invoices, usage_api):
    assert_error(Api(None).get("/api/v1/invoices/INV-2026-000001"), 401, "unauthorized")
    assert_error(usage_api.get(f"/api/v1/invoices/{invoices[0].number}"), 403, "forbidden")


def test_unknown_numbers_are_not_found(invoices, read_api):
    assert_error(read_api.get("/api/v1/invoices/INV-1999-000001"), 404, "not_found", "invoice")
    assert_error(read_api.get("/api/v1/invoices/None"), 404, "not_found", "invoice")


def test_the_pdf_downloads_and_holds_every_line(invoices, read_api):
    first, _ = invoices
    response = read_api.client.get(f"/api/v1/invoices/{first.number}/pdf")
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert f'filename="{first.number}.pdf"' in response["Content-Disposition"]
    assert response.content.startswith(b"%PDF")
    text = _pdf_text(response.content)
    assert b"Line 1" in text and b"Line 2" in text and first.number.encode() in text
    assert_error(read_api.get("/api/v1/invoices/INV-1999-000009/pdf"), 404, "not_found")

