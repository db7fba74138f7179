"""The Creditdesk block on the admin index: a few counts, each one indexed query."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from urllib.parse import urlencode

from django import template
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from billing.admin.grants import EXPIRING_SOON_DAYS
from billing.models import Adjustment, CreditGrant, LedgerEntry, RefundRequest
from billing.numbers import ZERO

register = template.Library()


@register.inclusion_tag("billing/admin/dashboard.html", takes_context=True)
def creditdesk_dashboard(context):
    request = context["request"]
    if not request.user.has_perm("billing.view_creditgrant"):
        return {"show": False}
    now = timezone.now()
    midnight = datetime.combine(now.astimezone(UTC).date(), time.min, tzinfo=UTC)
    pending_grants = CreditGrant.objects.filter(status=CreditGrant.Status.PENDING_APPROVAL).count()
    may_see_adjustments = request.user.has_perm("billing.view_adjustment")
    pending_adjustments = (
        Adjustment.objects.filter(status=Adjustment.Status.PENDING_APPROVAL).count() if may_see_adjustments else 0
    )
    expiring = CreditGrant.objects.filter(
        status=CreditGrant.Status.ACTIVE, remaining__gt=0, expires_at__gt=now,
        expires_at__lte=now + timedelta(days=EXPIRING_SOON_DAYS),
    ).count()
    may_see_refunds = request.user.has_perm("billing.view_refundrequest")
    pending_refunds = (
        RefundRequest.objects.filter(status=RefundRequest.Status.PENDING_APPROVAL).count() if may_see_refunds else 0
    )
    used_today = -(LedgerEntry.objects.filter(type=LedgerEntry.Type.USAGE, created_at__gte=midnight)
                   .aggregate(total=Sum("amount"))["total"] or ZERO)
    grants_url = reverse("admin:billing_creditgrant_changelist")
    return {
        "show": True,
        "pending_grants": pending_grants,
        "pending_adjustments": pending_adjustments,
        "may_see_adjustments": may_see_adjustments,
        "expiring": expiring,
        "expiring_days": EXPIRING_SOON_DAYS,
        "used_today": used_today,
        "pending_grants_url": f"{grants_url}?approval=others",
        "pending_adjustments_url": reverse("admin:billing_adjustment_changelist") + "?approval=others",
        "expiring_url": f"{grants_url}?expiring=14d",
        "may_see_refunds": may_see_refunds,
        "pending_refunds": pending_refunds,
        "pending_refunds_url": reverse("admin:billing_refundrequest_changelist") + "?approval=others",
        "revenue_report_url": (reverse("admin:billing_revenue_report")
                               if request.user.has_perm("billing.view_revenue_report") else ""),
        "usage_url": reverse("admin:billing_ledgerentry_changelist") + "?"
        + urlencode({"type__exact": "usage", "created_at__gte": midnight.isoformat(sep=" ")}),
    }
