"""Team spending limits: the inline on the wallet page (limit, spent and left this
month) that finance edits, and read-only lists of limits and monthly counters.

The inline's rows are saved through ``billing.services.team_limits`` (which
lock the wallet, keep ``Wallet.has_team_limits`` and audit), never by the formset.
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.db.models import Prefetch
from django.utils import timezone

from billing.admin.base import BillingModelAdmin, CappedCountMixin, ReadOnlyAdminMixin, admin_link
from billing.models import TeamSpend, TeamSpendingLimit
from billing.numbers import ZERO
from billing.services.team_limits import MAX_TEAM_LENGTH, period_start, team_limit_remove, team_limit_set


class TeamSpendingLimitForm(forms.ModelForm):
    class Meta:
        model = TeamSpendingLimit
        fields = ("wallet", "team", "monthly_limit")

    def clean_team(self):
        team = (self.cleaned_data.get("team") or "").strip()
        if not team or len(team) > MAX_TEAM_LENGTH:
            raise forms.ValidationError(f"Give the team as usage sends it in properties.team (1 to "
                                        f"{MAX_TEAM_LENGTH} characters).")
        return team

    def clean_monthly_limit(self):
        value = self.cleaned_data.get("monthly_limit")
        if value is not None and value < 0:
            raise forms.ValidationError("A limit is 0 or more credits.")
        return value


def _this_month(limit: TeamSpendingLimit):
    start = period_start(limit.wallet.customer.timezone, timezone.now())
    return next((s.spent for s in limit.spends.all() if s.period_start == start), ZERO)


class TeamSpendingLimitInline(admin.TabularInline):
    """On the wallet page: a pooled wallet's teams, what each may spend per month,
    and what it has spent this month."""

    model = TeamSpendingLimit
    form = TeamSpendingLimitForm
    fields = ("team", "monthly_limit", "spent_this_month", "left_this_month")
    readonly_fields = ("spent_this_month", "left_this_month")
    extra = 0
    verbose_name_plural = ("team spending limits — credits per calendar month in the customer's time zone, "
                           "for usage whose properties.team names the team")

    def get_queryset(self, request):
        recent = timezone.now().date() - timedelta(days=45)
        return super().get_queryset(request).select_related("wallet__customer").prefetch_related(
            Prefetch("spends", queryset=TeamSpend.objects.filter(period_start__gte=recent)))

    @admin.display(description="spent this month")
    def spent_this_month(self, obj):
        return "-" if obj.pk is None else _this_month(obj)

    @admin.display(description="left this month")
    def left_this_month(self, obj):
        return "-" if obj.pk is None else max(obj.monthly_limit - _this_month(obj), ZERO)


def save_team_limits(request, wallet, formset) -> None:
    """Apply the inline's rows through the services; record what changed on the
    formset the way ``formset.save()`` would (for the wallet's change message)."""
    formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
    deleted = set(formset.deleted_forms)
    for inline_form in deleted:
        if inline_form.instance.pk is not None:
            team_limit_remove(team_limit_id=inline_form.instance.pk, actor=request.user)
            formset.deleted_objects.append(inline_form.instance)
    for inline_form in formset.forms:
        if inline_form in deleted or not inline_form.has_changed():
            continue
        instance, data = inline_form.instance, inline_form.cleaned_data
        renamed = instance.pk is not None and "team" in inline_form.changed_data
        if renamed:
            # A new team name is a new limit: the old team is no longer capped.
            team_limit_remove(team_limit_id=instance.pk, actor=request.user)
            formset.deleted_objects.append(TeamSpendingLimit(pk=instance.pk, team=inline_form.initial.get("team"),
                                                             monthly_limit=inline_form.initial.get("monthly_limit")))
        limit = team_limit_set(wallet_id=wallet.pk, team=data["team"], monthly_limit=data["monthly_limit"],
                               actor=request.user)
        if instance.pk is None or renamed:
            formset.new_objects.append(limit)
        else:
            formset.changed_objects.append((limit, inline_form.changed_data))


@admin.register(TeamSpendingLimit)
class TeamSpendingLimitAdmin(CappedCountMixin, BillingModelAdmin):
    """Every team limit. Added and changed through ``team_limit_set`` (here or on
    the wallet page, which also removes them)."""

    list_display = ("team", "wallet_link", "monthly_limit", "created_at")
    list_select_related = ("wallet__customer",)
    list_filter = ("created_at",)
    search_fields = ("team", "wallet__customer__external_id", "wallet__customer__name")
    ordering = ("wallet__customer__name", "team", "id")
    raw_id_fields = ("wallet",)
    form = TeamSpendingLimitForm

    @admin.display(description="wallet", ordering="wallet__customer__name")
    def wallet_link(self, obj):
        return admin_link(obj.wallet)

    def get_fields(self, request, obj=None):
        return ("wallet", "team", "monthly_limit") if obj is None else ("wallet", "team", "monthly_limit",
                                                                        "created_at")

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else ("wallet", "team", "created_at")

    def save_model(self, request, obj, form, change):
        limit = team_limit_set(wallet_id=obj.wallet_id, team=obj.team, monthly_limit=obj.monthly_limit,
                               actor=request.user)
        obj.pk, obj.created_at = limit.pk, limit.created_at
        obj._state.adding = False


@admin.register(TeamSpend)
class TeamSpendAdmin(ReadOnlyAdminMixin, CappedCountMixin, BillingModelAdmin):
    """What each limited team spent per month (written by charges only)."""

    list_display = ("team", "wallet_link", "period_start", "spent", "monthly_limit")
    list_select_related = ("team_limit__wallet__customer",)
    list_filter = ("period_start",)
    search_fields = ("team_limit__team", "team_limit__wallet__customer__external_id")
    ordering = ("-period_start", "team_limit__team", "id")

    @admin.display(description="team", ordering="team_limit__team")
    def team(self, obj):
        return obj.team_limit.team

    @admin.display(description="wallet")
    def wallet_link(self, obj):
        return admin_link(obj.team_limit.wallet)

    @admin.display(description="monthly limit now")
    def monthly_limit(self, obj):
        return obj.team_limit.monthly_limit
