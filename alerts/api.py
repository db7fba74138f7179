"""Alerts API: a customer's alert rules and auto top-up settings, and the
webhook delivery log. Same conventions as API.md (bearer keys and scopes,
decimal strings, error envelope, cursor pages); mounted under /api/v1/alerts/
so the routes never collide with billing's ``customers/<external_id>``.

Reads need ``balance:read``; changes need ``admin``.
"""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from alerts import selectors
from alerts.models import WEBHOOK_EVENT_TYPES, AlertLevel, AutoTopUp, Notification, Severity
from alerts.services.auto_top_up import auto_top_up_set
from alerts.services.evaluation import rule_for_wallet
from alerts.services.rules import customer_rule_set
from billing.api.base import ADMIN, BALANCE_READ, ApiView, customer_wallet, errors, validated
from billing.api.inputs import AwareDateTimeField, DecimalStringField, StrictIntegerField, iso
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import credits_field
from billing.errors import InvalidRequest, NotFound
from billing.models import CreditPack
from billing.numbers import MAX_CREDITS

# --- Serializers --------------------------------------------------------------


class LevelSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=AlertLevel.Kind.choices)
    value = DecimalStringField(places=6, maximum=MAX_CREDITS, allow_zero=True)
    severity = serializers.ChoiceField(choices=Severity.choices)


class RuleSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    scope = serializers.CharField()
    active = serializers.BooleanField()
    levels = LevelSerializer(many=True, source="levels.all")
    hysteresis_percent = serializers.DecimalField(max_digits=5, decimal_places=2, coerce_to_string=True)
    hysteresis_credits = credits_field()
    min_interval_seconds = serializers.SerializerMethodField()
    channels = serializers.SerializerMethodField()
    recipients = serializers.SerializerMethodField()
    pause_when_depleted = serializers.BooleanField()
    expiring_soon_days = serializers.DictField(child=serializers.IntegerField())
    period_days = serializers.IntegerField()

    def get_min_interval_seconds(self, rule) -> int:
        return int(rule.min_interval.total_seconds())

    def get_channels(self, rule) -> dict:
        return {"email": rule.email, "sms": rule.sms, "webhook": rule.webhook}

    def get_recipients(self, rule) -> dict:
        return {"billing_contact": rule.notify_billing_contact, "technical_contact": rule.notify_technical_contact,
                "account_owner": rule.notify_account_owner, "finance": rule.notify_finance}


class CustomerRulesSerializer(serializers.Serializer):
    customer = serializers.CharField()
    effective_rule = RuleSerializer(allow_null=True)
    override = RuleSerializer(allow_null=True)
    states = serializers.ListField(child=serializers.DictField())


class ChannelsInput(serializers.Serializer):
    email = serializers.BooleanField(required=False)
    sms = serializers.BooleanField(required=False)
    webhook = serializers.BooleanField(required=False)


class RecipientsInput(serializers.Serializer):
    billing_contact = serializers.BooleanField(required=False)
    technical_contact = serializers.BooleanField(required=False)
    account_owner = serializers.BooleanField(required=False)
    finance = serializers.BooleanField(required=False)


class RuleInput(serializers.Serializer):
    active = serializers.BooleanField(required=False)
    levels = LevelSerializer(many=True, required=False)
    hysteresis_percent = DecimalStringField(places=2, maximum=MAX_CREDITS, allow_zero=True, required=False)
    hysteresis_credits = DecimalStringField(places=6, maximum=MAX_CREDITS, allow_zero=True, required=False)
    min_interval_seconds = StrictIntegerField(min_value=0, max_value=365 * 24 * 3600, required=False)
    channels = ChannelsInput(required=False)
    recipients = RecipientsInput(required=False)
    pause_when_depleted = serializers.BooleanField(required=False)
    expiring_soon_days = serializers.DictField(child=StrictIntegerField(min_value=0, max_value=3650), required=False)
    period_days = StrictIntegerField(min_value=1, max_value=3660, required=False)


class RunSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    breach = serializers.IntegerField(source="breach_seq")
    status = serializers.CharField()
    detail = serializers.CharField()
    quantity = serializers.IntegerField()
    credits = credits_field()
    grant = serializers.IntegerField(source="grant_id", allow_null=True)
    created_at = AwareDateTimeField()


