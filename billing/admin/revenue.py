"""Refunds, credit notes and revenue in the back office: request a refund of
unused prepaid credits (finance or support), approve or reject it (someone
else with the approve permission), the credit notes with their HTML view and
PDF, the monthly revenue report (with its reconciliation and a CSV export) and
the banner of the nightly revenue check. Every change goes through
``billing.services.refunds``; the figures come from ``billing.services.revenue``.
"""

from __future__ import annotations

import csv
from datetime import date

from django import forms
from django.contrib import admin
from django.contrib.admin.widgets import ForeignKeyRawIdWidget
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from billing.admin.base import (
    AuditHistoryMixin,
    BillingModelAdmin,
    DocumentViewsMixin,
    Operation,
    OperationsMixin,
    ReadOnlyAdminMixin,
    ServiceOnlyChangeMixin,
    admin_link,
    pk_link,
    service_add_view,
)
from billing.admin.ledger import CustomerFilter
from billing.admin.revenue_panels import REPORT_PERMISSION
from billing.credit_note_document import render_html, render_pdf
from billing.forms import OptionalReasonForm, credits_field
from billing.models import CreditGrant, CreditNote, RefundRequest
from billing.services.refunds import APPROVE_PERMISSION, refund_approve, refund_reject, refund_request
from billing.services.revenue import month_of, report_currencies, revenue_check_latest, revenue_report


class RefundRequestForm(forms.Form):
    grant = forms.ModelChoiceField(queryset=CreditGrant.objects.select_related("wallet__customer"),
                                   help_text="The paid grant (pack purchase or contract credits) to refund from.")
    all_unused = forms.BooleanField(required=False, label="All unused credits",
                                    help_text="Refund whatever is still unused when the request is approved.")
    credits = credits_field(required=False, help_text="Or this many credits.")
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            self.fields["grant"].widget = ForeignKeyRawIdWidget(
                RefundRequest._meta.get_field("grant").remote_field, admin_site)

    def clean(self):
        data = super().clean()
        if data.get("all_unused") == bool(data.get("credits")):
            raise forms.ValidationError("Tick “all unused credits” or give a number of credits (one of the two).")
        return data


class RefundQueueFilter(admin.SimpleListFilter):
    title = "approval queue"
    parameter_name = "approval"

    def lookups(self, request, model_admin):
        return [("others", "Waiting for me (requested by others)"), ("mine", "My pending requests")]

    def queryset(self, request, queryset):
        pending = queryset.filter(status=RefundRequest.Status.PENDING_APPROVAL)
        if self.value() == "others":
            return pending.exclude(requested_by=request.user)
        if self.value() == "mine":
            return pending.filter(requested_by=request.user)
        return queryset


def _pending(refund, user) -> bool:
    return refund.status == RefundRequest.Status.PENDING_APPROVAL


def _pending_for_someone_else(refund, user) -> bool:
    return _pending(refund, user) and refund.requested_by_id != user.pk


