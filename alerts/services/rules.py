"""Writing alert rules: a customer's override (API) and re-evaluating the
wallets a rule change touches."""

from __future__ import annotations

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction

from alerts.models import AlertLevel, AlertRule
from billing.errors import InvalidRequest
from billing.models import Customer, Wallet

RULE_FIELDS = {
    "active", "hysteresis_percent", "hysteresis_credits", "min_interval", "email", "sms", "webhook",
    "notify_billing_contact", "notify_technical_contact", "notify_account_owner", "notify_finance",
    "pause_when_depleted", "expiring_soon_days", "period_days",
}


def _validation_details(exc: ValidationError) -> dict:
    if hasattr(exc, "message_dict"):
        return {k: "; ".join(v) for k, v in exc.message_dict.items()}
    return {"rule": "; ".join(exc.messages)}


def customer_rule_set(*, customer: Customer, levels: list[dict] | None = None, **fields) -> AlertRule:
    """Create or change the customer's override rule; ``levels`` (kind, value,
    severity) replace its levels when given — their state starts armed again.
    The customer's wallets are re-evaluated at once (marks, and a breach already
    under a new threshold notifies). Raises InvalidRequest naming the field."""
    unknown = set(fields) - RULE_FIELDS
    if unknown:
        raise InvalidRequest("Unknown rule fields.", details={f: "unknown field" for f in sorted(unknown)})
    with transaction.atomic():
        rule = AlertRule.objects.select_for_update().filter(scope=AlertRule.Scope.CUSTOMER, customer=customer).first()
        if rule is None:
            rule = AlertRule(scope=AlertRule.Scope.CUSTOMER, customer=customer, name=f"{customer.name} override"[:120])
        for name, value in fields.items():
            setattr(rule, name, value)
        try:
            rule.full_clean()
        except ValidationError as exc:
            raise InvalidRequest("Invalid alert rule.", details=_validation_details(exc)) from None
        rule.save()
        if levels is not None:
            seen = set()
            new_levels = []
            for i, level in enumerate(levels):
                item = AlertLevel(rule=rule, kind=level["kind"], value=Decimal(level["value"]),
                                  severity=level["severity"])
                key = (item.kind, item.value)
                if key in seen:
                    raise InvalidRequest("Two levels with the same kind and value.",
                                         details={f"levels.{i}": "duplicate kind and value"})
                seen.add(key)
                try:
                    item.full_clean(exclude=["rule"])
                except ValidationError as exc:
                    raise InvalidRequest("Invalid alert level.", details={
                        (f"levels.{i}" if k == "__all__" else f"levels.{i}.{k}"): "; ".join(v)
                        for k, v in exc.message_dict.items()}) from None
                new_levels.append(item)
            rule.levels.all().delete()
            AlertLevel.objects.bulk_create(new_levels)
        rule_changed(rule)
    return rule


def rule_changed(rule: AlertRule) -> None:
    """After a rule or its levels changed: re-evaluate the wallets it may govern
    once the change commits — a customer rule's wallets at once, global and
    segment rules through a sweep."""
    from alerts import tasks

    if rule.scope == AlertRule.Scope.CUSTOMER and rule.customer_id:
        for wallet_id in Wallet.objects.filter(customer_id=rule.customer_id).values_list("pk", flat=True):
            transaction.on_commit(lambda wallet_id=wallet_id: tasks.wallet_refresh.delay(wallet_id, "rule"))
    else:
        transaction.on_commit(lambda: tasks.alerts_sweep.delay())