class AutoTopUpSerializer(serializers.Serializer):
    enabled = serializers.BooleanField()
    threshold = credits_field(allow_zero=True)
    pack = serializers.CharField(source="pack.code")
    mode = serializers.CharField()
    pack_quantity = serializers.IntegerField()
    target_balance = credits_field(allow_null=True)
    cooldown_seconds = serializers.SerializerMethodField()
    require_approval = serializers.BooleanField()
    await_payment = serializers.BooleanField()
    monthly_max_count = serializers.IntegerField(allow_null=True)
    monthly_max_credits = credits_field(allow_null=True)
    max_consecutive_failures = serializers.IntegerField()
    consecutive_failures = serializers.IntegerField()
    disabled_reason = serializers.CharField()
    recent_runs = serializers.SerializerMethodField()

    def get_cooldown_seconds(self, auto) -> int:
        return int(auto.cooldown.total_seconds())

    def get_recent_runs(self, auto) -> list[dict]:
        return RunSerializer(auto.runs.order_by("-pk")[:20], many=True).data


class AutoTopUpResponse(serializers.Serializer):
    customer = serializers.CharField()
    auto_top_up = AutoTopUpSerializer(allow_null=True)


class AutoTopUpInput(serializers.Serializer):
    enabled = serializers.BooleanField(required=False)
    threshold = DecimalStringField(places=6, maximum=MAX_CREDITS, allow_zero=True, required=False)
    pack = serializers.CharField(max_length=64, required=False)
    mode = serializers.ChoiceField(choices=AutoTopUp.Mode.choices, required=False)
    pack_quantity = StrictIntegerField(min_value=1, max_value=1000, required=False)
    target_balance = DecimalStringField(places=6, maximum=MAX_CREDITS, required=False, allow_null=True)
    cooldown_seconds = StrictIntegerField(min_value=0, max_value=90 * 24 * 3600, required=False)
    require_approval = serializers.BooleanField(required=False)
    await_payment = serializers.BooleanField(required=False)
    monthly_max_count = StrictIntegerField(min_value=1, max_value=10000, required=False, allow_null=True)
    monthly_max_credits = DecimalStringField(places=6, maximum=MAX_CREDITS, required=False, allow_null=True)
    max_consecutive_failures = StrictIntegerField(min_value=1, max_value=100, required=False)


class AttemptSerializer(serializers.Serializer):
    attempted_at = AwareDateTimeField()
    ok = serializers.BooleanField()
    status_code = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.IntegerField()
    response_excerpt = serializers.CharField()
    error = serializers.CharField()


class DeliverySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    endpoint = serializers.IntegerField(source="endpoint_id")
    url = serializers.CharField(source="recipient")
    event_type = serializers.CharField()
    message_id = serializers.CharField()
    customer = serializers.CharField(source="customer.external_id", allow_null=True, default=None)
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    last_error = serializers.CharField()
    created_at = AwareDateTimeField()
    sent_at = AwareDateTimeField(allow_null=True)
    next_attempt_at = AwareDateTimeField(allow_null=True)
    attempt_log = AttemptSerializer(many=True, source="attempt_log.all")


class DeliveryPageSerializer(serializers.Serializer):
    results = DeliverySerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


# --- Views --------------------------------------------------------------------

def _rules_body(wallet) -> dict:
    override = selectors.customer_rules(wallet.customer)
    effective = rule_for_wallet(wallet)
    states = [{"level": s.level_id, "kind": s.level.kind, "value": str(s.level.value), "status": s.status,
               "breach": s.breach_seq, "threshold": None if s.threshold is None else str(s.threshold),
               "triggered_at": iso(s.triggered_at), "recovered_at": iso(s.recovered_at)}
              for s in selectors.wallet_alert_states(wallet)]
    return {
        "customer": wallet.customer.external_id,
        "effective_rule": RuleSerializer(effective).data if effective else None,
        "override": RuleSerializer(override[0]).data if override else None,
        "states": states,
    }


