"""Subscriptions to hybrid plans: start, read, list per customer, change plan
(with a preview of the proration), cancel now or at period end.

Writes need the ``admin`` scope and an ``Idempotency-Key`` header; reads need
``balance:read``. Proration is billed on the period's closing invoice (see
``billing.services.plans``).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from billing.api.base import ADMIN, BALANCE_READ, ApiView, customer_wallet, errors, validated
from billing.api.idempotency import idempotency_key, idempotency_parameter, run_idempotent
from billing.api.inputs import AwareDateTimeField, DecimalStringField, StrictIntegerField, storable
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import MAX_MONEY, StrictCharField, credits_field, money_field, rate_field
from billing.errors import NotFound
from billing.models import Plan, Subscription, Wallet
from billing.services.plans import (
    PlanChangePreview,
    subscription_cancel,
    subscription_change_plan,
    subscription_change_preview,
    subscription_start,
)


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false only."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            raise serializers.ValidationError("must be true or false")
        return data


class SubscriptionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    customer = serializers.CharField(source="customer.external_id")
    plan = serializers.CharField(source="plan.code")
    wallet = serializers.IntegerField(source="wallet_id")
    status = serializers.ChoiceField(choices=Subscription.Status.choices)
    current_period_start = AwareDateTimeField()
    current_period_end = AwareDateTimeField()
    trial_ends_at = AwareDateTimeField(allow_null=True)
    cancel_at_period_end = serializers.BooleanField()
    canceled_at = AwareDateTimeField(allow_null=True)
    created_at = AwareDateTimeField()


class SubscriptionPageSerializer(serializers.Serializer):
    results = SubscriptionSerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class SubscriptionCreateInput(serializers.Serializer):
    plan = StrictCharField(max_length=64, help_text="The plan's code.")
    wallet = StrictIntegerField(required=False, min_value=1, help_text="Empty: the customer's default wallet.")
    start_at = AwareDateTimeField(required=False, help_text="Empty: now.")


class SubscriptionCancelInput(serializers.Serializer):
    at_period_end = StrictBooleanField(required=False, default=True,
                                       help_text="false: end now (the unused fee is credited on the final invoice).")


class PlanChangeInput(serializers.Serializer):
    plan = StrictCharField(max_length=64, help_text="The new plan's code (same currency and period length).")


class PlanChangePreviewSerializer(serializers.Serializer):
    from_plan = serializers.CharField(source="from_plan.code")
    to_plan = serializers.CharField(source="to_plan.code")
    effective_at = AwareDateTimeField()
    remaining_fraction = DecimalStringField(places=10, maximum=MAX_MONEY, allow_zero=True,
                                            help_text="Billable share of the period left (0..1).")
    currency = serializers.CharField()
    unused_credit = money_field(help_text="The old plan's fee for the rest of the period, credited.")
    remaining_charge = money_field(help_text="The new plan's fee for the rest of the period, charged.")
    overage_credits = credits_field(help_text="Overage so far, billed at the old plan's price.")
    overage_price = rate_field()
    net_fee = DecimalStringField(places=4, maximum=MAX_MONEY, allow_zero=True,
                                 help_text="What the change adds to the period's invoice (may be negative).")
    credits_delta = serializers.SerializerMethodField(help_text="Included credits added (+) or taken back (-).")
    included_remaining = credits_field()
    included_after = credits_field()

    def get_credits_delta(self, preview) -> str:
        return f"{preview.credits_delta:.6f}"


class SubscriptionChangeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    from_plan = serializers.CharField(source="from_plan.code")
    to_plan = serializers.CharField(source="to_plan.code")
    effective_at = AwareDateTimeField()
    remaining_fraction = DecimalStringField(places=10, maximum=MAX_MONEY, allow_zero=True)
    unused_credit = money_field()
    remaining_charge = money_field()
    credits_delta = serializers.SerializerMethodField()
    included_grant = serializers.IntegerField(source="included_grant_id", allow_null=True)
    overage_credits = credits_field()
    overage_price = rate_field()

    def get_credits_delta(self, change) -> str:
        return f"{change.credits_delta:.6f}"


class PlanChangeSerializer(serializers.Serializer):
    subscription = SubscriptionSerializer()
    change = SubscriptionChangeSerializer()


def load_subscription(subscription_id: int) -> Subscription:
    subscription = Subscription.objects.select_related("customer", "plan").filter(pk=subscription_id).first()
    if subscription is None:
        raise NotFound(f"No subscription {subscription_id}.", details={"subscription": "not found"})
    return subscription


def active_plan(code: str) -> Plan:
    plan = Plan.objects.filter(code=code).first() if len(code) <= 64 and storable(code) else None
    if plan is None:
        raise NotFound(f"No plan with code {code!r}."[:300], details={"plan": "not found"})
    return plan


def subscription_body(subscription_id: int) -> dict:
    return SubscriptionSerializer(load_subscription(subscription_id)).data


class CustomerSubscriptionsApi(ApiView):
    """``GET``: the customer's subscriptions, newest first, cursor-paginated (scope
    ``balance:read``). ``POST``: put the customer on a plan (scope ``admin``,
    ``Idempotency-Key``): the first period's included credits are granted at once,
    the wallet takes the plan's overage policy, a plan with trial days starts
    ``trialing``. A wallet that already has a live subscription: 409 ``conflict``."""

    scopes = {"GET": (BALANCE_READ,), "POST": (ADMIN,)}

    @extend_schema(operation_id="customers_subscriptions_list", parameters=PAGE_PARAMETERS,
                   responses={200: SubscriptionPageSerializer, **errors(400, 404)})
    def get(self, request, external_id: str):
        page = page_request(request.query_params, key_type=int)
        customer = customer_wallet(external_id).customer
        subscriptions = Subscription.objects.filter(customer=customer).select_related("plan")

        def represent(subscription: Subscription) -> dict:
            subscription.customer = customer
            return SubscriptionSerializer(subscription).data

        return Response(paginate(subscriptions, page, key="pk", descending=True, represent=represent))

    @extend_schema(operation_id="customers_subscriptions_create", request=SubscriptionCreateInput,
                   parameters=[idempotency_parameter()],
                   responses={201: SubscriptionSerializer, **errors(400, 404, 409)})
    def post(self, request, external_id: str):
        key = idempotency_key(request)
        data = validated(SubscriptionCreateInput, request.data)
        default = customer_wallet(external_id)
        plan = active_plan(data["plan"])
        wallet = default
        if data.get("wallet") is not None:
            wallet = Wallet.objects.filter(pk=data["wallet"], customer=default.customer).first()
            if wallet is None:
                raise NotFound(f"The customer has no wallet {data['wallet']}.", details={"wallet": "not found"})
        label = self.actor_label()

        def perform():
            subscription = subscription_start(customer=default.customer, plan=plan, wallet=wallet,
                                              start_at=data.get("start_at"), actor_label=label)
            return 201, subscription_body(subscription.pk)

        return run_idempotent(operation="subscriptions.create", key=key,
                              payload={"customer": external_id, **data}, perform=perform)


class SubscriptionDetailApi(ApiView):
    """One subscription (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="subscriptions_retrieve", responses={200: SubscriptionSerializer, **errors(404)})
    def get(self, request, subscription_id: int):
        return Response(subscription_body(subscription_id))


