"""The alerts back office: rules with their levels, state per wallet, the
notification log, webhook endpoints and deliveries (replay), auto top-up
settings and history (also on billing's wallet page), and finance's queue of
top-ups awaiting approval.

As everywhere in the admin, saves and actions call services; a BillingError
becomes an error message.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from alerts.models import (
    WEBHOOK_EVENT_TYPES,
    AlertLevel,
    AlertRule,
    AlertsProfile,
    AlertState,
    AutoTopUp,
    AutoTopUpRun,
    Notification,
    NotificationAttempt,
    PendingTopUpApproval,
    WebhookDelivery,
    WebhookEndpoint,
)
from alerts.services import notifications
from alerts.services.auto_top_up import auto_top_up_set
from alerts.services.rules import rule_changed
from billing.admin.base import CappedCountMixin
from billing.errors import BillingError
from billing.models import Wallet
from billing.services.grants import APPROVE_PERMISSION, grant_approve, grant_reject


def _link(obj, text=None):
    if obj is None:
        return "—"
    url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text or str(obj))


def _call_each(modeladmin, request, queryset, service, done: str) -> None:
    ok = 0
    for obj in queryset:
        try:
            service(obj)
            ok += 1
        except BillingError as exc:
            modeladmin.message_user(request, f"{obj}: {exc.message}", messages.ERROR)
    if ok:
        modeladmin.message_user(request, done.format(count=ok), messages.SUCCESS)


class RecentCustomerFilter(admin.SimpleListFilter):
    """Customers of the latest notifications (a bounded read, never a scan of the whole log);
    search finds any other customer by external id or name."""

    title = "customer"
    parameter_name = "customer"

    def lookups(self, request, model_admin):
        recent = model_admin.get_queryset(request).exclude(customer=None).order_by("-pk").values_list(
            "customer_id", "customer__external_id")[:500]
        return sorted(set(recent), key=lambda item: item[1])

    def queryset(self, request, queryset):
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(customer_id=int(value))
        return queryset


class ReadOnlyMixin:
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- Contacts and rules -------------------------------------------------------

@admin.register(AlertsProfile)
class AlertsProfileAdmin(admin.ModelAdmin):
    list_display = ("customer", "billing_email", "billing_phone", "technical_email", "account_owner")
    search_fields = ("customer__external_id", "customer__name", "billing_email", "technical_email")
    raw_id_fields = ("customer", "account_owner")
    list_select_related = ("customer", "account_owner")


class AlertLevelInline(admin.TabularInline):
    model = AlertLevel
    extra = 1
    fields = ("kind", "value", "severity")


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ("name", "scope", "customer", "segment", "active", "priority", "levels_summary", "channels",
                    "min_interval")
    list_filter = ("scope", "active")
    search_fields = ("name", "customer__external_id", "customer__name", "segment_value")
    raw_id_fields = ("customer",)
    inlines = (AlertLevelInline,)
    fieldsets = (
        (None, {"fields": ("name", "scope", "customer", "segment_key", "segment_value", "active", "priority"),
                "description": "Which rule applies to a wallet: its customer's own rule, else the first "
                               "matching segment rule (customer metadata key = value; the plan is the key "
                               "\"plan\"), else the first global rule; lower priority first."}),
        ("Thresholds", {"fields": ("period_days", "hysteresis_percent", "hysteresis_credits", "pause_when_depleted",
                                   "expiring_soon_days"),
                        "description": "Levels below: absolute credits, percent of the credits granted in the "
                                       "last period_days days, or days until depletion (7-day average burn)."}),
        ("Delivery", {"fields": ("min_interval", "email", "sms", "webhook", "notify_billing_contact",
                                 "notify_technical_contact", "notify_account_owner", "notify_finance")}),
    )

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("customer").prefetch_related("levels")

    @admin.display(description="segment")
    def segment(self, obj):
        return f"{obj.segment_key} = {obj.segment_value}" if obj.segment_key else "—"

    @admin.display(description="levels")
    def levels_summary(self, obj):
        return ", ".join(str(level) for level in obj.levels.all()) or "—"

    @admin.display(description="channels")
    def channels(self, obj):
        return ", ".join(name for name in ("email", "sms", "webhook") if getattr(obj, name)) or "—"

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        rule_changed(form.instance)


@admin.register(AlertState)
class AlertStateAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("wallet", "level", "rule", "status", "breach_seq", "threshold", "available_at_change",
                    "triggered_at", "recovered_at")
    list_filter = ("status", "level__rule", "level__severity")
    search_fields = ("wallet__customer__external_id", "wallet__customer__name")
    list_select_related = ("wallet", "wallet__customer", "level", "level__rule")

    @admin.display(description="rule")
    def rule(self, obj):
        return obj.level.rule


# --- Notifications and webhooks -----------------------------------------------

class AttemptInline(ReadOnlyMixin, admin.TabularInline):
    model = NotificationAttempt
    fields = ("attempted_at", "ok", "status_code", "latency_ms", "response_excerpt", "error", "retry_in_seconds")
    readonly_fields = fields
    extra = 0


@admin.action(description="Replay (send again with the same message id)")
def replay(modeladmin, request, queryset):
    _call_each(modeladmin, request, queryset,
               lambda n: notifications.notification_replay(notification_id=n.pk), "Queued {count} again.")


@admin.register(Notification)
class NotificationAdmin(CappedCountMixin, ReadOnlyMixin, admin.ModelAdmin):
    """The notification log: every notice, its channel, recipient and delivery state."""

    list_display = ("created_at", "event_type", "channel", "status", "severity", "customer", "recipient", "audience",
                    "attempts", "last_error")
    list_filter = ("channel", "status", "event_type", "severity", RecentCustomerFilter)
    search_fields = ("customer__external_id", "customer__name", "recipient", "subject", "message_id")
    list_select_related = ("customer",)
    inlines = (AttemptInline,)
    actions = (replay,)
    readonly_fields = ("event_type", "channel", "severity", "customer", "wallet", "rule", "level", "endpoint",
                       "recipient", "audience", "subject", "payload", "dedupe_key", "message_id", "status",
                       "attempts", "not_before", "next_attempt_at", "last_error", "sent_at", "created_at")

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and request.user.has_perm("alerts.change_notification")  # actions only


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(NotificationAdmin):
    list_display = ("created_at", "event_type", "endpoint", "message_id", "status", "customer", "attempts",
                    "next_attempt_at", "last_error")
    list_filter = ("status", "event_type", "endpoint", RecentCustomerFilter)
    list_select_related = ("customer", "endpoint")

    def get_queryset(self, request):
        return super().get_queryset(request).filter(channel=Notification.Channel.WEBHOOK)

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and request.user.has_perm("alerts.change_webhookdelivery")


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=500, assume_scheme="https")
    event_types = forms.MultipleChoiceField(choices=[(t, t) for t in WEBHOOK_EVENT_TYPES],
                                            widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "description", "customer", "event_types", "enabled")


@admin.action(description="Rotate the signing secret (old one keeps signing for 24 h)")
def rotate_secret(modeladmin, request, queryset):
    _call_each(modeladmin, request, queryset,
               lambda e: notifications.webhook_endpoint_rotate_secret(endpoint_id=e.pk), "Rotated {count} secret(s).")


@admin.action(description="Enable (reset the failure count)")
def enable_endpoints(modeladmin, request, queryset):
    _call_each(modeladmin, request, queryset,
               lambda e: notifications.webhook_endpoint_enable(endpoint_id=e.pk), "Enabled {count} endpoint(s).")


@admin.action(description="Disable")
def disable_endpoints(modeladmin, request, queryset):
    _call_each(modeladmin, request, queryset,
               lambda e: notifications.webhook_endpoint_disable(endpoint_id=e.pk, reason=f"Disabled by {request.user}."),
               "Disabled {count} endpoint(s).")


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ("url", "customer", "enabled", "consecutive_failures", "disabled_reason", "event_list")
    list_filter = ("enabled",)
    search_fields = ("url", "description", "customer__external_id")
    raw_id_fields = ("customer",)
    actions = (rotate_secret, enable_endpoints, disable_endpoints)
    readonly_fields = ("secret", "previous_secret_expires_at", "consecutive_failures", "disabled_at",
                       "disabled_reason", "deliveries_link")

    @admin.display(description="events")
    def event_list(self, obj):
        return ", ".join(obj.event_types)

    @admin.display(description="deliveries")
    def deliveries_link(self, obj):
        if obj.pk is None:
            return "—"
        url = reverse("admin:alerts_webhookdelivery_changelist") + f"?endpoint__id__exact={obj.pk}"
        return format_html('<a href="{}">Delivery log</a>', url)


# --- Auto top-up --------------------------------------------------------------

class AutoTopUpRunInline(ReadOnlyMixin, admin.TabularInline):
    model = AutoTopUpRun
    fk_name = "auto_top_up"
    fields = ("created_at", "breach_seq", "status", "detail", "available_at_breach", "quantity", "credits", "grant")
    readonly_fields = fields
    extra = 0
    ordering = ("-pk",)
    max_num = 0


@admin.register(AutoTopUp)
class AutoTopUpAdmin(admin.ModelAdmin):
    list_display = ("wallet", "enabled", "threshold", "pack", "mode", "target_balance", "cooldown",
                    "monthly_max_count", "monthly_max_credits", "consecutive_failures", "disabled_reason")
    list_filter = ("enabled", "mode", "require_approval")
    search_fields = ("wallet__customer__external_id", "wallet__customer__name")
    raw_id_fields = ("wallet", "pack")
    list_select_related = ("wallet", "wallet__customer", "pack")
    inlines = (AutoTopUpRunInline,)
    readonly_fields = ("consecutive_failures", "disabled_reason", "armed", "breach_seq")
    fields = ("wallet", "enabled", "threshold", "pack", "mode", "pack_quantity", "target_balance", "cooldown",
              "require_approval", "await_payment", "monthly_max_count", "monthly_max_credits",
              "max_consecutive_failures", *readonly_fields)

    def save_model(self, request, obj, form, change):
        values = {name: form.cleaned_data[name] for name in form.changed_data if name != "wallet"}
        if not change:
            values = {name: value for name, value in form.cleaned_data.items() if name != "wallet"}
        saved = auto_top_up_set(wallet=form.cleaned_data["wallet"] if not change else obj.wallet, **values)
        obj.pk = saved.pk


@admin.register(AutoTopUpRun)
class AutoTopUpRunAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("created_at", "wallet", "breach_seq", "status", "detail", "quantity", "credits", "grant_link")
    list_filter = ("status",)
    search_fields = ("wallet__customer__external_id", "wallet__customer__name", "idempotency_key")
    list_select_related = ("wallet", "wallet__customer", "grant")

    @admin.display(description="grant")
    def grant_link(self, obj):
        return _link(obj.grant)


@admin.action(description="Approve the top-up grant")
def approve_top_ups(modeladmin, request, queryset):
    _call_each(modeladmin, request, queryset, lambda run: grant_approve(grant_id=run.grant_id, user=request.user),
               "Approved {count} top-up(s).")


@admin.action(description="Reject the top-up grant")
def reject_top_ups(modeladmin, request, queryset):
    def reject(run):
        grant_reject(grant_id=run.grant_id, user=request.user, reason="Auto top-up rejected in the queue.")
        AutoTopUpRun.objects.filter(pk=run.pk, status=AutoTopUpRun.Status.PENDING_APPROVAL).update(
            status=AutoTopUpRun.Status.REJECTED, detail=f"Rejected by {request.user}.")

    _call_each(modeladmin, request, queryset, reject, "Rejected {count} top-up(s).")


@admin.register(PendingTopUpApproval)
class PendingTopUpApprovalAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """Finance's queue: auto top-ups whose grant waits for a second person."""

    list_display = ("created_at", "wallet", "credits", "quantity", "available_at_breach", "grant_link")
    search_fields = ("wallet__customer__external_id", "wallet__customer__name")
    list_select_related = ("wallet", "wallet__customer", "grant")
    actions = (approve_top_ups, reject_top_ups)

    def get_queryset(self, request):
        return super().get_queryset(request).filter(status=AutoTopUpRun.Status.PENDING_APPROVAL)

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and request.user.has_perm(APPROVE_PERMISSION)

    @admin.display(description="grant")
    def grant_link(self, obj):
        return _link(obj.grant)


