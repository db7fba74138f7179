"""Invoices and payments in the back office: draft → add lines → issue (number,
email with PDF) → record payment or void; the HTML view and the PDF download;
billing profiles (billing email, net terms, tax rate); plans and subscriptions
(start, change plan with a proration preview before confirming, cancel now or
at period end, close a period that has ended). Finance works here, auditors read. Every change goes through ``billing.services.invoices``
and ``billing.services.plans``.
"""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.widgets import AdminSplitDateTime, ForeignKeyRawIdWidget
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from billing.admin.base import (
    AuditedAdminMixin,
    AuditHistoryMixin,
    BillingModelAdmin,
    DocumentViewsMixin,
    Operation,
    OperationsMixin,
    ReadOnlyAdminMixin,
    ReadOnlyInline,
    ServiceOnlyChangeMixin,
    admin_link,
    run_service,
    service_add_view,
)
from billing.admin.ledger import CustomerFilter
from billing.forms import ReasonForm, SubmissionTokenMixin
from billing.invoice_document import render_html, render_pdf
from billing.models import (
    BillingProfile,
    Customer,
    Invoice,
    InvoiceLine,
    InvoiceNumberCounter,
    Payment,
    Plan,
    Subscription,
    SubscriptionChange,
    SubscriptionPeriod,
    Wallet,
)
from billing.numbers import MAX_QUANTITY, MAX_RATE
from billing.services.invoices import (
    invoice_add_line,
    invoice_create_draft,
    invoice_issue,
    invoice_void,
    payment_record,
)
from billing.services.plans import (
    subscription_cancel,
    subscription_change_plan,
    subscription_change_preview,
    subscription_period_close,
    subscription_start,
)

MONEY_MAX = Decimal("9999999999999999.99")


