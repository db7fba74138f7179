"""Custom admin pages that are not one model's add/change: the bulk promotional grant.

The page calls ``grant_create`` once per customer with the idempotency key
``bulk:<token>:<customer id>``, where the token is generated when the form is
rendered; submitting the same page twice therefore grants nothing new, and a
job killed halfway can simply run again. Small selections are granted in the
request; large ones are recorded as a ``JobRun`` and granted by a Celery task,
whose ``done``/``total`` show progress in the job-run admin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from celery import shared_task
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.db import InterfaceError, OperationalError, transaction
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from billing.admin.base import render_form_page, require_perm
from billing.errors import BillingError
from billing.forms import BulkPromoForm
from billing.models import CreditGrant, Customer, JobRun, Wallet
from billing.services.grants import grant_create
from billing.services.jobs import run_alive

JOB_NAME = "bulk_promo"
BULK_JOB_THRESHOLD = 200
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

    def summary(self) -> dict:
        return {"granted": self.granted, "pending_approval": self.pending_approval,
                "already_granted": self.already_granted, "failed": len(self.failed),
                "without_wallet": len(self.without_wallet),
                "failures": [f"{customer.external_id}: {message}" for customer, message in self.failed[:100]]}


def bulk_key(token: str, customer_id: int) -> str:
    return f"bulk:{token}:{customer_id}"


def bulk_promo_customers(*, customer_ids: list[int], external_ids: list[str]) -> tuple[list[int], list[str]]:
    """The customers a submission names (ids ∪ external ids) and the external ids nobody has."""
    found = set(Customer.objects.filter(pk__in=customer_ids).values_list("pk", flat=True))
    unknown = []
    if external_ids:
        known = dict(Customer.objects.filter(external_id__in=external_ids).values_list("external_id", "pk"))
        unknown = [e for e in external_ids if e not in known]
        found.update(known.values())
    return sorted(found), unknown


def bulk_promo_grant(*, customer_ids: list[int], amount: Decimal, days: int, reason: str, token: str, user,
                     job: JobRun | None = None) -> BulkPromoResult:
    """Grant ``amount`` promotional credits expiring in ``days`` days to each customer's
    default wallet, one ``grant_create`` (one transaction) per customer, reporting
    progress on ``job``. Running it again with the same token grants nothing new."""
    result = BulkPromoResult()
    customers = Customer.objects.in_bulk(customer_ids)
    wallets = {w.customer_id: w for w in Wallet.objects.filter(customer_id__in=customer_ids, is_default=True)}
    keys = [bulk_key(token, pk) for pk in customer_ids]
    done_before = set(CreditGrant.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True))
    started = timezone.now()
    expires_at = started + timedelta(days=days)
    ordered = [customers[pk] for pk in customer_ids if pk in customers]
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
        if job is not None and (index % PROGRESS_EVERY == 0 or index == len(ordered)):
            JobRun.objects.filter(pk=job.pk).update(done=index)
    return result


@shared_task(name="billing.admin_views.bulk_promo_job", acks_late=True,
             autoretry_for=(OperationalError, InterfaceError), retry_backoff=True, max_retries=5)
def bulk_promo_job(job_id: int) -> None:
    """Run a queued bulk promotional grant recorded as JobRun ``job_id``. Idempotent."""
    job = JobRun.objects.get(pk=job_id)
    params = job.detail
    with run_alive(job.pk):
        JobRun.objects.filter(pk=job.pk).update(status="running")
        user = get_user_model().objects.filter(pk=params.get("user_id")).first()
        try:
            result = bulk_promo_grant(customer_ids=params["customer_ids"], amount=Decimal(params["amount"]),
                                      days=int(params["days"]), reason=params["reason"], token=params["token"],
                                      user=user, job=job)
        except Exception as exc:
            JobRun.objects.filter(pk=job.pk).update(status="failed", finished_at=timezone.now(),
                                                    detail={**params, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            raise
        JobRun.objects.filter(pk=job.pk).update(
            status="failed" if result.failed else "succeeded", finished_at=timezone.now(), done=job.total,
            detail={**params, "result": result.summary()})


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
    if request.method != "POST":
        return _form_page(model_admin, request, BulkPromoForm(), [])
    form = BulkPromoForm(request.POST)
    if not form.is_valid():
        return _form_page(model_admin, request, form, form.cleaned_data.get("customer_ids") or [])
    data = form.cleaned_data
    customer_ids, unknown = bulk_promo_customers(customer_ids=data["customer_ids"], external_ids=data["external_ids"])
    if len(customer_ids) > BULK_JOB_THRESHOLD:
        job = JobRun.objects.create(name=JOB_NAME, total=len(customer_ids), status="queued", detail={
            "token": data["token"], "amount": str(data["amount"]), "days": data["days"], "reason": data["reason"],
            "user_id": request.user.pk, "customer_ids": customer_ids, "unknown_ids": unknown[:100],
            "unknown_count": len(unknown)})
        transaction.on_commit(lambda: bulk_promo_job.delay(job.pk))
        messages.info(request, f"Granting {len(customer_ids)} customers in the background"
                               f"{f'; {len(unknown)} unknown external ids' if unknown else ''}. "
                               "Reload this page to follow the progress.")
        return HttpResponseRedirect(reverse("admin:billing_jobrun_change", args=[job.pk]))
    result = bulk_promo_grant(customer_ids=customer_ids, amount=data["amount"], days=data["days"],
                              reason=data["reason"], token=data["token"], user=request.user)
    result.unknown_ids = unknown
    context = {**model_admin.admin_site.each_context(request), "opts": model_admin.opts,
               "title": "Bulk promotional grant: result", "result": result, "data": data}
    return TemplateResponse(request, "admin/billing/bulk_promo_result.html", context)


def bulk_promo_action(model_admin, request, queryset):
    """The customer-list action: the bulk form, preset with the selected customers."""
    require_perm(request, "billing.add_creditgrant")
    ids = list(queryset.order_by().values_list("pk", flat=True))
    form = BulkPromoForm(initial={"customer_ids": ",".join(map(str, ids))})
    return _form_page(model_admin, request, form, ids)
