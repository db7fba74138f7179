"""Building blocks shared by the billing admin: the capped paginator for big
append-only tables, the audit mixin, service-call translation and permission checks.

Admin code never writes credit state itself: it validates a form and calls one
service from ``billing.services``; a ``BillingError`` becomes an error message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import ShowFacets
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import models
from django.http import HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from billing.errors import BillingError
from billing.models import AuditEvent
from billing.services.audit import audit_record

AUDIT_HISTORY_LIMIT = 50


class CappedCountPaginator(Paginator):
    """Counts at most a few pages beyond the requested one, never the whole table.

    ``SELECT COUNT(*) FROM (… LIMIT n)`` reads at most ``n`` rows, so a ledger of
    millions of rows lists as fast as an empty one. ``count_is_capped`` tells the
    template to say "more than N" instead of pretending to know the total.
    """

    lookahead_pages = 10

    def __init__(self, object_list, per_page, orphans=0, allow_empty_first_page=True, *, page_hint: int = 1):
        super().__init__(object_list, per_page, orphans=orphans, allow_empty_first_page=allow_empty_first_page)
        self.page_hint = max(page_hint, 1)
        self.count_is_capped = False

    @cached_property
    def count(self) -> int:
        cap = (self.page_hint + self.lookahead_pages) * self.per_page + 1
        counted = self.object_list[:cap].count()
        self.count_is_capped = counted >= cap
        return counted


class CappedCountMixin:
    """For tables that grow without bound: no full COUNT(*), no facet counts."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    show_facets = ShowFacets.NEVER

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        try:
            page_hint = int(request.GET.get("p", 1))
        except ValueError:
            page_hint = 1
        return self.paginator(queryset, per_page, orphans, allow_empty_first_page, page_hint=page_hint)


class ReadOnlyAdminMixin:
    """Nobody adds, changes or deletes these rows in the admin, superusers included."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class NoDeleteMixin:
    """Billing rows are corrected by new rows, never deleted (superusers included)."""

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def require_perm(request, *perms: str) -> None:
    """Refuse with 403 unless the user has every one of ``perms``."""
    if not request.user.has_perms(perms):
        raise PermissionDenied


def run_service(request, call: Callable[[], object]):
    """Call a service; a ``BillingError`` becomes an admin error message. Returns
    the service's result, or None when it refused."""
    try:
        return call()
    except BillingError as error:
        messages.error(request, error.message)
        return None


def admin_link(obj: models.Model | None, label: str | None = None) -> str:
    """A link to ``obj``'s admin change page (or '-')."""
    if obj is None:
        return "-"
    return pk_link(type(obj), obj.pk, label if label is not None else str(obj))


def pk_link(model: type[models.Model], pk, label: str) -> str:
    """A link to a row's change page from its id alone (no query)."""
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[pk])
    return format_html('<a href="{}">{}</a>', url, label)