class InvoiceDraftForm(forms.Form):
    customer = forms.ModelChoiceField(queryset=Customer.objects.all())
    tax_rate = forms.DecimalField(max_digits=7, decimal_places=4, min_value=0, max_value=100, required=False,
                                  help_text="Percent; empty: the customer's billing profile.")
    net_terms_days = forms.IntegerField(min_value=0, max_value=365, required=False,
                                        help_text="Days to pay; empty: the customer's billing profile.")
    memo = forms.CharField(max_length=500, required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            self.fields["customer"].widget = ForeignKeyRawIdWidget(
                Invoice._meta.get_field("customer").remote_field, admin_site)


class InvoiceLineForm(forms.Form):
    kind = forms.ChoiceField(choices=[c for c in InvoiceLine.Kind.choices if c[0] != InvoiceLine.Kind.PACK_PURCHASE])
    description = forms.CharField(max_length=500)
    quantity = forms.DecimalField(max_digits=20, decimal_places=6, min_value=Decimal("0.000001"),
                                  max_value=MAX_QUANTITY, initial=1)
    unit_price = forms.DecimalField(max_digits=20, decimal_places=10, min_value=-MAX_RATE, max_value=MAX_RATE,
                                    help_text="Negative for a credit note.")


class PaymentForm(SubmissionTokenMixin):
    amount = forms.DecimalField(max_digits=20, decimal_places=4, min_value=Decimal("0.0001"), max_value=MONEY_MAX)
    reference = forms.CharField(max_length=255, required=False, help_text="Bank transfer or provider reference.")
    received_at = forms.SplitDateTimeField(widget=AdminSplitDateTime, required=False,
                                           help_text="Empty: now.")


def _issue(request, invoice, data):
    invoice_issue(invoice_id=invoice.pk, actor=request.user)


def _void(request, invoice, data):
    invoice_void(invoice_id=invoice.pk, reason=data["reason"], actor=request.user)


def _add_line(request, invoice, data):
    invoice_add_line(invoice_id=invoice.pk, kind=data["kind"], description=data["description"],
                     quantity=data["quantity"], unit_price=data["unit_price"], actor=request.user)


def _record_payment(request, invoice, data):
    payment_record(invoice_id=invoice.pk, amount=data["amount"], reference=data.get("reference", ""),
                   received_at=data.get("received_at") or timezone.now(),
                   provider_event_id=f"admin:{data['token']}", actor=request.user)


class InvoiceLineInline(ReadOnlyInline):
    model = InvoiceLine
    fields = ("position", "kind", "description", "quantity", "unit_price", "amount", "pack_purchase")
    show_change_link = False


class PaymentInline(ReadOnlyInline):
    model = Payment
    fields = ("received_at", "amount", "currency", "method", "reference", "recorded_by")


@admin.register(Invoice)
class InvoiceAdmin(DocumentViewsMixin, ServiceOnlyChangeMixin, OperationsMixin, AuditHistoryMixin,
                   BillingModelAdmin):
    document_url_name = "billing_invoice"
    render_document_html = staticmethod(render_html)
    render_document_pdf = staticmethod(render_pdf)
    list_display = ("display_number", "customer_link", "status", "total", "amount_paid", "currency", "issued_at",
                    "due_at")
    list_display_links = ("display_number",)
    list_select_related = ("customer",)
    # The customer filter comes from links (?customer__id__exact=…) and never lists every customer.
    list_filter = ("status", "year", CustomerFilter, "issued_at")
    search_fields = ("=number", "customer__external_id", "customer__name")
    search_help_text = "Invoice number (exact), or customer external id or name."
    ordering = ("-created_at", "-id")
    inlines = (InvoiceLineInline, PaymentInline)
    readonly_fields = ("display_number", "customer_link", "status", "currency", "tax_rate", "net_terms_days",
                       "subtotal", "tax", "total", "amount_paid", "amount_due", "billing_email", "memo",
                       "issued_at", "due_at", "paid_at", "emailed_at", "voided_at", "void_reason", "created_by",
                       "created_at", "documents")
    fieldsets = (
        (None, {"fields": ("display_number", "customer_link", "status", "documents", "memo")}),
        ("Amounts", {"fields": ("currency", "subtotal", "tax_rate", "tax", "total", "amount_paid", "amount_due")}),
        ("Dates", {"fields": ("created_at", "issued_at", "net_terms_days", "due_at", "paid_at", "emailed_at",
                              "billing_email")}),
        ("Void", {"fields": ("voided_at", "void_reason"), "classes": ("collapse",)}),
    )
    operations = (
        Operation("add_line", "Add line", "change", _add_line, "Added a line to {count} invoice(s).",
                  form_class=InvoiceLineForm, available=lambda inv, user: inv.status == Invoice.Status.DRAFT,
                  help="Amount = quantity × unit price, rounded to the invoice currency."),
        Operation("issue", "Issue", "change", _issue, "Issued {count} invoice(s).",
                  available=lambda inv, user: inv.status == Invoice.Status.DRAFT,
                  help="Gives the invoice its number, sets the due date and emails it with the PDF."),
        Operation("record_payment", "Record payment", "record_payment", _record_payment,
                  "Recorded a payment on {count} invoice(s).", form_class=PaymentForm,
                  available=lambda inv, user: inv.status == Invoice.Status.ISSUED,
                  help="When the invoice is fully paid, credits waiting for it become usable."),
        Operation("void", "Void", "change", _void, "Voided {count} invoice(s).", form_class=ReasonForm,
                  available=lambda inv, user: inv.status in (Invoice.Status.DRAFT, Invoice.Status.ISSUED),
                  help="An issued invoice keeps its number. Credits waiting for its payment are voided."),
    )

    def has_record_payment_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("billing.add_payment")

    @admin.display(description="number", ordering="number")
    def display_number(self, obj):
        return str(obj)

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.name)

    @admin.display(description="amount due")
    def amount_due(self, obj):
        return obj.amount_due

    def document_filename(self, obj) -> str:
        return obj.number or f"draft-{obj.pk}"

    def get_urls(self):
        return self.document_urls() + super().get_urls()

    def add_view(self, request, form_url="", extra_context=None):
        """New draft invoice: ``invoice_create_draft``; lines are added on its page."""
        return service_add_view(
            self, request, form_class=InvoiceDraftForm, initial_field="customer",
            create=lambda data: invoice_create_draft(
                customer=data["customer"], tax_rate=data["tax_rate"], net_terms_days=data["net_terms_days"],
                memo=data["memo"], actor=request.user),
            success=lambda invoice: f"{invoice} created: add its lines, then issue it.",
            title="New draft invoice", submit="Create draft", intro="The invoice gets its number when it is issued.")


