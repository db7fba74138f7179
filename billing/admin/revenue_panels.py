"""The revenue schedule block on a paid grant's change page (read-only)."""

from __future__ import annotations

from django.urls import reverse

from billing.models import CreditGrant
from billing.services.revenue import grant_schedule

REPORT_PERMISSION = "billing.view_revenue_report"


def revenue_schedule_context(request, grant: CreditGrant) -> dict:
    """``revenue_schedule`` (and the refund button) for a paid grant, for users who may read revenue."""
    if not request.user.has_perm(REPORT_PERMISSION):
        return {}
    schedule = grant_schedule(grant)
    if not schedule.is_paid_grant:
        return {}
    context = {"revenue_schedule": schedule}
    if (request.user.has_perm("billing.add_refundrequest") and grant.status == CreditGrant.Status.ACTIVE
            and grant.remaining > 0):
        context["refund_url"] = reverse("admin:billing_refundrequest_add") + f"?grant={grant.pk}"
    return context