def _short(value) -> str:
    if isinstance(value, models.Model):
        return f"{value} (#{value.pk})"
    if isinstance(value, (list, tuple, set, models.QuerySet)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def form_changes(form) -> dict[str, str]:
    """``{field: "old → new"}`` for each field the admin form changed."""
    changes = {}
    for name in form.changed_data:
        old = form.initial.get(name)
        field = form.fields.get(name)
        if isinstance(field, forms.ModelChoiceField) and old is not None and not isinstance(old, models.Model):
            old = field.queryset.filter(pk=old).first() or old
        new = form.cleaned_data.get(name)
        if old == new or _short(old) == _short(new):
            continue  # e.g. a JSON textarea re-posting the same value
        changes[name] = f"{_short(old)} → {_short(new)}"
    return changes


def formset_changes(formsets) -> dict[str, str]:
    changes = {}
    for formset in formsets:
        parts = [f"added {obj}" for obj in getattr(formset, "new_objects", [])]
        parts += [f"changed {obj} ({', '.join(fields)})" for obj, fields in getattr(formset, "changed_objects", [])]
        parts += [f"deleted {obj}" for obj in getattr(formset, "deleted_objects", [])]
        if parts:
            changes[formset.model._meta.verbose_name_plural.replace(" ", "_")] = "; ".join(parts)[:2000]
    return changes


class AuditedAdminMixin:
    """Every admin add or change writes an AuditEvent with the changed fields
    (old → new), in the admin's own transaction. Adds done by a service (which
    audits itself) set ``audit_adds = False``."""

    audit_adds = True

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        if not change and not self.audit_adds:
            return
        changes = form_changes(form) if change else {
            name: _short(value) for name, value in form.cleaned_data.items() if value not in (None, "", [])
        }
        changes.update(formset_changes(formsets))
        if change and not changes:
            return
        audit_record(
            actor=request.user, action=f"{form.instance._meta.model_name}.admin_{'change' if change else 'add'}",
            obj=form.instance, changes=changes,
        )


class AuditHistoryMixin:
    """Shows the object's audit trail (newest first) on its change page."""

    def audit_history(self, obj) -> list[AuditEvent]:
        return list(
            AuditEvent.objects.filter(object_type=obj._meta.label_lower, object_id=str(obj.pk))
            .select_related("actor")
            .order_by("-created_at", "-pk")[:AUDIT_HISTORY_LIMIT]
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        obj = self.get_object(request, object_id)
        if (obj is not None and self.has_view_or_change_permission(request, obj)
                and request.user.has_perm("billing.view_auditevent")):
            extra_context.setdefault("audit_events", self.audit_history(obj))
        return super().change_view(request, object_id, form_url, extra_context)


class BillingModelAdmin(NoDeleteMixin, admin.ModelAdmin):
    """Base for every billing ModelAdmin."""

    list_per_page = 50


@dataclass(frozen=True)
class Operation:
    """One finance operation on a row (void, approve …), offered as a button on
    the change page and as a changelist action over the selected rows.

    ``permission`` names a ``has_<permission>_permission`` method of the admin;
    ``apply(request, obj, cleaned_data)`` calls one service and may raise
    ``BillingError``; ``available(obj, user)`` decides whether the button shows
    (the service still decides whether the operation is allowed).
    """

    name: str
    label: str
    permission: str
    apply: Callable
    done: str
    form_class: type[forms.Form] = forms.Form
    available: Callable = lambda obj, user: True
    help: str = ""


class OperationsMixin:
    """Per-object operation pages (``<id>/<operation>/``) and matching actions."""

    operations: tuple[Operation, ...] = ()
    operation_template = "admin/billing/operation_form.html"

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        custom = [
            path(f"<path:object_id>/{op.name}/", self.admin_site.admin_view(self._operation_view(op)),
                 name=f"%s_%s_{op.name}" % info)
            for op in self.operations
        ]
        return custom + super().get_urls()

    def get_actions(self, request):
        actions = super().get_actions(request)
        for op in self.operations:
            if self._may(request, op):
                name = f"{op.name}_selected"
                actions[name] = (self._operation_action(op), name, f"{op.label} selected %(verbose_name_plural)s")
        return actions

    def _may(self, request, op: Operation) -> bool:
        return getattr(self, f"has_{op.permission}_permission")(request)

    def operation_buttons(self, request, obj) -> list[dict]:
        info = self.opts.app_label, self.opts.model_name
        return [
            {"label": op.label, "url": reverse(f"admin:%s_%s_{op.name}" % info, args=[obj.pk])}
            for op in self.operations if op.available(obj, request.user) and self._may(request, op)
        ]

    def _apply(self, request, op: Operation, objs, data) -> int:
        done = 0
        for obj in objs:
            try:
                op.apply(request, obj, data)
            except BillingError as error:
                messages.error(request, f"{obj}: {error.message}")
            else:
                done += 1
        if done:
            messages.success(request, op.done.format(count=done))
        return done

    def _operation_view(self, op: Operation):
        def view(request, object_id):
            obj = self.get_object(request, object_id)
            if obj is None:
                return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
            if not self._may(request, op):
                raise PermissionDenied
            change_url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj.pk])
            form = op.form_class(request.POST) if request.method == "POST" else op.form_class()
            if request.method == "POST" and form.is_valid():
                self._apply(request, op, [obj], form.cleaned_data)
                return HttpResponseRedirect(change_url)
            return self._render_operation(request, op, form, objs=[obj], change_url=change_url)

        view.__name__ = f"{op.name}_view"
        return view

    def _operation_action(self, op: Operation):
        def action(modeladmin, request, queryset):
            if not self._may(request, op):
                raise PermissionDenied
            if op.form_class is forms.Form:
                self._apply(request, op, queryset, {})
                return None
            form = op.form_class(request.POST) if "apply" in request.POST else op.form_class()
            if "apply" in request.POST and form.is_valid():
                self._apply(request, op, queryset, form.cleaned_data)
                return None
            return self._render_operation(request, op, form, objs=list(queryset), action=f"{op.name}_selected")

        action.__name__ = f"{op.name}_selected"
        return action

    def _render_operation(self, request, op: Operation, form, *, objs, change_url=None, action=None):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{op.label}: {objs[0] if len(objs) == 1 else f'{len(objs)} {self.opts.verbose_name_plural}'}",
            "operation": op,
            "form": form,
            "objects": objs,
            "action": action,
            "change_url": change_url,
            "media": self.media + form.media,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, self.operation_template, context)


