"""An invoice as a document: the same figures for the HTML view, the PDF and
the email. Reads only; the figures come from the invoice as the services left
it (amounts are already rounded to the currency), formatted here for people.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.template.loader import render_to_string
from django.utils import timezone
from reportlab.lib.units import mm
from reportlab.lib.utils import simpleSplit

from billing.document_pdf import LEFT, RIGHT, draw_page_head, pdf_bytes, pdf_canvas
from billing.models import Invoice
from billing.numbers import minor_units, round_money


def money(value: Decimal, currency: str) -> str:
    """``1,234.50 USD``: the currency's minor units, thousands separated."""
    places = minor_units(currency)
    return f"{round_money(value, currency):,.{places}f} {currency}"


def quantity_text(value: Decimal) -> str:
    return f"{value.normalize():f}"


def price_text(value: Decimal, currency: str) -> str:
    """A price per unit as stored (``0.0081 USD``), not rounded to the currency."""
    return f"{quantity_text(value)} {currency}"


def date_text(value) -> str:
    """The local date of a moment, ``-`` when there is none."""
    return timezone.localtime(value).strftime("%Y-%m-%d") if value else "-"


@dataclass(frozen=True)
class DocumentLine:
    kind: str
    description: str
    quantity: str
    unit_price: str
    amount: str


@dataclass(frozen=True)
class InvoiceDocument:
    title: str
    number: str
    status: str
    seller: str
    customer_name: str
    customer_id: str
    billing_email: str
    issued: str
    due: str
    currency: str
    lines: list[DocumentLine]
    subtotal: str
    tax_label: str
    tax: str
    total: str
    paid: str
    amount_due: str
    memo: str


def invoice_document(invoice: Invoice) -> InvoiceDocument:
    cur = invoice.currency
    lines = [
        DocumentLine(kind=line.get_kind_display(), description=line.description,
                     quantity=quantity_text(line.quantity), unit_price=price_text(line.unit_price, cur),
                     amount=money(line.amount, cur))
        for line in invoice.lines.order_by("position", "pk")
    ]
    number = invoice.number or f"Draft #{invoice.pk}"
    return InvoiceDocument(
        title=f"Invoice {number}", number=number, status=invoice.get_status_display(),
        seller=settings.CREDITDESK_INVOICE_SELLER, customer_name=invoice.customer.name,
        customer_id=invoice.customer.external_id, billing_email=invoice.billing_email,
        issued=date_text(invoice.issued_at), due=date_text(invoice.due_at), currency=cur, lines=lines,
        subtotal=money(invoice.subtotal, cur), tax_label=f"Tax ({invoice.tax_rate.normalize():f}%)",
        tax=money(invoice.tax, cur), total=money(invoice.total, cur), paid=money(invoice.amount_paid, cur),
        amount_due=money(invoice.amount_due, cur), memo=invoice.memo,
    )


def render_html(invoice: Invoice) -> str:
    return render_to_string("billing/invoices/invoice.html", {"doc": invoice_document(invoice)})


def render_pdf(invoice: Invoice, *, compress: bool = True) -> bytes:
    """A4 PDF of the invoice; lines flow onto further pages as needed."""
    doc = invoice_document(invoice)
    buffer = io.BytesIO()
    pdf = pdf_canvas(buffer, title=doc.title, author=doc.seller, compress=compress)
    left, right, bottom = LEFT, RIGHT, 25 * mm
    columns = (left, left + 95 * mm, left + 115 * mm, right)  # description, qty, unit price, amount (right edge)

    def header() -> float:
        return draw_page_head(
            pdf, title=doc.title, seller=doc.seller, label_width=30 * mm,
            fields=(("Status", doc.status), ("Customer", f"{doc.customer_name} ({doc.customer_id})"),
                    ("Billing email", doc.billing_email or "-"), ("Issued", doc.issued), ("Due", doc.due),
                    ("Currency", doc.currency)),
            columns=((columns[1] + 15 * mm, "Quantity"), (columns[2] + 35 * mm, "Unit price"),
                     (columns[3], "Amount")))

    y = header()
    for line in doc.lines:
        wrapped = simpleSplit(line.description, "Helvetica", 9, 90 * mm) or [""]
        needed = 5 * mm * len(wrapped)
        if y - needed < bottom:
            pdf.showPage()
            y = header()
        pdf.drawRightString(columns[1] + 15 * mm, y, line.quantity)
        pdf.drawRightString(columns[2] + 35 * mm, y, line.unit_price)
        pdf.drawRightString(columns[3], y, line.amount)
        for part in wrapped:
            pdf.drawString(columns[0], y, part)
            y -= 5 * mm
    if y - 40 * mm < bottom:
        pdf.showPage()
        y = header()
    pdf.line(left + 95 * mm, y, right, y)
    y -= 6 * mm
    for label, value, bold in (("Subtotal", doc.subtotal, False), (doc.tax_label, doc.tax, False),
                               ("Total", doc.total, True), ("Paid", doc.paid, False),
                               ("Amount due", doc.amount_due, True)):
        pdf.setFont("Helvetica-Bold" if bold else "Helvetica", 9)
        pdf.drawString(left + 95 * mm, y, label)
        pdf.drawRightString(right, y, value)
        y -= 5 * mm
    if doc.memo:
        pdf.setFont("Helvetica", 9)
        for part in simpleSplit(doc.memo, "Helvetica", 9, right - left):
            y -= 5 * mm
            pdf.drawString(left, y, part)
    return pdf_bytes(pdf, buffer)
