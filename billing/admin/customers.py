"""Customers and wallets: balances, usable grants, recent ledger, open holds and
usage on their pages; the buttons finance uses from there."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, OuterRef, Subquery, Sum
from django.urls import path, reverse

from billing.admin.base import (
    AuditedAdminMixin,
    AuditHistoryMixin,
    BillingModelAdmin,
    Operation,
    OperationsMixin,
    admin_link,
)
from billing.admin.panels import usage_chart, wallet_panel
from billing.admin.team_limits import TeamSpendingLimitInline, save_team_limits
from billing.admin_views import bulk_promo_action, bulk_promo_view
from billing.forms import CustomerAddForm, ReasonForm
from billing.models import Customer, TeamSpendingLimit, Wallet
from billing.services.grants import customer_create
from billing.services.wallets import wallet_pause, wallet_resume

CONTACT_FIELDS = ("name", "email", "timezone")
WALLET_SETTINGS = ("name", "policy", "credit_limit")


def wallet_buttons(request, wallet: Wallet) -> list[dict]:
    """Links to the service-backed pages for one wallet, for those allowed to use them."""
    user, query = request.user, f"?wallet={wallet.pk}"
    buttons = []
    if user.has_perm("billing.add_creditgrant"):
        buttons.append({"label": "Grant credits", "url": reverse("admin:billing_creditgrant_add") + query})
    if user.has_perm("billing.add_packpurchase"):
        buttons.append({"label": "Sell a pack", "url": reverse("admin:billing_packpurchase_add") + query})
    if user.has_perm("billing.add_adjustment"):
        buttons.append({"label": "Request adjustment", "url": reverse("admin:billing_adjustment_add") + query})
    return buttons


@admin.register(Customer)
class CustomerAdmin(AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("name", "external_id", "email", "currency", "wallet_count", "ledger_total", "overage_total",
                    "created_at")
    list_filter = ("currency", "created_at")
    search_fields = ("external_id", "name", "email")
    ordering = ("name", "id")
    actions = ("bulk_promo_selected",)
    # customer_create records its own audit event.
    audit_adds = False

    def get_queryset(self, request):
        # Correlated subqueries rather than a GROUP BY join, so the changelist's
        # count stays a plain count of customers.
        wallets = Wallet.objects.filter(customer=OuterRef("pk")).order_by().values("customer")
        return super().get_queryset(request).annotate(
            _wallets=Subquery(wallets.annotate(n=Count("pk")).values("n")),
            _ledger=Subquery(wallets.annotate(total=Sum("ledger_balance")).values("total")),
            _overage=Subquery(wallets.annotate(total=Sum("overage")).values("total")),
        )

    @admin.display(description="wallets", ordering="_wallets")
    def wallet_count(self, obj):
        return obj._wallets

    @admin.display(description="ledger balance", ordering="_ledger")
    def ledger_total(self, obj):
        return obj._ledger

    @admin.display(description="overage", ordering="_overage")
    def overage_total(self, obj):
        return obj._overage

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = CustomerAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("external_id", "name", "email", "currency", "timezone", "policy", "credit_limit")
        return ("external_id", "name", "email", "timezone", "currency", "metadata", "created_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        if request.user.has_perm("billing.add_customer"):
            return ("external_id", "created_at")
        # Support edits contact details only.
        return tuple(f for f in self.get_fields(request, obj) if f not in CONTACT_FIELDS)

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        data = form.cleaned_data
        created = customer_create(
            external_id=data["external_id"], name=data["name"], email=data["email"], currency=data["currency"],
            timezone_name=data["timezone"], policy=data["policy"], credit_limit=data["credit_limit"],
            actor=request.user,
        )
        obj.pk, obj.created_at = created.pk, created.created_at
        obj._state.adding = False

    def get_urls(self):
        return [
            path("bulk-promo/", self.admin_site.admin_view(lambda request: bulk_promo_view(self, request)),
                 name="billing_customer_bulk_promo"),
        ] + super().get_urls()

    @admin.action(description="Bulk promotional grant to selected customers", permissions=["add_grant"])
    def bulk_promo_selected(self, request, queryset):
        return bulk_promo_action(self, request, queryset)

    def has_add_grant_permission(self, request) -> bool:
        return request.user.has_perm("billing.add_creditgrant")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        customer = self.get_object(request, object_id)
        if customer is not None and self.has_view_or_change_permission(request, customer):
            wallets = list(customer.wallets.select_related("customer").order_by("-is_default", "name", "pk"))
            extra_context["wallet_panels"] = [
                {**wallet_panel(wallet), "buttons": wallet_buttons(request, wallet)} for wallet in wallets
            ]
            extra_context["usage_chart"] = usage_chart([w.pk for w in wallets])
            default = next((w for w in wallets if w.is_default), None)
            if default is not None:
                extra_context["object_buttons"] = wallet_buttons(request, default)
        return super().change_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request, extra_context=None):
        extra_context = dict(extra_context or {})
        if self.has_add_grant_permission(request):
            extra_context["changelist_buttons"] = [
                {"label": "Bulk promotional grant", "url": reverse("admin:billing_customer_bulk_promo")}]
        return super().changelist_view(request, extra_context)


def _pause(request, wallet, data):
    wallet_pause(wallet_id=wallet.pk, reason=data["reason"], actor=request.user)


def _resume(request, wallet, data):
    wallet_resume(wallet_id=wallet.pk, actor=request.user)


@admin.register(Wallet)
class WalletAdmin(OperationsMixin, AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("__str__", "customer_link", "name", "is_default", "policy", "status", "ledger_balance",
                    "overage", "credit_limit", "created_at")
    list_select_related = ("customer",)
    list_filter = ("policy", "status", "is_default")
    search_fields = ("customer__external_id", "customer__name", "name")
    ordering = ("customer__name", "name", "id")
    raw_id_fields = ("customer",)
    inlines = (TeamSpendingLimitInline,)
    operations = (
        Operation("pause", "Pause", "change", _pause, "Paused {count} wallet(s).", form_class=ReasonForm,
                  available=lambda w, user: w.status == Wallet.Status.ACTIVE,
                  help="Charges are refused until credits arrive or the wallet is resumed."),
        Operation("resume", "Resume", "change", _resume, "Resumed {count} wallet(s).",
                  available=lambda w, user: w.status == Wallet.Status.PAUSED),
    )

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.external_id)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("customer", *WALLET_SETTINGS)
        return ("customer", *WALLET_SETTINGS, "is_default", "status", "paused_reason", "ledger_balance",
                "overage", "last_sequence", "created_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("customer", "is_default", "status", "paused_reason", "ledger_balance", "overage",
                "last_sequence", "created_at")

    def save_model(self, request, obj, form, change):
        if change:
            # Only the settings the form changed: the balance columns belong to the
            # ledger services and a full-row save would write a stale balance back.
            changed = [f for f in form.changed_data if f in WALLET_SETTINGS]
            if changed:
                obj.save(update_fields=changed)
            return
        obj.is_default = False
        obj.save()

    def save_formset(self, request, form, formset, change):
        if formset.model is TeamSpendingLimit:
            save_team_limits(request, form.instance, formset)
            return
        super().save_formset(request, form, formset, change)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        wallet = self.get_object(request, object_id)
        if wallet is not None and self.has_view_or_change_permission(request, wallet):
            extra_context["wallet_panels"] = [wallet_panel(wallet)]
            extra_context["object_buttons"] = wallet_buttons(request, wallet) + self.operation_buttons(
                request, wallet)
        return super().change_view(request, object_id, form_url, extra_context)
