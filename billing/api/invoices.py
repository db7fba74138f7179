"""Invoices for the product: a customer's invoices, one invoice with its lines,
and its PDF (scope ``balance:read``). Drafts are finance's work in progress and
never appear here; invoices are addressed by their number."""

from __future__ import annotations

from django.db.models import Prefetch
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from billing.api.base import BALANCE_READ, ApiView, customer_wallet, errors
from billing.api.inputs import AwareDateTimeField, DecimalStringField, storable
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import MAX_MONEY, money_field, quantity_field, rate_field
from billing.errors import InvalidRequest, NotFound
from billing.invoice_document import render_pdf
from billing.models import Invoice, InvoiceLine


class InvoiceLineSerializer(serializers.Serializer):
    position = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=InvoiceLine.Kind.choices)
    description = serializers.CharField()
    quantity = quantity_field()
    unit_price = rate_field()
    amount = money_field(help_text="quantity × unit price, rounded to the currency (negative for credit notes).")


class InvoiceSerializer(serializers.Serializer):
    number = serializers.CharField()
    customer = serializers.CharField(source="customer.external_id")
    status = serializers.ChoiceField(choices=[s for s in Invoice.Status.choices if s[0] != Invoice.Status.DRAFT])
    currency = serializers.CharField()
    subtotal = money_field()
    tax_rate = DecimalStringField(places=4, maximum=MAX_MONEY, allow_zero=True, help_text="Percent.")
    tax = money_field()
    total = money_field()
    amount_paid = money_field()
    amount_due = money_field()
    issued_at = AwareDateTimeField()
    due_at = AwareDateTimeField()
    paid_at = AwareDateTimeField(allow_null=True)
    voided_at = AwareDateTimeField(allow_null=True)
    lines = InvoiceLineSerializer(many=True)
    pdf_url = serializers.SerializerMethodField()

    def get_pdf_url(self, invoice) -> str:
        return f"/api/v1/invoices/{invoice.number}/pdf"


class InvoicePageSerializer(serializers.Serializer):
    results = InvoiceSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


STATUS_PARAMETER = OpenApiParameter(
    "status", OpenApiTypes.STR, OpenApiParameter.QUERY, enum=["issued", "paid", "void"],
    description="Only invoices in this status.")


def published_invoices():
    lines = Prefetch("lines", queryset=InvoiceLine.objects.order_by("position", "pk"))
    return Invoice.objects.exclude(status=Invoice.Status.DRAFT).select_related("customer").prefetch_related(lines)


def load_invoice(number: str) -> Invoice:
    invoice = published_invoices().filter(number=number).first() if len(number) <= 32 and storable(number) else None
    if invoice is None:
        raise NotFound(f"No invoice {number!r}."[:300], details={"invoice": "not found"})
    return invoice


class CustomerInvoicesApi(ApiView):
    """The customer's issued, paid and void invoices with their lines, newest
    first, cursor-paginated; ``?status=`` narrows them (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="customers_invoices_list", parameters=[*PAGE_PARAMETERS, STATUS_PARAMETER],
                   responses={200: InvoicePageSerializer, **errors(400, 404)})
    def get(self, request, external_id: str):
        page = page_request(request.query_params, key_type=int)
        status = request.query_params.get("status")
        invoices = published_invoices()
        if status is not None:
            if status not in ("issued", "paid", "void"):
                raise InvalidRequest("status must be issued, paid or void.",
                                     details={"status": "one of issued, paid, void"})
            invoices = invoices.filter(status=status)
        customer = customer_wallet(external_id).customer
        return Response(paginate(invoices.filter(customer=customer), page, key="pk", descending=True,
                                 represent=lambda invoice: InvoiceSerializer(invoice).data))


class InvoiceDetailApi(ApiView):
    """One invoice by number: lines, totals, status, due date (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="invoices_retrieve", responses={200: InvoiceSerializer, **errors(404)})
    def get(self, request, number: str):
        return Response(InvoiceSerializer(load_invoice(number)).data)


class InvoicePdfApi(ApiView):
    """The invoice as a PDF document (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="invoices_pdf",
                   responses={(200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY), **errors(404)})
    def get(self, request, number: str):
        invoice = load_invoice(number)
        response = HttpResponse(render_pdf(invoice), content_type="application/pdf")
        response["Content-Disposition"] = f'attachment; filename="{invoice.number}.pdf"'
        return response
