"""Enterprise contracts in the back office (DESIGN.md §6).

Finance writes a draft contract here (terms and volume tiers, audited like a
plan), activates it, and from then on works it through operations that call
``billing.services.contracts``: release due instalments and true-ups, run a
true-up whose date has passed, renew, add credits, change the price from a
date. The change page shows the true-up statement; auditors read everything.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.widgets import AdminSplitDateTime
from django.core.exceptions import PermissionDenied
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from billing.admin.base import (
    AuditedAdminMixin,
    AuditHistoryMixin,
    BillingModelAdmin,
    Operation,
    OperationsMixin,
    ReadOnlyAdminMixin,
    ReadOnlyInline,
    admin_link,
)
from billing.admin.ledger import CustomerFilter
from billing.errors import Conflict
from billing.forms import ReasonForm, SubmissionTokenMixin, credits_field
from billing.models import Contract, ContractAmendment, ContractInstalment, ContractPriceTier, TrueUp
from billing.numbers import MAX_RATE
from billing.services.contracts import (
    contract_activate,
    contract_add_credits,
    contract_cancel,
    contract_change_price,
    contract_renew,
    contract_run_due,
    contract_statement,
    contract_true_up_settle,
    plus_months,
)


class RenewForm(SubmissionTokenMixin):
    months = forms.IntegerField(min_value=1, max_value=120, required=False,
                                help_text="Empty: the contract's term again.")
    list_price = forms.DecimalField(max_digits=20, decimal_places=10, min_value=0, max_value=MAX_RATE,
                                    required=False, help_text="New list price per credit for the renewed term "
                                                              "(before discount); empty: unchanged.")


class AddCreditsForm(SubmissionTokenMixin):
    credits = credits_field()
    note = forms.CharField(max_length=500, required=False)


class ChangePriceForm(SubmissionTokenMixin):
    effective_at = forms.SplitDateTimeField(widget=AdminSplitDateTime)
    list_price = forms.DecimalField(max_digits=20, decimal_places=10, min_value=0, max_value=MAX_RATE,
                                    required=False, help_text="Per credit, before the discount.")
    true_up_price = forms.DecimalField(max_digits=20, decimal_places=10, min_value=0, max_value=MAX_RATE,
                                       required=False)
    note = forms.CharField(max_length=500, required=False)

    def clean(self):
        data = super().clean()
        if data.get("list_price") is None and data.get("true_up_price") is None:
            raise forms.ValidationError("Give a new list price or a new true-up price.")
        return data


TERMS = ("customer", "wallet", "reference", "starts_at", "term_months", "commitment", "committed_credits",
         "committed_spend", "currency", "list_price", "discount_percent", "payment_schedule", "true_up_cadence",
         "true_up_price", "rollover_percent", "credit_limit")
STATE = ("status", "ends_at", "activated_at", "ended_at", "created_by", "created_at", "true_up_statement")


class ContractForm(forms.ModelForm):
    """Draft terms; one draft or active contract per pooled wallet."""

    class Meta:
        model = Contract
        fields = TERMS

    def clean(self):
        data = super().clean()
        wallet = data.get("wallet")
        live = (Contract.Status.DRAFT, Contract.Status.ACTIVE)
        if wallet is not None and Contract.objects.filter(wallet=wallet, status__in=live).exclude(
                pk=self.instance.pk).exists():
            self.add_error("wallet", "This wallet already has a draft or active contract.")
        return data


def _key(request, data) -> str:
    return f"admin:{data['token']}"


def _activate(request, contract, data):
    contract_activate(contract_id=contract.pk, actor=request.user)


def _cancel(request, contract, data):
    contract_cancel(contract_id=contract.pk, reason=data["reason"], actor=request.user)


def _run_due(request, contract, data):
    if not contract_run_due(contract_id=contract.pk, actor=request.user):
        messages.info(request, f"{contract}: no instalment or true-up is due.")


def _true_up_now(request, contract, data):
    due = contract.true_ups.filter(settled_at__isnull=True).order_by("period_end").first()
    if due is None:
        raise Conflict(f"{contract} has no unsettled true-up.")
    contract_true_up_settle(true_up_id=due.pk, actor=request.user)


def _renew(request, contract, data):
    contract_renew(contract_id=contract.pk, months=data.get("months"), list_price=data.get("list_price"),
                   idempotency_key=_key(request, data), actor=request.user)


def _add_credits(request, contract, data):
    contract_add_credits(contract_id=contract.pk, credits=data["credits"], note=data.get("note", ""),
                         idempotency_key=_key(request, data), actor=request.user)


def _change_price(request, contract, data):
    contract_change_price(contract_id=contract.pk, effective_at=data["effective_at"],
                          list_price=data.get("list_price"), true_up_price=data.get("true_up_price"),
                          note=data.get("note", ""), idempotency_key=_key(request, data), actor=request.user)


def _active(contract, user) -> bool:
    return contract.status == Contract.Status.ACTIVE


def _true_up_due(contract, user) -> bool:
    return _active(contract, user) and contract.true_ups.filter(
        settled_at__isnull=True, period_end__lte=timezone.now()).exists()


class ContractPriceTierInline(admin.TabularInline):
    model = ContractPriceTier
    fields = ("min_credits", "price_per_credit")
    extra = 0

    def _draft(self, obj) -> bool:
        return obj is None or obj.status == Contract.Status.DRAFT

    def has_add_permission(self, request, obj=None) -> bool:
        return self._draft(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request, obj=None) -> bool:
        return self._draft(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self._draft(obj) and super().has_change_permission(request, obj)


class ContractInstalmentInline(ReadOnlyInline):
    model = ContractInstalment
    fields = ("index", "due_at", "credits", "unit_price", "amount", "invoice", "grant", "expires_at", "released_at")


class TrueUpInline(ReadOnlyInline):
    model = TrueUp
    verbose_name_plural = "true-ups"
    fields = ("period_start", "period_end", "committed", "consumed", "overage_credits", "unit_price", "amount",
              "invoice", "settled_at")


class ContractAmendmentInline(ReadOnlyInline):
    model = ContractAmendment
    fields = ("kind", "effective_at", "credits", "list_price", "true_up_price", "months", "invoice", "grant",
              "note", "created_by", "created_at")


@admin.register(Contract)
class ContractAdmin(OperationsMixin, AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    form = ContractForm
    list_display = ("__str__", "customer_link", "status", "starts_at", "ends_at", "committed_credits",
                    "payment_schedule", "true_up_cadence", "currency")
    list_select_related = ("customer",)
    list_filter = ("status", "payment_schedule", "true_up_cadence", "commitment", CustomerFilter)
    search_fields = ("reference", "customer__external_id", "customer__name")
    search_help_text = "Contract reference, or customer external id or name."
    ordering = ("-starts_at", "-id")
    raw_id_fields = ("customer", "wallet")
    inlines = (ContractPriceTierInline, ContractInstalmentInline, TrueUpInline, ContractAmendmentInline)
    fieldsets = (
        (None, {"fields": ("customer", "wallet", "reference", "status", "true_up_statement")}),
        ("Term", {"fields": ("starts_at", "term_months", "ends_at", "activated_at", "ended_at")}),
        ("Commitment and price", {"fields": ("commitment", "committed_credits", "committed_spend", "currency",
                                             "list_price", "discount_percent", "payment_schedule")}),
        ("True-up, overdraft and renewal", {"fields": ("true_up_cadence", "true_up_price", "credit_limit",
                                                       "rollover_percent")}),
        ("Record", {"fields": ("created_by", "created_at"), "classes": ("collapse",)}),
    )
    operations = (
        Operation("activate", "Activate", "change", _activate, "Activated {count} contract(s).",
                  available=lambda c, user: c.status == Contract.Status.DRAFT,
                  help="Schedules the instalments and true-ups, puts the pooled wallet on overdraft and releases "
                       "the instalments already due (invoice + contract credits)."),
        Operation("cancel", "Cancel draft", "change", _cancel, "Canceled {count} draft contract(s).",
                  form_class=ReasonForm, available=lambda c, user: c.status == Contract.Status.DRAFT,
                  help="A draft that will not be signed; nothing was granted or billed."),
        Operation("run_due", "Release due instalments", "change", _run_due,
                  "Ran the due instalments and true-ups of {count} contract(s).", available=_active,
                  help="Releases every instalment whose due date has passed and settles every due true-up, "
                       "in date order. The beat job does the same every 15 minutes."),
        Operation("true_up", "Run true-up now", "change", _true_up_now, "Ran the true-up of {count} contract(s).",
                  available=_true_up_due,
                  help="Settles the earliest true-up whose date has passed: the outstanding overage is billed on "
                       "a true-up invoice at the true-up price and repaid in the ledger."),
        Operation("renew", "Renew", "change", _renew, "Renewed {count} contract(s).", form_class=RenewForm,
                  available=_active,
                  help="Extends the term, schedules its instalments and true-ups, and rolls the contract's "
                       "rollover share of the unused credits into a rollover grant."),
        Operation("add_credits", "Add credits", "change", _add_credits, "Added credits to {count} contract(s).",
                  form_class=AddCreditsForm, available=_active,
                  help="A contract grant at the effective price, usable to the end of the contract year, "
                       "billed at once on an issued invoice."),
        Operation("change_price", "Change price", "change", _change_price,
                  "Changed the price of {count} contract(s).", form_class=ChangePriceForm, available=_active,
                  help="Instalments due and true-ups dated from the given moment use the new price."),
    )

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.name)

    @admin.display(description="true-up statement")
    def true_up_statement(self, obj):
        if obj is None or obj.pk is None or obj.status in (Contract.Status.DRAFT, Contract.Status.CANCELED):
            return "Available once the contract is active."
        statement = contract_statement(contract=obj)
        money = f"{{}} {obj.currency}"
        rows = [
            ("Term end", f"{statement.term_end:%Y-%m-%d}"),
            ("Committed over the term", statement.term_committed),
            ("Consumed over the term to date", statement.term_consumed),
            ("Projected consumption at term end", statement.projected_term_consumption),
            ("Next true-up period", f"{statement.period_start:%Y-%m-%d} – {statement.period_end:%Y-%m-%d}"),
            ("Committed in the period (pro rata, plus credits added)", statement.committed),
            ("Consumed in the period to date", statement.consumed),
            ("Burn rate per day", statement.burn_rate_per_day),
            ("Projected consumption at the true-up date", statement.projected_consumption),
            ("Usable credits now", statement.credits_available),
            ("Instalment credits still to release", statement.credits_to_release),
            ("Outstanding overage", statement.outstanding_overage),
            ("Projected overage at the true-up date", statement.projected_overage),
            ("True-up price per credit", money.format(statement.true_up_price.normalize())),
            ("Projected true-up amount", money.format(statement.projected_true_up_amount)),
            ("Effective price per credit", money.format(statement.effective_price.normalize())),
        ]
        body = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        return format_html('<table class="contract-statement">{}</table>', body)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.status != Contract.Status.DRAFT:
            return TERMS + STATE
        return STATE

    def get_inlines(self, request, obj):
        if obj is None:
            return (ContractPriceTierInline,)
        return self.inlines

    def save_model(self, request, obj, form, change):
        """Drafts only (activation fixes the terms): the end follows the start and term."""
        if change and Contract.objects.filter(pk=obj.pk).exclude(status=Contract.Status.DRAFT).exists():
            raise PermissionDenied
        obj.ends_at = plus_months(obj, obj.term_months)
        if not change and getattr(request.user, "is_authenticated", False):
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        obj = self.get_object(request, object_id)
        if obj is not None:
            extra_context["object_buttons"] = self.operation_buttons(request, obj)
            if obj.status != Contract.Status.DRAFT:
                if request.method == "POST":
                    raise PermissionDenied
                extra_context.update(show_save=False, show_save_and_continue=False,
                                     show_save_and_add_another=False)
        return super().change_view(request, object_id, form_url, extra_context)


@admin.register(ContractInstalment)
class ContractInstalmentAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "contract", "index", "due_at", "credits", "unit_price", "amount", "invoice",
                    "released_at")
    list_select_related = ("contract__customer", "invoice")
    list_filter = (("released_at", admin.EmptyFieldListFilter), "due_at")
    search_fields = ("contract__reference", "contract__customer__external_id")


@admin.register(TrueUp)
class TrueUpAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "contract", "period_start", "period_end", "committed", "consumed", "overage_credits",
                    "amount", "invoice", "settled_at")
    list_select_related = ("contract__customer", "invoice")
    list_filter = (("settled_at", admin.EmptyFieldListFilter), "period_end")
    search_fields = ("contract__reference", "contract__customer__external_id")


@admin.register(ContractAmendment)
class ContractAmendmentAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("id", "contract", "kind", "effective_at", "credits", "list_price", "true_up_price", "invoice",
                    "created_by", "created_at")
    list_select_related = ("contract__customer", "invoice", "created_by")
    list_filter = ("kind", "effective_at")
    search_fields = ("contract__reference", "contract__customer__external_id")

