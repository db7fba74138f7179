"""Credit grants and adjustments: the grant-credits page, approve / reject
(never your own), void, extend expiry, and the pending-approvals queue."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.admin.base import (
    AuditHistoryMixin,
    BillingModelAdmin,
    Operation,
    OperationsMixin,
    ServiceOnlyChangeMixin,
    admin_link,
    pk_link,
    render_form_page,
    run_service,
    service_add_view,
)
from billing.admin.revenue_panels import revenue_schedule_context
from billing.forms import (
    AdjustmentRequestForm,
    ExtendExpiryForm,
    GrantCreditsForm,
    OptionalReasonForm,
    ReasonForm,
)
from billing.models import Adjustment, CreditGrant
from billing.services.grants import (
    APPROVE_PERMISSION,
    adjustment_approve,
    adjustment_reject,
    adjustment_request,
    grant_approve,
    grant_create,
    grant_extend_expiry,
    grant_reject,
    grant_void,
)

EXPIRING_SOON_DAYS = 14
LIVE_GRANT_STATUSES = (
    CreditGrant.Status.ACTIVE, CreditGrant.Status.PENDING_APPROVAL, CreditGrant.Status.PENDING_PAYMENT,
)


class ApprovalQueueFilter(admin.SimpleListFilter):
    """The approvals queue: pending requests someone else asked for (the ones I may decide)."""

    title = "approval queue"
    parameter_name = "approval"

    def lookups(self, request, model_admin):
        return [("others", "Waiting for me (requested by others)"), ("mine", "My pending requests"),
                ("all", "All pending")]

    def queryset(self, request, queryset):
        pending = queryset.filter(status="pending_approval")
        if self.value() == "others":
            return pending.exclude(requested_by=request.user)
        if self.value() == "mine":
            return pending.filter(requested_by=request.user)
        if self.value() == "all":
            return pending
        return queryset


class ExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiring"

    def lookups(self, request, model_admin):
        return [("14d", f"Active, expiring in {EXPIRING_SOON_DAYS} days"), ("past", "Expiry passed"),
                ("never", "Never expires")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "14d":
            return queryset.filter(status=CreditGrant.Status.ACTIVE, remaining__gt=0, expires_at__gt=now,
                                   expires_at__lte=now + timedelta(days=EXPIRING_SOON_DAYS))
        if self.value() == "past":
            return queryset.filter(expires_at__lte=now)
        if self.value() == "never":
            return queryset.filter(expires_at__isnull=True)
        return queryset


def _approve_grant(request, grant, data):
    grant_approve(grant_id=grant.pk, user=request.user)


def _reject_grant(request, grant, data):
    grant_reject(grant_id=grant.pk, user=request.user, reason=data.get("reason", ""))


def _void_grant(request, grant, data):
    grant_void(grant_id=grant.pk, actor=request.user, reason=data["reason"])


def _extend_grant(request, grant, data):
    grant_extend_expiry(grant_id=grant.pk, expires_at=data["expires_at"], actor=request.user,
                        reason=data.get("reason", ""))


def _pending(obj, user) -> bool:
    return obj.status == "pending_approval"


def _pending_for_someone_else(obj, user) -> bool:
    return obj.status == "pending_approval" and obj.requested_by_id != user.pk


@admin.register(CreditGrant)
class CreditGrantAdmin(ServiceOnlyChangeMixin, OperationsMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("id", "customer", "wallet_name", "kind", "source", "status", "original_amount", "remaining",
                    "priority", "effective_at", "expires_at", "requested_by", "approved_by")
    list_display_links = ("id",)
    list_select_related = ("wallet__customer", "requested_by", "approved_by")
    list_filter = (ApprovalQueueFilter, "status", "kind", "source", ExpiryFilter, "created_at", "feature")
    search_fields = ("wallet__customer__external_id", "wallet__customer__name", "reason")
    search_help_text = "Customer external id or name, or words of the reason."
    ordering = ("-created_at", "-id")
    readonly_fields = ("wallet_link", "kind", "source", "status", "original_amount", "remaining",
                       "per_unit_cost_basis", "price_paid", "currency", "effective_at", "expires_at", "priority",
                       "feature", "reason", "idempotency_key", "requested_by", "approved_by", "decided_at",
                       "created_at", "ledger_link")
    fieldsets = (
        (None, {"fields": ("wallet_link", "kind", "source", "status", "feature", "reason")}),
        ("Credits", {"fields": ("original_amount", "remaining", "priority", "effective_at", "expires_at",
                                "ledger_link")}),
        ("Money", {"fields": ("price_paid", "currency", "per_unit_cost_basis")}),
        ("Approval", {"fields": ("requested_by", "approved_by", "decided_at", "idempotency_key", "created_at")}),
    )
    operations = (
        Operation("approve", "Approve", "approve", _approve_grant, "Approved {count} grant(s).",
                  available=_pending_for_someone_else,
                  help="The credits become usable at once. You cannot approve your own request."),
        Operation("reject", "Reject", "approve", _reject_grant, "Rejected {count} grant(s).",
                  form_class=OptionalReasonForm, available=_pending),
        Operation("void", "Void", "change", _void_grant, "Voided {count} grant(s).", form_class=ReasonForm,
                  available=lambda g, user: g.status in (*LIVE_GRANT_STATUSES, CreditGrant.Status.DEPLETED),
                  help="The remaining credits leave the wallet through a void entry. This cannot be undone."),
        Operation("extend", "Extend expiry", "change", _extend_grant, "Extended {count} grant(s).",
                  form_class=ExtendExpiryForm,
                  available=lambda g, user: g.status in LIVE_GRANT_STATUSES and g.expires_at is not None,
                  help="The change is written to the ledger as an “expiry changed” entry."),
    )

    def has_approve_permission(self, request, obj=None) -> bool:
        return request.user.has_perm(APPROVE_PERMISSION)

    @admin.display(description="customer", ordering="wallet__customer__name")
    def customer(self, obj):
        return admin_link(obj.wallet.customer, obj.wallet.customer.name)

    @admin.display(description="wallet", ordering="wallet__name")
    def wallet_name(self, obj):
        return obj.wallet.name

    @admin.display(description="wallet")
    def wallet_link(self, obj):
        return admin_link(obj.wallet)

    @admin.display(description="ledger")
    def ledger_link(self, obj):
        url = reverse("admin:billing_ledgerentry_changelist") + f"?grant__id__exact={obj.pk}"
        return format_html('<a href="{}">Entries of this grant</a>', url)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """A paid grant's page shows its revenue schedule to those who may read revenue."""
        extra_context = dict(extra_context or {})
        grant = self.get_object(request, object_id)
        if grant is not None:
            extra_context.update(revenue_schedule_context(request, grant))
        return super().change_view(request, object_id, form_url, extra_context)

    def add_view(self, request, form_url="", extra_context=None):
        """Grant credits: the form calls ``grant_create`` (big unpaid grants wait for approval)."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = GrantCreditsForm(request.POST, admin_site=self.admin_site)
            if form.is_valid():
                data = form.cleaned_data
                started = timezone.now()
                grant = run_service(request, lambda: grant_create(
                    wallet=data["wallet"], kind=data["kind"], amount=data["amount"],
                    source=CreditGrant.Source.MANUAL, expires_at=data["expires_at"],
                    effective_at=data["effective_at"], priority=data["priority"], price_paid=data["price_paid"],
                    feature=data["feature"], reason=data["reason"], requested_by=request.user,
                    idempotency_key=f"admin:{data['token']}",
                ))
                if grant is not None:
                    if grant.created_at < started:
                        messages.info(request, "This page was submitted before: no new credits were granted.")
                    elif grant.status == CreditGrant.Status.PENDING_APPROVAL:
                        messages.warning(request, f"{grant} waits for approval by another finance approver.")
                    else:
                        messages.success(request, f"Granted {grant.original_amount} credits to {grant.wallet}.")
                    return HttpResponseRedirect(reverse("admin:billing_creditgrant_change", args=[grant.pk]))
        else:
            form = GrantCreditsForm(initial={"wallet": request.GET.get("wallet")}, admin_site=self.admin_site)
        return render_form_page(self, request, form, title="Grant credits", submit="Grant credits",
                                intro="Grants above the approval threshold wait for a second person.")


@admin.register(Adjustment)
class AdjustmentAdmin(ServiceOnlyChangeMixin, OperationsMixin, AuditHistoryMixin, BillingModelAdmin):
    list_display = ("id", "customer", "wallet_name", "amount", "status", "reason", "requested_by", "approved_by",
                    "created_at", "grant_link")
    list_select_related = ("wallet__customer", "requested_by", "approved_by")
    list_filter = (ApprovalQueueFilter, "status")
    search_fields = ("wallet__customer__external_id", "wallet__customer__name", "reason")
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    readonly_fields = ("wallet", "amount", "reason", "status", "grant", "requested_by", "approved_by",
                       "decided_at", "created_at")
    operations = (
        Operation("approve", "Approve", "approve",
                  lambda request, adj, data: adjustment_approve(adjustment_id=adj.pk, user=request.user),
                  "Applied {count} adjustment(s).", available=_pending_for_someone_else,
                  help="The adjustment is applied to the ledger at once. You cannot approve your own request."),
        Operation("reject", "Reject", "approve",
                  lambda request, adj, data: adjustment_reject(adjustment_id=adj.pk, user=request.user,
                                                               reason=data.get("reason", "")),
                  "Rejected {count} adjustment(s).", form_class=OptionalReasonForm, available=_pending),
    )

    def has_approve_permission(self, request, obj=None) -> bool:
        return request.user.has_perm(APPROVE_PERMISSION)

    @admin.display(description="customer", ordering="wallet__customer__name")
    def customer(self, obj):
        return admin_link(obj.wallet.customer, obj.wallet.customer.name)

    @admin.display(description="wallet", ordering="wallet__name")
    def wallet_name(self, obj):
        return obj.wallet.name

    @admin.display(description="grant")
    def grant_link(self, obj):
        return pk_link(CreditGrant, obj.grant_id, f"#{obj.grant_id}") if obj.grant_id else "-"

    def add_view(self, request, form_url="", extra_context=None):
        """Request an adjustment: ``adjustment_request``; another approver applies it."""
        return service_add_view(
            self, request, form_class=AdjustmentRequestForm, initial_field="wallet",
            create=lambda data: adjustment_request(
                wallet=data["wallet"], amount=data["amount"], reason=data["reason"], requested_by=request.user),
            success=lambda adjustment: f"{adjustment} requested; another approver must approve it.",
            title="Request an adjustment", submit="Request adjustment",
            intro="Adjustments always wait for a second person's approval.")
