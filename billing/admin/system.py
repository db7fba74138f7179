"""API keys (created and revoked through ``billing.services.api_keys``), the
audit trail, and the plumbing rows (outbox, jobs, idempotency records): read-only."""

from __future__ import annotations

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin import DateFieldListFilter
from django.contrib.auth import get_user_model
from django.utils.html import format_html_join

from billing.admin.base import (
    AuditedAdminMixin,
    AuditHistoryMixin,
    BillingModelAdmin,
    CappedCountMixin,
    Operation,
    OperationsMixin,
    ReadOnlyAdminMixin,
)
from billing.forms import ApiKeyForm
from billing.models import ApiKey, AuditEvent, IdempotencyRecord, JobRun, OutboxEvent
from billing.services.api_keys import api_key_create, api_key_revoke

AUDITED_APPS = {"billing", "crm", "alerts"}


@admin.register(ApiKey)
class ApiKeyAdmin(OperationsMixin, AuditedAdminMixin, AuditHistoryMixin, BillingModelAdmin):
    form = ApiKeyForm
    list_display = ("name", "prefix", "scope_list", "active", "created_by", "created_at", "last_used_at",
                    "revoked_at")
    list_select_related = ("created_by",)
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix")
    ordering = ("-created_at", "-id")
    audit_adds = False  # api_key_create records its own audit event
    operations = (
        Operation("revoke", "Revoke", "change",
                  lambda request, key, data: api_key_revoke(api_key_id=key.pk, actor=request.user),
                  "Revoked {count} API key(s).", available=lambda key, user: key.revoked_at is None,
                  help="Requests with this key are refused from now on. This cannot be undone."),
    )

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("prefix", "created_by", "created_at", "last_used_at", "revoked_at")

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("name", "scopes")
        return ("name", "scopes", "prefix", "created_by", "created_at", "last_used_at", "revoked_at")

    @admin.display(description="scopes")
    def scope_list(self, obj):
        return ", ".join(obj.scopes or [])

    @admin.display(description="active", boolean=True)
    def active(self, obj):
        return obj.revoked_at is None

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        api_key, raw_key = api_key_create(name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"],
                                          created_by=request.user)
        obj.pk, obj.prefix, obj.created_at = api_key.pk, api_key.prefix, api_key.created_at
        obj._state.adding = False
        messages.warning(request, f"The new key is {raw_key} — copy it now: it is shown only this once.")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        api_key = self.get_object(request, object_id)
        if api_key is not None:
            extra_context["object_buttons"] = self.operation_buttons(request, api_key)
        return super().change_view(request, object_id, form_url, extra_context)


class ObjectTypeFilter(admin.SimpleListFilter):
    """Choices from the installed models, not a DISTINCT over the whole audit table."""

    title = "object type"
    parameter_name = "object_type"

    def lookups(self, request, model_admin):
        return [(model._meta.label_lower, model._meta.verbose_name) for model in apps.get_models()
                if model._meta.app_label in AUDITED_APPS]

    def queryset(self, request, queryset):
        return queryset.filter(object_type=self.value()) if self.value() else queryset


class ActorFilter(admin.SimpleListFilter):
    """Staff users as choices (a small table), not a DISTINCT over the audit table."""

    title = "actor"
    parameter_name = "actor"

    def lookups(self, request, model_admin):
        staff = get_user_model().objects.filter(is_staff=True).order_by("username")
        return [(str(user.pk), user.get_username()) for user in staff] + [("none", "No staff user (API, jobs)")]

    def queryset(self, request, queryset):
        if self.value() == "none":
            return queryset.filter(actor__isnull=True)
        if self.value() and self.value().isdigit():
            return queryset.filter(actor_id=int(self.value()))
        return queryset


@admin.register(AuditEvent)
class AuditEventAdmin(CappedCountMixin, ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("created_at", "actor_name", "action", "object_type", "object_id", "object_repr",
                    "change_summary")
    list_select_related = ("actor",)
    list_filter = (ObjectTypeFilter, ActorFilter, ("created_at", DateFieldListFilter))
    search_fields = ("object_id__exact", "action__exact", "actor_label")
    search_help_text = "An exact object id or action (e.g. grant.void), or part of an actor label."
    ordering = ("-created_at", "-id")
    fields = ("created_at", "actor", "actor_label", "action", "object_type", "object_id", "object_repr", "changes")

    @admin.display(description="actor", ordering="actor__username")
    def actor_name(self, obj):
        return obj.actor.get_username() if obj.actor_id else (obj.actor_label or "system")

    @admin.display(description="changes")
    def change_summary(self, obj):
        return "; ".join(f"{k}: {v}" for k, v in (obj.changes or {}).items())[:300]


@admin.register(OutboxEvent)
class OutboxEventAdmin(CappedCountMixin, ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("created_at", "topic", "dispatched_at")
    list_filter = (("dispatched_at", admin.EmptyFieldListFilter),)
    search_fields = ("topic__exact",)
    search_help_text = "An exact topic, e.g. grant.expired."
    ordering = ("-id",)
    fields = ("topic", "payload", "created_at", "dispatched_at")


@admin.register(JobRun)
class JobRunAdmin(ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("name", "status", "progress", "started_at", "finished_at")
    list_filter = ("name", "status")
    ordering = ("-started_at", "-id")
    fields = ("name", "status", "progress", "started_at", "finished_at", "details")

    @admin.display(description="details")
    def details(self, obj):
        # Inputs such as a bulk grant's customer ids can be long: show their size only.
        shown = {key: (f"{len(value)} items" if isinstance(value, list) and len(value) > 20 else value)
                 for key, value in (obj.detail or {}).items()}
        return format_html_join("", "<div><strong>{}</strong>: {}</div>", shown.items()) or "-"

    @admin.display(description="progress")
    def progress(self, obj):
        if not obj.total:
            return f"{obj.done}"
        return f"{obj.done} / {obj.total} ({obj.done * 100 // obj.total}%)"


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(CappedCountMixin, ReadOnlyAdminMixin, BillingModelAdmin):
    list_display = ("created_at", "scope", "key", "status_code")
    search_fields = ("key__exact",)
    ordering = ("-id",)
    fields = ("scope", "key", "request_hash", "status_code", "response", "created_at")
