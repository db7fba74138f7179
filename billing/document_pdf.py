"""What the A4 PDFs of documents (invoices, credit notes) share: the canvas,
the page head (title and seller, the ``label: value`` fields, the column heads
of the lines) and the bytes at the end. Each document draws its own lines and
totals between them."""

from __future__ import annotations

import io
from collections.abc import Iterable

from reportlab.lib.pagesizes import A4
from reportlab.lib.units import mm
from reportlab.pdfgen import canvas

WIDTH, HEIGHT = A4
LEFT, RIGHT = 20 * mm, WIDTH - 20 * mm


def pdf_canvas(buffer: io.BytesIO, *, title: str, author: str, compress: bool) -> canvas.Canvas:
    pdf = canvas.Canvas(buffer, pagesize=A4, pageCompression=1 if compress else 0)
    pdf.setTitle(title)
    pdf.setAuthor(author)
    return pdf


def draw_page_head(pdf: canvas.Canvas, *, title: str, seller: str, fields: Iterable[tuple[str, str]],
                   label_width: float, columns: Iterable[tuple[float, str]]) -> float:
    """Title and seller on top, the fields below them, then "Description" and
    the ``columns`` (right edge, label) over a rule. Returns the y of the first line."""
    pdf.setFont("Helvetica-Bold", 16)
    pdf.drawString(LEFT, HEIGHT - 25 * mm, title)
    pdf.setFont("Helvetica", 9)
    pdf.drawRightString(RIGHT, HEIGHT - 25 * mm, seller)
    y = HEIGHT - 35 * mm
    for label, value in fields:
        pdf.drawString(LEFT, y, f"{label}:")
        pdf.drawString(LEFT + label_width, y, value)
        y -= 5 * mm
    y -= 4 * mm
    pdf.setFont("Helvetica-Bold", 9)
    pdf.drawString(LEFT, y, "Description")
    for edge, label in columns:
        pdf.drawRightString(edge, y, label)
    pdf.line(LEFT, y - 2 * mm, RIGHT, y - 2 * mm)
    pdf.setFont("Helvetica", 9)
    return y - 7 * mm


def pdf_bytes(pdf: canvas.Canvas, buffer: io.BytesIO) -> bytes:
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()