@admin.register(BillingProfile)
class BillingProfileAdmin(AuditedAdminMixin, BillingModelAdmin):
    list_display = ("customer", "billing_email", "net_terms_days", "tax_rate")
    list_select_related = ("customer",)
    search_fields = ("customer__external_id", "customer__name", "billing_email")
    raw_id_fields = ("customer",)


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "invoice_link", "amount", "currency", "method", "reference", "received_at",
                    "recorded_by")
    list_select_related = ("invoice", "recorded_by")
    list_filter = ("method", "received_at")
    search_fields = ("=invoice__number", "reference", "provider_event_id")
    ordering = ("-received_at", "-id")

    @admin.display(description="invoice")
    def invoice_link(self, obj):
        return admin_link(obj.invoice)


@admin.register(InvoiceLine)
class InvoiceLineAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "invoice_link", "kind", "description", "quantity", "unit_price", "amount")
    list_select_related = ("invoice",)
    list_filter = ("kind",)
    search_fields = ("=invoice__number", "description")

    @admin.display(description="invoice")
    def invoice_link(self, obj):
        return admin_link(obj.invoice)


@admin.register(InvoiceNumberCounter)
class InvoiceNumberCounterAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("year", "last_number")
    ordering = ("-year",)


@admin.register(Plan)
class PlanAdmin(AuditedAdminMixin, BillingModelAdmin):
    list_display = ("code", "name", "period", "base_fee", "currency", "included_credits", "overage_policy",
                    "overage_price", "overage_cap", "trial_days", "active")
    list_filter = ("active", "period", "overage_policy")
    search_fields = ("code", "name")


class SubscriptionStartForm(forms.Form):
    customer = forms.ModelChoiceField(queryset=Customer.objects.all())
    plan = forms.ModelChoiceField(queryset=Plan.objects.filter(active=True))
    wallet = forms.ModelChoiceField(queryset=Wallet.objects.all(), required=False,
                                    help_text="Empty: the customer's default wallet.")
    start_at = forms.SplitDateTimeField(widget=AdminSplitDateTime, required=False, help_text="Empty: now.")

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            for name in ("customer", "wallet"):
                self.fields[name].widget = ForeignKeyRawIdWidget(
                    Subscription._meta.get_field(name).remote_field, admin_site)


class PlanChangeForm(forms.Form):
    plan = forms.ModelChoiceField(queryset=Plan.objects.filter(active=True), help_text="Same currency and period.")
    confirm = forms.BooleanField(required=False, widget=forms.HiddenInput)


class CancelNowForm(forms.Form):
    confirm = forms.BooleanField(label="Close the current period now and issue its invoice")


class SubscriptionChangeInline(ReadOnlyInline):
    model = SubscriptionChange
    fields = ("effective_at", "from_plan", "to_plan", "remaining_fraction", "unused_credit", "remaining_charge",
              "credits_delta", "included_grant", "overage_credits", "created_by")


class SubscriptionPeriodInline(ReadOnlyInline):
    model = SubscriptionPeriod
    fields = ("index", "starts_at", "ends_at", "included_grant", "overage_credits", "invoice", "closed_at")
    ordering = ("-index",)


def _close_period(request, subscription, data):
    if subscription_period_close(subscription_id=subscription.pk, actor=request.user) is None:
        messages.info(request, f"{subscription}: the current period has not ended; nothing was closed.")