class CustomerAlertRulesApi(ApiView):
    """The alert rule that governs a customer's default wallet (its own override,
    else its segment's, else the global default), and setting the override."""

    scopes = {"GET": (BALANCE_READ,), "PUT": (ADMIN,)}

    @extend_schema(operation_id="alerts_customer_rules_retrieve",
                   responses={200: CustomerRulesSerializer, **errors(404)})
    def get(self, request, external_id: str):
        return Response(_rules_body(customer_wallet(external_id)))

    @extend_schema(operation_id="alerts_customer_rules_set", request=RuleInput,
                   responses={200: CustomerRulesSerializer, **errors(400, 404)})
    def put(self, request, external_id: str):
        wallet = customer_wallet(external_id)
        data = validated(RuleInput, request.data)
        fields = {k: data[k] for k in ("active", "hysteresis_percent", "hysteresis_credits", "pause_when_depleted",
                                       "expiring_soon_days", "period_days") if k in data}
        if "min_interval_seconds" in data:
            fields["min_interval"] = timedelta(seconds=data["min_interval_seconds"])
        for name, value in data.get("channels", {}).items():
            fields[name] = value
        for name, value in data.get("recipients", {}).items():
            fields[f"notify_{name}"] = value
        levels = [dict(level) for level in data["levels"]] if "levels" in data else None
        customer_rule_set(customer=wallet.customer, levels=levels, **fields)
        return Response(_rules_body(wallet))


class CustomerAutoTopUpApi(ApiView):
    """A customer's default wallet's auto top-up settings and its recent runs."""

    scopes = {"GET": (BALANCE_READ,), "PUT": (ADMIN,)}

    @extend_schema(operation_id="alerts_auto_top_up_retrieve", responses={200: AutoTopUpResponse, **errors(404)})
    def get(self, request, external_id: str):
        wallet = customer_wallet(external_id)
        auto = selectors.auto_top_up_for(wallet)
        return Response({"customer": wallet.customer.external_id,
                         "auto_top_up": AutoTopUpSerializer(auto).data if auto else None})

    @extend_schema(operation_id="alerts_auto_top_up_set", request=AutoTopUpInput,
                   responses={200: AutoTopUpResponse, **errors(400, 404)})
    def put(self, request, external_id: str):
        wallet = customer_wallet(external_id)
        data = validated(AutoTopUpInput, request.data)
        existing = selectors.auto_top_up_for(wallet)
        fields = {k: v for k, v in data.items() if k not in ("pack", "cooldown_seconds")}
        if "cooldown_seconds" in data:
            fields["cooldown"] = timedelta(seconds=data["cooldown_seconds"])
        if "pack" in data:
            pack = CreditPack.objects.filter(code=data["pack"], active=True).first()
            if pack is None:
                raise NotFound(f"No active credit pack {data['pack']!r}.", details={"pack": "not found"})
            fields["pack"] = pack
        if existing is None:
            missing = [f for f in ("threshold", "pack") if f not in fields]
            if missing:
                raise InvalidRequest("A new auto top-up needs a threshold and a pack.",
                                     details={f: "required" for f in missing})
        try:
            auto = auto_top_up_set(wallet=wallet, **fields)
        except ValidationError as exc:
            details = ({k: "; ".join(v) for k, v in exc.message_dict.items()} if hasattr(exc, "message_dict")
                       else {"auto_top_up": "; ".join(exc.messages)})
            raise InvalidRequest("Invalid auto top-up settings.", details=details) from None
        return Response({"customer": wallet.customer.external_id, "auto_top_up": AutoTopUpSerializer(auto).data})


class WebhookDeliveriesApi(ApiView):
    """The webhook delivery log, newest first, with every attempt."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="alerts_webhook_deliveries_list", parameters=[
        *PAGE_PARAMETERS,
        OpenApiParameter("customer", str, description="Only this customer's (external_id)."),
        OpenApiParameter("status", str, enum=Notification.Status.values),
        OpenApiParameter("event_type", str, enum=WEBHOOK_EVENT_TYPES),
    ], responses={200: DeliveryPageSerializer, **errors(400, 404)})
    def get(self, request):
        page = page_request(request.query_params, key_type=int)
        params = request.query_params
        customer = customer_wallet(params["customer"]).customer if params.get("customer") else None
        status = params.get("status")
        if status and status not in Notification.Status.values:
            raise InvalidRequest("Unknown status.", details={"status": f"one of {Notification.Status.values}"})
        event_type = params.get("event_type")
        if event_type and event_type not in WEBHOOK_EVENT_TYPES:
            raise InvalidRequest("Unknown event type.", details={"event_type": f"one of {WEBHOOK_EVENT_TYPES}"})
        qs = selectors.webhook_deliveries(customer=customer, status=status, event_type=event_type)
        return Response(paginate(qs, page, key="pk", descending=True,
                                 represent=lambda n: DeliverySerializer(n).data))
