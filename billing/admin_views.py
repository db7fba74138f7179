"""Custom admin pages that are not one model's add/change: the bulk promotional grant.

The page calls ``grant_create`` once per customer with the idempotency key
``bulk:<token>:<customer id>``, where the token is generated when the form is
rendered; submitting the same page twice therefore grants nothing new. Large
runs record a ``JobRun`` whose ``done``/``total`` show progress in its admin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from billing.admin.base import render_form_page, require_perm
from billing.errors import BillingError
from billing.forms import BulkPromoForm
from billing.models import CreditGrant, Customer, JobRun, Wallet
from billing.services.grants import grant_create

BULK_JOB_THRESHOLD = 50
PROGRESS_EVERY = 25
PREVIEW_NAMES = 20


@dataclass
class BulkPromoResult:
    granted: int = 0
    pending_approval: int = 0
    already_granted: int = 0
    unknown_ids: list[str] = field(default_factory=list)
    without_wallet: list[Customer] = field(default_factory=list)
    failed: list[tuple[Customer, str]] = field(default_factory=list)
    job: JobRun | None = None

    @property
    def total(self) -> int:
        return self.granted + self.pending_approval + self.already_granted + len(self.failed)


def bulk_key(token: str, customer_id: int) -> str:
    return f"bulk:{token}:{customer_id}"


def bulk_promo_run(*, customer_ids: list[int], external_ids: list[str], amount: Decimal, days: int, reason: str,
                   token: str, user) -> BulkPromoResult:
    """Grant ``amount`` promotional credits expiring in ``days`` days to each customer's
    default wallet, one ``grant_create`` (one transaction) per customer."""
    result = BulkPromoResult()
    customers = {c.pk: c for c in Customer.objects.filter(pk__in=customer_ids)}
    if external_ids:
        found = {c.external_id: c for c in Customer.objects.filter(external_id__in=external_ids)}
        result.unknown_ids = [e for e in external_ids if e not in found]
        customers.update({c.pk: c for c in found.values()})
    wallets = {w.customer_id: w for w in Wallet.objects.filter(customer_id__in=customers, is_default=True)}
    keys = [bulk_key(token, pk) for pk in customers]
    done_before = set(CreditGrant.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    ordered = [customers[pk] for pk in sorted(customers)]
    if len(ordered) > BULK_JOB_THRESHOLD:
        result.job = JobRun.objects.create(
            name="bulk_promo", total=len(ordered),
            detail={"token": token, "amount": str(amount), "days": days, "by": user.get_username()})
    started = timezone.now()
    expires_at = started + timedelta(days=days)
    for index, customer in enumerate(ordered, start=1):
        wallet = wallets.get(customer.pk)
        key = bulk_key(token, customer.pk)
        if wallet is None:
            result.without_wallet.append(customer)
        elif key in done_before:
            result.already_granted += 1
        else:
            try:
                grant = grant_create(
                    wallet=wallet, kind=CreditGrant.Kind.PROMOTIONAL, amount=amount,
                    source=CreditGrant.Source.PROMOTION, expires_at=expires_at, reason=reason,
                    requested_by=user, idempotency_key=key,
                )
            except BillingError as error:
                result.failed.append((customer, error.message))
            else:
                if grant.created_at < started:
                    result.already_granted += 1  # a concurrent submission of the same page got there first
                elif grant.status == CreditGrant.Status.PENDING_APPROVAL:
                    result.pending_approval += 1
                else:
                    result.granted += 1
        if result.job is not None and (index % PROGRESS_EVERY == 0 or index == len(ordered)):
            JobRun.objects.filter(pk=result.job.pk).update(done=index)
    if result.job is not None:
        result.job.done = len(ordered)
        result.job.status = "failed" if result.failed else "done"
        result.job.finished_at = timezone.now()
        result.job.detail = {**result.job.detail, "granted": result.granted,
                             "pending_approval": result.pending_approval,
                             "already_granted": result.already_granted, "failed": len(result.failed),
                             "unknown_ids": len(result.unknown_ids)}
        result.job.save(update_fields=["done", "status", "finished_at", "detail"])
    return result


def _form_page(model_admin, request, form, selected_ids: list[int]):
    preview = list(Customer.objects.filter(pk__in=selected_ids[:PREVIEW_NAMES]).order_by("name"))
    return render_form_page(
        model_admin, request, form, title="Bulk promotional grant", submit="Grant promotional credits",
        intro="Each customer's default wallet gets the credits. Submitting this page twice grants once.",
        extra={"form_action": reverse("admin:billing_customer_bulk_promo"), "selected_count": len(selected_ids),
               "selected_preview": preview},
    )


def bulk_promo_view(model_admin, request):
    require_perm(request, "billing.add_creditgrant")
    if request.method == "POST":
        form = BulkPromoForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            result = bulk_promo_run(
                customer_ids=data["customer_ids"], external_ids=data["external_ids"], amount=data["amount"],
                days=data["days"], reason=data["reason"], token=data["token"], user=request.user,
            )
            context = {**model_admin.admin_site.each_context(request), "opts": model_admin.opts,
                       "title": "Bulk promotional grant: result", "result": result, "data": data}
            return TemplateResponse(request, "admin/billing/bulk_promo_result.html", context)
        selected = form.cleaned_data.get("customer_ids") or []
    else:
        form = BulkPromoForm()
        selected = []
    return _form_page(model_admin, request, form, selected)


def bulk_promo_action(model_admin, request, queryset):
    """The customer-list action: the bulk form, preset with the selected customers."""
    require_perm(request, "billing.add_creditgrant")
    ids = list(queryset.order_by().values_list("pk", flat=True))
    form = BulkPromoForm(initial={"customer_ids": ",".join(map(str, ids))})
    return _form_page(model_admin, request, form, ids)
