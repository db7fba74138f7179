"""The ledger, usage events and holds: read-only for everyone. The ledger and
usage tables grow without bound, so their lists never count the whole table and
filter only on indexed columns."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin import DateFieldListFilter
from django.core.exceptions import PermissionDenied

from billing.admin.base import (
    BillingModelAdmin,
    CappedCountMixin,
    Operation,
    OperationsMixin,
    ReadOnlyAdminMixin,
    admin_link,
)
from billing.models import Customer, LedgerEntry, Reservation, UsageEvent, Wallet
from billing.services.reservations import reservation_release


class EchoFilter(admin.SimpleListFilter):
    """A filter set from links elsewhere (?wallet=…): it shows only the current
    value, so rendering it never lists a big table."""

    def lookups(self, request, model_admin):
        value = self.value()
        return [(value, f"#{value}")] if value else []

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(**{self.lookup: int(value)})


class WalletFilter(EchoFilter):
    title = "wallet"
    parameter_name = "wallet__id__exact"
    lookup = "wallet_id"


class GrantFilter(EchoFilter):
    title = "grant"
    parameter_name = "grant__id__exact"
    lookup = "grant_id"


class CustomerFilter(EchoFilter):
    title = "customer"
    parameter_name = "customer__id__exact"
    lookup = "customer_id"


@admin.register(LedgerEntry)
class LedgerEntryAdmin(CappedCountMixin, ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("created_at", "customer", "wallet_name", "sequence", "type", "amount", "balance_after",
                    "grant_link", "reference", "memo")
    list_display_links = ("created_at",)
    list_select_related = ("wallet__customer", "grant")
    list_filter = ("type", ("created_at", DateFieldListFilter), WalletFilter, GrantFilter)
    search_fields = ("wallet__customer__external_id__exact",)
    search_help_text = "A customer's exact external id."
    sortable_by = ()
    fields = ("wallet", "grant", "type", "amount", "sequence", "balance_after", "usage_event", "reservation",
              "reference", "idempotency_key", "memo", "created_at")
    raw_id_fields = ("wallet", "grant", "usage_event", "reservation")

    def get_ordering(self, request):
        # One customer or wallet: the (wallet, sequence) index; the whole ledger: the primary key.
        if request.GET.get(WalletFilter.parameter_name) or request.GET.get("q"):
            return ("-wallet_id", "-sequence")
        return ("-id",)

    def get_search_results(self, request, queryset, search_term):
        """A customer's exact external id → its wallets' ids first, so the list
        reads the (wallet, sequence) index instead of walking the whole ledger."""
        term = search_term.strip()
        if not term:
            return queryset, False
        wallet_ids = list(Wallet.objects.filter(customer__external_id=term).values_list("pk", flat=True))
        return queryset.filter(wallet_id__in=wallet_ids), False

    @admin.display(description="customer")
    def customer(self, obj):
        return admin_link(obj.wallet.customer, obj.wallet.customer.name)

    @admin.display(description="wallet")
    def wallet_name(self, obj):
        return admin_link(obj.wallet, obj.wallet.name)

    @admin.display(description="grant")
    def grant_link(self, obj):
        return admin_link(obj.grant, f"#{obj.grant_id} {obj.grant.kind}") if obj.grant_id else "overage"


@admin.register(UsageEvent)
class UsageEventAdmin(CappedCountMixin, ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("created_at", "customer_link", "feature", "event_id", "quantity", "credits", "status",
                    "occurred_at")
    list_display_links = ("created_at",)
    list_select_related = ("customer", "feature")
    list_filter = ("status", ("created_at", DateFieldListFilter), "feature", CustomerFilter, WalletFilter)
    search_fields = ("customer__external_id__exact", "event_id__exact")
    search_help_text = "A customer's exact external id, optionally followed by one of its event ids."
    sortable_by = ()

    def get_ordering(self, request):
        # One customer: its wallets' (wallet, created_at) index; everything: the primary key.
        if request.GET.get("q") or request.GET.get(WalletFilter.parameter_name):
            return ("-created_at",)
        return ("-id",)

    def get_search_results(self, request, queryset, search_term):
        """``<external id>`` lists a customer's events through its wallets' index;
        ``<external id> <event id>`` finds one event by its unique key."""
        parts = search_term.split(maxsplit=1)
        if not parts:
            return queryset, False
        customer = Customer.objects.filter(external_id=parts[0]).only("pk").first()
        if customer is None:
            return queryset.none(), False
        if len(parts) == 2:
            return queryset.filter(customer_id=customer.pk, event_id=parts[1].strip()), False
        wallet_ids = list(Wallet.objects.filter(customer_id=customer.pk).values_list("pk", flat=True))
        return queryset.filter(wallet_id__in=wallet_ids), False
    fields = ("customer", "wallet", "feature", "event_id", "quantity", "occurred_at", "properties", "rate",
              "credits_per_unit", "credits", "status", "reservation", "response", "created_at")
    raw_id_fields = ("customer", "wallet", "rate", "reservation")

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.external_id)


def _open(reservation, user) -> bool:
    return reservation.status == Reservation.Status.OPEN


@admin.register(Reservation)
class ReservationAdmin(OperationsMixin, BillingModelAdmin):
    list_display = ("id", "customer_link", "wallet", "feature", "amount", "status", "expires_at", "created_at")
    list_select_related = ("customer", "wallet__customer", "feature")
    list_filter = ("status", ("created_at", DateFieldListFilter))
    search_fields = ("customer__external_id__exact",)
    search_help_text = "A customer's exact external id."
    ordering = ("-id",)
    readonly_fields = ("wallet", "customer", "feature", "quantity", "amount", "status", "expires_at",
                       "idempotency_key", "usage_event", "closed_at", "created_at")
    operations = (
        Operation("release", "Release", "change",
                  lambda request, hold, data: reservation_release(reservation_id=hold.pk),
                  "Released {count} hold(s).", available=_open,
                  help="The held credits become available again."),
    )

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.external_id)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if request.method == "POST":
            raise PermissionDenied
        extra_context = dict(extra_context or {})
        hold = self.get_object(request, object_id)
        if hold is not None:
            extra_context["object_buttons"] = self.operation_buttons(request, hold)
        extra_context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        return super().change_view(request, object_id, form_url, extra_context)