@admin.register(RefundRequest)
class RefundRequestAdmin(ServiceOnlyChangeMixin, OperationsMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("id", "customer", "grant_link", "asked", "status", "refunded_credits", "amount", "currency",
                    "requested_by", "decided_by", "created_at", "credit_note_link")
    list_select_related = ("grant__wallet__customer", "requested_by", "decided_by", "credit_note")
    list_filter = (RefundQueueFilter, "status", "currency", "created_at")
    search_fields = ("grant__wallet__customer__external_id", "grant__wallet__customer__name", "reason")
    search_help_text = "Customer external id or name, or words of the reason."
    ordering = ("-created_at", "-id")
    readonly_fields = ("customer", "grant_link", "asked", "reason", "status", "refunded_credits", "amount",
                       "currency", "requested_by", "decided_by", "decided_at", "decision_note", "created_at",
                       "credit_note_link")
    fields = readonly_fields
    operations = (
        Operation("approve", "Approve and refund", "approve",
                  lambda request, refund, data: refund_approve(refund_id=refund.pk, user=request.user),
                  "Refunded {count} request(s).", available=_pending_for_someone_else,
                  help="The credits leave the grant at once and a credit note is issued. "
                       "You cannot approve your own request."),
        Operation("reject", "Reject", "approve",
                  lambda request, refund, data: refund_reject(refund_id=refund.pk, user=request.user,
                                                              reason=data.get("reason", "")),
                  "Rejected {count} request(s).", form_class=OptionalReasonForm, available=_pending),
    )

    def has_approve_permission(self, request, obj=None) -> bool:
        return request.user.has_perm(APPROVE_PERMISSION)

    @admin.display(description="customer", ordering="grant__wallet__customer__name")
    def customer(self, obj):
        return admin_link(obj.grant.wallet.customer, obj.grant.wallet.customer.name)

    @admin.display(description="grant")
    def grant_link(self, obj):
        return pk_link(CreditGrant, obj.grant_id, f"#{obj.grant_id}")

    @admin.display(description="asked")
    def asked(self, obj):
        return "all unused" if obj.credits is None else obj.credits

    @admin.display(description="credit note")
    def credit_note_link(self, obj):
        note = getattr(obj, "credit_note", None)
        return admin_link(note) if note is not None else "-"

    def add_view(self, request, form_url="", extra_context=None):
        """Request a refund: ``refund_request``; another approver carries it out."""
        return service_add_view(
            self, request, form_class=RefundRequestForm, initial_field="grant",
            create=lambda data: refund_request(
                grant_id=data["grant"].pk, credits=None if data["all_unused"] else data["credits"],
                reason=data["reason"], requested_by=request.user),
            success=lambda refund: f"{refund} requested; another approver must approve it.",
            title="Request a refund of unused credits", submit="Request refund",
            intro="Money = credits × the grant's cost basis. A second person approves it.")


@admin.register(CreditNote)
class CreditNoteAdmin(DocumentViewsMixin, ReadOnlyAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    document_url_name = "billing_creditnote"
    render_document_html = staticmethod(render_html)
    render_document_pdf = staticmethod(render_pdf)
    list_display = ("number", "customer_link", "grant_link", "invoice_link", "credits", "amount", "currency",
                    "issued_at")
    list_select_related = ("customer", "invoice")
    list_filter = ("currency", "year", CustomerFilter, "issued_at")
    search_fields = ("=number", "customer__external_id", "customer__name")
    search_help_text = "Credit note number (exact), or customer external id or name."
    ordering = ("-issued_at", "-id")
    fields = ("number", "customer_link", "grant_link", "refund_link", "invoice_link", "pack_purchase",
              "description", "credits", "unit_price", "amount", "currency", "reason", "issued_at", "billing_email",
              "emailed_at", "created_by", "documents")
    readonly_fields = fields

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.name)

    @admin.display(description="grant")
    def grant_link(self, obj):
        return pk_link(CreditGrant, obj.grant_id, f"#{obj.grant_id}")

    @admin.display(description="refund request")
    def refund_link(self, obj):
        return pk_link(RefundRequest, obj.refund_request_id, f"#{obj.refund_request_id}")

    @admin.display(description="original invoice")
    def invoice_link(self, obj):
        return admin_link(obj.invoice) if obj.invoice_id else "-"

    def get_urls(self):
        return [
            path("revenue-report/", self.admin_site.admin_view(self.revenue_report_view),
                 name="billing_revenue_report"),
            *self.document_urls(),
        ] + super().get_urls()

    def changelist_view(self, request, extra_context=None):
        extra_context = dict(extra_context or {})
        if request.user.has_perm(REPORT_PERMISSION):
            extra_context["changelist_buttons"] = [
                {"label": "Revenue report", "url": reverse("admin:billing_revenue_report")}]
        return super().changelist_view(request, extra_context)

    def revenue_report_view(self, request):
        """The monthly revenue report (``?month=YYYY-MM&currency=USD``), ``&format=csv`` for the CSV."""
        if not request.user.has_perm(REPORT_PERMISSION):
            raise PermissionDenied
        year, month = _month_param(request.GET.get("month", ""))
        currencies = report_currencies()
        currency = request.GET.get("currency") or currencies[0]
        if currency not in currencies:
            currency = currencies[0]
        report = revenue_report(year=year, month=month, currency=currency)
        if request.GET.get("format") == "csv":
            return _report_csv(report)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Revenue report {year}-{month:02d} ({currency})",
            "report": report,
            "month_value": f"{year}-{month:02d}",
            "currencies": currencies,
            "currency": currency,
            "check_run": revenue_check_latest(),
            "csv_query": f"month={year}-{month:02d}&currency={currency}&format=csv",
        }
        return TemplateResponse(request, "admin/billing/revenue_report.html", context)


def _month_param(value: str) -> tuple[int, int]:
    """``YYYY-MM`` from the month picker; anything else: the current month."""
    try:
        chosen = date.fromisoformat(f"{value}-01")
    except ValueError:
        return month_of(timezone.now())
    return chosen.year, chosen.month


def _report_csv(report) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="revenue-{report.year}-{report.month:02d}-{report.currency}.csv"')
    writer = csv.writer(response)
    writer.writerow(["month", "currency", "section", "item", "credits", "amount"])
    for section, item, credits, amount in report.rows():
        writer.writerow([f"{report.year}-{report.month:02d}", report.currency, section, item,
                         "" if credits is None else f"{credits}", "" if amount is None else f"{amount}"])
    writer.writerow([f"{report.year}-{report.month:02d}", report.currency, "Reconciliation", "Reconciles", "",
                     "yes" if report.reconciles else "no"])
    return response