def render_form_page(model_admin, request, form, *, title: str, submit: str, intro: str = "", extra=None):
    """An admin-styled page holding one form (the service-backed add pages)."""
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": title,
        "form": form,
        "submit_label": submit,
        "intro": intro,
        "media": model_admin.media + form.media,
        "add": True,
        **(extra or {}),
    }
    return TemplateResponse(request, "admin/billing/form_page.html", context)


def service_add_view(model_admin, request, *, form_class, initial_field: str, create: Callable[[dict], object],
                     success: Callable[[object], str], title: str, submit: str, intro: str = ""):
    """An add page that is one service call: ``form_class`` (``initial_field``
    prefilled from the query string), its cleaned data given to ``create``
    through ``run_service``; when that returns the new row, the ``success(row)``
    message and the row's change page. 403 without the add permission."""
    if not model_admin.has_add_permission(request):
        raise PermissionDenied
    if request.method == "POST":
        form = form_class(request.POST, admin_site=model_admin.admin_site)
        if form.is_valid():
            data = form.cleaned_data
            obj = run_service(request, lambda: create(data))
            if obj is not None:
                messages.success(request, success(obj))
                opts = model_admin.opts
                return HttpResponseRedirect(reverse(f"admin:{opts.app_label}_{opts.model_name}_change",
                                                    args=[obj.pk]))
    else:
        form = form_class(initial={initial_field: request.GET.get(initial_field)}, admin_site=model_admin.admin_site)
    return render_form_page(model_admin, request, form, title=title, submit=submit, intro=intro)


class ServiceOnlyChangeMixin:
    """A change page that shows the object's operation buttons and never saves
    the form: rows like grants and invoices change only through services, and a
    plain save would write stale balances or statuses over their work."""

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        obj = self.get_object(request, object_id)
        if obj is not None:
            extra_context["object_buttons"] = self.operation_buttons(request, obj)
        extra_context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        if request.method == "POST":
            raise PermissionDenied
        return super().change_view(request, object_id, form_url, extra_context)


class ReadOnlyInline(admin.TabularInline):
    """Rows shown on their parent's page that only services write."""

    extra = 0
    can_delete = False

    def get_readonly_fields(self, request, obj=None):
        return self.fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class DocumentViewsMixin:
    """An HTML view and a PDF download of a document row (invoice, credit
    note), for whoever may see the row. Set ``document_url_name`` (the admin
    URL names are ``<it>_html`` and ``<it>_pdf``), ``render_document_html`` and
    ``render_document_pdf`` (staticmethods taking the row); the PDF is named
    after ``document_filename`` (the row's number). Add ``document_urls()`` to
    ``get_urls`` and ``documents`` to the readonly fields."""

    document_url_name: str

    def document_filename(self, obj) -> str:
        return obj.number

    @admin.display(description="documents")
    def documents(self, obj):
        return format_html('<a href="{}">View</a> · <a href="{}">Download PDF</a>',
                           reverse(f"admin:{self.document_url_name}_html", args=[obj.pk]),
                           reverse(f"admin:{self.document_url_name}_pdf", args=[obj.pk]))

    def document_urls(self) -> list:
        return [
            path("<path:object_id>/html/", self.admin_site.admin_view(self.html_view),
                 name=f"{self.document_url_name}_html"),
            path("<path:object_id>/pdf/", self.admin_site.admin_view(self.pdf_view),
                 name=f"{self.document_url_name}_pdf"),
        ]

    def _viewable(self, request, object_id):
        obj = self.get_object(request, object_id)
        if obj is None or not self.has_view_or_change_permission(request, obj):
            raise PermissionDenied
        return obj

    def html_view(self, request, object_id):
        return HttpResponse(self.render_document_html(self._viewable(request, object_id)))

    def pdf_view(self, request, object_id):
        obj = self._viewable(request, object_id)
        response = HttpResponse(self.render_document_pdf(obj), content_type="application/pdf")
        response["Content-Disposition"] = f'attachment; filename="{self.document_filename(obj)}.pdf"'
        return response