# --- On billing's wallet page ---------------------------------------------------

class WalletAutoTopUpInline(ReadOnlyMixin, admin.StackedInline):
    model = AutoTopUp
    fields = ("settings_link", "enabled", "threshold", "pack", "mode", "target_balance", "cooldown",
              "monthly_max_count", "monthly_max_credits", "consecutive_failures", "disabled_reason")
    readonly_fields = fields
    verbose_name_plural = "auto top-up (edit it on its own page)"

    @admin.display(description="settings")
    def settings_link(self, obj):
        return _link(obj, "Edit auto top-up")


class WalletTopUpHistoryInline(ReadOnlyMixin, admin.TabularInline):
    model = AutoTopUpRun
    fk_name = "wallet"
    fields = ("created_at", "breach_seq", "status", "detail", "credits", "grant")
    readonly_fields = fields
    extra = 0
    ordering = ("-pk",)
    verbose_name_plural = "auto top-up history"


class WalletAlertStateInline(ReadOnlyMixin, admin.TabularInline):
    model = AlertState
    fields = ("level", "status", "breach_seq", "threshold", "triggered_at", "recovered_at")
    readonly_fields = fields
    extra = 0
    verbose_name_plural = "alert state"


def _extend_wallet_admin() -> None:
    """billing's wallet page shows the wallet's alert state and auto top-up
    (billing cannot import alerts, so alerts adds its inlines here)."""
    wallet_admin = admin.site._registry.get(Wallet)
    if wallet_admin is None:
        return
    extra = (WalletAutoTopUpInline, WalletTopUpHistoryInline, WalletAlertStateInline)
    wallet_admin.inlines = (*[i for i in wallet_admin.inlines if i not in extra], *extra)


_extend_wallet_admin()
