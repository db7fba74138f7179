"""A credit note as a document: the same figures for the HTML view and the PDF.
Reads only; the amounts are the ones the refund service stored."""

from __future__ import annotations

import io
from dataclasses import dataclass

from django.conf import settings
from django.template.loader import render_to_string
from reportlab.lib.units import mm
from reportlab.lib.utils import simpleSplit

from billing.document_pdf import LEFT, RIGHT, draw_page_head, pdf_bytes, pdf_canvas
from billing.invoice_document import date_text, money, price_text, quantity_text
from billing.models import CreditNote


@dataclass(frozen=True)
class CreditNoteDocument:
    title: str
    number: str
    seller: str
    customer_name: str
    customer_id: str
    issued: str
    original_invoice: str
    grant: str
    currency: str
    description: str
    credits: str
    unit_price: str
    amount: str
    reason: str


def credit_note_document(note: CreditNote) -> CreditNoteDocument:
    cur = note.currency
    return CreditNoteDocument(
        title=f"Credit note {note.number}", number=note.number, seller=settings.CREDITDESK_INVOICE_SELLER,
        customer_name=note.customer.name, customer_id=note.customer.external_id,
        issued=date_text(note.issued_at),
        original_invoice=note.invoice.number if note.invoice_id and note.invoice.number else "-",
        grant=f"#{note.grant_id}", currency=cur, description=note.description,
        credits=quantity_text(note.credits), unit_price=price_text(note.unit_price, cur),
        amount=money(note.amount, cur), reason=note.reason,
    )


def render_html(note: CreditNote) -> str:
    return render_to_string("billing/credit_notes/credit_note.html", {"doc": credit_note_document(note)})


def render_pdf(note: CreditNote, *, compress: bool = True) -> bytes:
    """A4 PDF of the credit note: header, the one refunded line, the amount credited."""
    doc = credit_note_document(note)
    buffer = io.BytesIO()
    pdf = pdf_canvas(buffer, title=doc.title, author=doc.seller, compress=compress)
    left, right = LEFT, RIGHT
    y = draw_page_head(
        pdf, title=doc.title, seller=doc.seller, label_width=35 * mm,
        fields=(("Customer", f"{doc.customer_name} ({doc.customer_id})"), ("Issued", doc.issued),
                ("Original invoice", doc.original_invoice), ("Credits of grant", doc.grant),
                ("Currency", doc.currency)),
        columns=((left + 110 * mm, "Credits"), (left + 145 * mm, "Unit price"), (right, "Amount")))
    pdf.drawRightString(left + 110 * mm, y, doc.credits)
    pdf.drawRightString(left + 145 * mm, y, doc.unit_price)
    pdf.drawRightString(right, y, doc.amount)
    for part in simpleSplit(doc.description, "Helvetica", 9, 85 * mm) or [""]:
        pdf.drawString(left, y, part)
        y -= 5 * mm
    y -= 3 * mm
    pdf.setFont("Helvetica-Bold", 9)
    pdf.drawString(left + 110 * mm, y, "Credited to you")
    pdf.drawRightString(right, y, doc.amount)
    if doc.reason:
        pdf.setFont("Helvetica", 9)
        for part in simpleSplit(f"Reason: {doc.reason}", "Helvetica", 9, right - left):
            y -= 6 * mm
            pdf.drawString(left, y, part)
    return pdf_bytes(pdf, buffer)