@admin.register(Subscription)
class SubscriptionAdmin(ServiceOnlyChangeMixin, OperationsMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("id", "customer_link", "plan", "status", "current_period_start", "current_period_end",
                    "cancel_at_period_end")
    list_select_related = ("customer", "plan")
    # The customer filter comes from links (?customer__id__exact=…) and never lists every customer.
    list_filter = ("status", "plan", "cancel_at_period_end", CustomerFilter)
    search_fields = ("customer__external_id", "customer__name")
    ordering = ("-created_at", "-id")
    inlines = (SubscriptionPeriodInline, SubscriptionChangeInline)
    readonly_fields = ("customer_link", "plan", "wallet", "status", "anchor_date", "period_index",
                       "current_period_start", "current_period_end", "trial_ends_at", "cancel_at_period_end",
                       "canceled_at", "created_by", "created_at")
    fields = readonly_fields
    operations = (
        Operation("close_period", "Close period", "change", _close_period, "Closed {count} period(s).",
                  available=lambda sub, user: sub.status != Subscription.Status.CANCELED
                  and sub.current_period_end <= timezone.now(),
                  help="Expires the period's included credits, issues its invoice and grants the next period's."),
        Operation("cancel", "Cancel at period end", "change",
                  lambda request, sub, data: subscription_cancel(subscription_id=sub.pk, actor=request.user),
                  "{count} subscription(s) will end with their current period.",
                  available=lambda sub, user: sub.status != Subscription.Status.CANCELED
                  and not sub.cancel_at_period_end),
        Operation("cancel_now", "Cancel now", "change",
                  lambda request, sub, data: subscription_cancel(subscription_id=sub.pk, at_period_end=False,
                                                                 actor=request.user),
                  "Cancelled {count} subscription(s) now.", form_class=CancelNowForm,
                  available=lambda sub, user: sub.status != Subscription.Status.CANCELED
                  and sub.current_period_end > timezone.now(),
                  help="Closes the current period now: its invoice bills the fee to date (the rest is credited) "
                       "and any overage; the remaining included credits are voided."),
    )

    def operation_buttons(self, request, obj) -> list[dict]:
        buttons = super().operation_buttons(request, obj)
        if (obj.status != Subscription.Status.CANCELED and not obj.cancel_at_period_end
                and obj.current_period_end > timezone.now() and self.has_change_permission(request, obj)):
            buttons.insert(0, {"label": "Change plan",
                               "url": reverse("admin:billing_subscription_change_plan", args=[obj.pk])})
        return buttons

    def get_urls(self):
        change_plan = path("<path:object_id>/change_plan/", self.admin_site.admin_view(self.change_plan_view),
                           name="billing_subscription_change_plan")
        return [change_plan, *super().get_urls()]

    def change_plan_view(self, request, object_id):
        """Pick a plan, see the proration (``subscription_change_preview``), then
        confirm: ``subscription_change_plan`` recomputes it at that moment."""
        subscription = self.get_object(request, object_id)
        if subscription is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, subscription):
            raise PermissionDenied
        change_url = reverse("admin:billing_subscription_change", args=[subscription.pk])
        form = PlanChangeForm(request.POST or None)
        preview = None
        if request.method == "POST" and form.is_valid():
            plan = form.cleaned_data["plan"]
            if form.cleaned_data["confirm"]:
                change = run_service(request, lambda: subscription_change_plan(
                    subscription_id=subscription.pk, plan=plan, actor=request.user))
                if change is not None:
                    messages.success(request, f"{subscription.customer.name} moved to {plan.name}; the proration "
                                              "is billed on the period's invoice.")
                    return HttpResponseRedirect(change_url)
            else:
                preview = run_service(request, lambda: subscription_change_preview(
                    subscription_id=subscription.pk, plan=plan))
                if preview is not None:
                    form = PlanChangeForm(initial={"plan": plan, "confirm": True})
                    form.fields["plan"].widget = forms.HiddenInput()
        context = {
            **self.admin_site.each_context(request), "opts": self.opts, "title": f"Change plan: {subscription}",
            "form": form, "subscription": subscription, "preview": preview, "change_url": change_url,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/billing/subscription_change_plan.html", context)

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.name)

    def add_view(self, request, form_url="", extra_context=None):
        """Put a customer on a plan: ``subscription_start`` grants the first period's credits."""
        return service_add_view(
            self, request, form_class=SubscriptionStartForm, initial_field="customer",
            create=lambda data: subscription_start(
                customer=data["customer"], plan=data["plan"], wallet=data["wallet"], start_at=data["start_at"],
                actor=request.user),
            success=lambda subscription: f"{subscription} started.",
            title="Put a customer on a plan", submit="Start subscription",
            intro="The plan's included credits for the first period are granted at once; a plan with trial days "
                  "starts trialing.")


@admin.register(SubscriptionPeriod)
class SubscriptionPeriodAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "subscription", "index", "starts_at", "ends_at", "overage_credits", "invoice",
                    "closed_at")
    list_select_related = ("subscription__customer", "subscription__plan", "invoice")
    search_fields = ("subscription__customer__external_id",)


@admin.register(SubscriptionChange)
class SubscriptionChangeAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "subscription", "from_plan", "to_plan", "effective_at", "unused_credit",
                    "remaining_charge", "credits_delta")
    list_select_related = ("subscription__customer", "subscription__plan", "from_plan", "to_plan")
    list_filter = ("to_plan", "effective_at")
    search_fields = ("subscription__customer__external_id", "subscription__customer__name")
