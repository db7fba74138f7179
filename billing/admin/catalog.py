"""The catalog finance edits: features and their effective-dated credit costs,
credit packs with volume tiers, and pack sales (through ``pack_purchase``)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.admin.base import (
    AuditedAdminMixin,
    AuditHistoryMixin,
    BillingModelAdmin,
    admin_link,
    pk_link,
    render_form_page,
    run_service,
)
from billing.forms import SellPackForm
from billing.models import (
    CreditGrant,
    CreditPack,
    Feature,
    FeatureCost,
    PackDiscountTier,
    PackPurchase,
    UsageEvent,
)
from billing.services.packs import pack_price, pack_purchase

PRICING_FIELDS = ("feature", "customer", "credits_per_unit", "effective_from")


class FeatureCostInline(admin.TabularInline):
    """The rate card's versions, newest first. Versions are added, never edited."""

    model = FeatureCost
    fields = ("credits_per_unit", "effective_from", "customer", "note", "created_by", "created_at")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("-effective_from",)
    show_change_link = True
    verbose_name_plural = "credit costs (rate versions) — add a new version to change the price"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("customer", "created_by")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Feature)
class FeatureAdmin(AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("key", "name", "unit", "active", "current_cost", "allow_zero_quantity", "created_at")
    list_filter = ("active", "allow_zero_quantity")
    search_fields = ("key", "name")
    fields = ("key", "name", "unit", "allow_zero_quantity", "active", "created_at", "add_cost_link")
    readonly_fields = ("created_at", "add_cost_link")
    inlines = (FeatureCostInline,)

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("costs")

    @admin.display(description="credits per unit now")
    def current_cost(self, obj):
        now = timezone.now()
        card = [c for c in obj.costs.all() if c.customer_id is None and c.effective_from <= now]
        if not card:
            return "-"
        return max(card, key=lambda c: (c.effective_from, c.pk)).credits_per_unit

    @admin.display(description="rate card")
    def add_cost_link(self, obj):
        if obj.pk is None:
            return "Save the feature, then add its credit cost."
        url = reverse("admin:billing_featurecost_add") + f"?feature={obj.pk}"
        return format_html('<a class="addlink" href="{}">Add a credit cost version</a>', url)


@admin.register(FeatureCost)
class FeatureCostAdmin(AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("feature", "credits_per_unit", "effective_from", "customer_link", "note", "created_by",
                    "created_at")
    list_select_related = ("feature", "customer", "created_by")
    list_filter = ("feature", ("customer", admin.EmptyFieldListFilter))
    search_fields = ("feature__key", "customer__external_id", "note")
    date_hierarchy = "effective_from"
    raw_id_fields = ("customer",)
    fields = ("feature", "customer", "credits_per_unit", "effective_from", "note", "created_by", "created_at")

    def get_readonly_fields(self, request, obj=None):
        readonly = ["created_by", "created_at"]
        if obj is not None and UsageEvent.objects.filter(rate=obj).exists():
            # A version that priced usage is history: add a new version instead.
            readonly += list(PRICING_FIELDS)
        return readonly

    @admin.display(description="customer override", ordering="customer__external_id")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.external_id) if obj.customer_id else "rate card"

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


class PackDiscountTierInline(admin.TabularInline):
    model = PackDiscountTier
    extra = 0


@admin.register(CreditPack)
class CreditPackAdmin(AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("code", "name", "kind", "credits", "price", "currency", "validity_days", "priority", "active",
                    "tier_count", "sold")
    list_filter = ("kind", "active", "currency")
    search_fields = ("code", "name")
    readonly_fields = ("created_at",)
    inlines = (PackDiscountTierInline,)

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _tiers=Count("tiers", distinct=True), _sold=Count("purchases", distinct=True))

    @admin.display(description="volume tiers", ordering="_tiers")
    def tier_count(self, obj):
        return obj._tiers

    @admin.display(description="purchases", ordering="_sold")
    def sold(self, obj):
        return obj._sold


@admin.register(PackPurchase)
class PackPurchaseAdmin(AuditHistoryMixin, BillingModelAdmin):
    list_display = ("created_at", "customer_link", "pack", "quantity", "credits", "discount_percent",
                    "total_price", "currency", "grant_link", "purchased_by")
    list_select_related = ("customer", "pack", "purchased_by")
    list_filter = ("pack", "currency")
    search_fields = ("customer__external_id", "customer__name", "pack__code")
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    readonly_fields = ("customer", "wallet", "pack", "quantity", "credits", "list_price", "discount_percent",
                       "total_price", "currency", "grant", "idempotency_key", "purchased_by", "created_at")

    @admin.display(description="customer", ordering="customer__name")
    def customer_link(self, obj):
        return admin_link(obj.customer, obj.customer.name)

    @admin.display(description="grant")
    def grant_link(self, obj):
        return pk_link(CreditGrant, obj.grant_id, f"#{obj.grant_id}") if obj.grant_id else "-"

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if request.method == "POST":
            raise PermissionDenied
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False}
        return super().change_view(request, object_id, form_url, extra_context)

    def add_view(self, request, form_url="", extra_context=None):
        """Sell a pack: ``pack_purchase``, idempotent on the form's submission token."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = SellPackForm(request.POST, admin_site=self.admin_site)
            if form.is_valid():
                data = form.cleaned_data
                started = timezone.now()
                purchase = run_service(request, lambda: pack_purchase(
                    wallet=data["wallet"], pack=data["pack"], quantity=data["quantity"],
                    purchased_by=request.user, idempotency_key=f"admin:{data['token']}"))
                if purchase is not None and purchase.created_at < started:
                    messages.info(request, "This page was submitted before: nothing new was sold.")
                elif purchase is not None:
                    messages.success(request, f"Sold {purchase.quantity} × {purchase.pack.name} to "
                                              f"{purchase.customer.name}: {purchase.credits} credits for "
                                              f"{purchase.total_price} {purchase.currency}.")
                if purchase is not None:
                    return HttpResponseRedirect(reverse("admin:billing_packpurchase_change", args=[purchase.pk]))
        else:
            form = SellPackForm(initial={"wallet": request.GET.get("wallet")}, admin_site=self.admin_site)
        packs = [(pack, pack_price(pack=pack, quantity=1)[2]) for pack in CreditPack.objects.filter(active=True)]
        return render_form_page(self, request, form, title="Sell a credit pack", submit="Sell",
                                intro="Creates the pack's grant at once; volume discounts apply by quantity.",
                                extra={"packs": packs})