class SubscriptionCancelApi(ApiView):
    """Cancel at the end of the current period (default; a repeat changes nothing)
    or now with ``"at_period_end": false``: the period closes at once and its
    invoice bills the fee to date and any overage (scope ``admin``,
    ``Idempotency-Key``). A canceled subscription: 409 ``conflict``."""

    scopes = {"POST": (ADMIN,)}

    @extend_schema(operation_id="subscriptions_cancel", request=SubscriptionCancelInput,
                   parameters=[idempotency_parameter()],
                   responses={200: SubscriptionSerializer, **errors(400, 404, 409)})
    def post(self, request, subscription_id: int):
        key = idempotency_key(request)
        data = validated(SubscriptionCancelInput, request.data)
        load_subscription(subscription_id)
        label = self.actor_label()

        def perform():
            subscription_cancel(subscription_id=subscription_id, at_period_end=data["at_period_end"],
                                actor_label=label)
            return 200, subscription_body(subscription_id)

        return run_idempotent(operation="subscriptions.cancel", key=key,
                              payload={"subscription": subscription_id, **data}, perform=perform)


def _preview_body(preview: PlanChangePreview) -> dict:
    return PlanChangePreviewSerializer(preview).data


class SubscriptionChangePreviewApi(ApiView):
    """What changing to ``plan`` now would bill and grant; changes nothing (scope
    ``balance:read`` or ``admin``). Refuses as the change would."""

    scopes = {"POST": (BALANCE_READ, ADMIN)}

    @extend_schema(operation_id="subscriptions_change_plan_preview", request=PlanChangeInput,
                   responses={200: PlanChangePreviewSerializer, **errors(400, 404, 409)})
    def post(self, request, subscription_id: int):
        data = validated(PlanChangeInput, request.data)
        load_subscription(subscription_id)
        preview = subscription_change_preview(subscription_id=subscription_id, plan=active_plan(data["plan"]))
        return Response(_preview_body(preview))


class SubscriptionChangePlanApi(ApiView):
    """Move the subscription to ``plan`` now (scope ``admin``, ``Idempotency-Key``):
    the fee is prorated on the period's closing invoice, the period's included
    credits grow or shrink by the share of the period left, the wallet takes the
    new overage policy. Same plan, inactive plan, another currency or period
    length: 400; canceled, set to cancel or period already over: 409."""

    scopes = {"POST": (ADMIN,)}

    @extend_schema(operation_id="subscriptions_change_plan", request=PlanChangeInput,
                   parameters=[idempotency_parameter()],
                   responses={200: PlanChangeSerializer, **errors(400, 404, 409)})
    def post(self, request, subscription_id: int):
        key = idempotency_key(request)
        data = validated(PlanChangeInput, request.data)
        load_subscription(subscription_id)
        plan = active_plan(data["plan"])
        label = self.actor_label()

        def perform():
            change = subscription_change_plan(subscription_id=subscription_id, plan=plan, actor_label=label)
            return 200, {"subscription": subscription_body(subscription_id),
                         "change": SubscriptionChangeSerializer(change).data}

        return run_idempotent(operation="subscriptions.change_plan", key=key,
                              payload={"subscription": subscription_id, **data}, perform=perform)
