"""Staff roles as Django groups, created by code after every migrate.

Finance runs credits; sales reps and managers read accounts (CRM rights come
with the crm app); support reads and fixes contact details; auditors read
everything and change nothing. Nobody may change or delete ledger entries or
usage events: those permissions are granted to no group.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission

FINANCE = "Finance"
SALES_REP = "Sales rep"
SALES_MANAGER = "Sales manager"
SUPPORT = "Support"
AUDITOR = "Auditor"
ROLES = (FINANCE, SALES_REP, SALES_MANAGER, SUPPORT, AUDITOR)

BILLING_MODELS = (
    "customer", "wallet", "creditgrant", "ledgerentry", "feature", "featurecost", "usageevent", "reservation",
    "creditpack", "packdiscounttier", "packpurchase", "adjustment", "apikey", "auditevent", "outboxevent", "jobrun",
    "idempotencyrecord", "teamspendinglimit", "teamspend",
)
# Invoices and payments (issue 4): finance writes them through services, auditors read them.
INVOICING_MODELS = ("billingprofile", "invoice", "invoiceline", "payment", "invoicenumbercounter", "plan",
                    "subscription", "subscriptionperiod", "subscriptionchange")
APPEND_ONLY = {"ledgerentry", "usageevent", "auditevent", "outboxevent", "idempotencyrecord", "jobrun",
               "invoicenumbercounter", "subscriptionperiod", "subscriptionchange", "teamspend"}
# Refunds and revenue (issue 4): finance requests refunds, approves others' and
# reads the revenue report; support may request a refund; auditors read. Credit
# notes are written by the refund service only, so nobody adds or changes them.
REVENUE_PERMISSIONS = {
    FINANCE: ["billing.view_refundrequest", "billing.add_refundrequest", "billing.approve_refundrequest",
              "billing.view_creditnote", "billing.view_revenue_report"],
    SUPPORT: ["billing.view_refundrequest", "billing.add_refundrequest"],
    AUDITOR: ["billing.view_refundrequest", "billing.view_creditnote", "billing.view_revenue_report"],
}
CONTRACT_MODELS = ("contract", "contractpricetier", "contractinstalment", "trueup", "contractamendment")
# Extra apps whose models every role may read (e.g. the beat schedule for finance).
READ_ONLY_APPS = {"django_celery_beat"}


def _perms(app: str, models: tuple[str, ...], actions: tuple[str, ...]) -> list[str]:
    return [f"{app}.{action}_{model}" for model in models for action in actions]


def _contract_permissions() -> dict[str, list[str]]:
    """Enterprise contracts (issue 4): finance drafts contracts and their volume
    tiers and runs them through the contract services, the only writers of
    instalments, true-ups and amendments; sales see contracts; auditors read."""
    return {
        FINANCE: _perms("billing", CONTRACT_MODELS, ("view",)) + _perms("billing", ("contract", "contractpricetier"),
                                                                       ("add", "change")),
        SALES_REP: _perms("billing", ("contract", "trueup"), ("view",)),
        AUDITOR: _perms("billing", CONTRACT_MODELS, ("view",)),
    }


def role_permissions() -> dict[str, list[str]]:
    view_all = _perms("billing", BILLING_MODELS + INVOICING_MODELS, ("view",))
    finance_writable = tuple(m for m in BILLING_MODELS + INVOICING_MODELS if m not in APPEND_ONLY)
    finance = (
        view_all
        + _perms("billing", finance_writable, ("add", "change"))
        + ["billing.approve_creditgrant", "billing.delete_teamspendinglimit"]
        + _perms("django_celery_beat", ("periodictask", "crontabschedule", "intervalschedule"), ("view", "change"))
    )
    sales_view = _perms("billing", (
        "customer", "wallet", "creditgrant", "ledgerentry", "feature", "featurecost", "usageevent", "reservation",
        "creditpack", "packdiscounttier", "packpurchase", "teamspendinglimit",
    ), ("view",))
    support = sales_view + ["billing.change_customer", "billing.view_adjustment"]
    auditor = view_all + _perms("django_celery_beat", ("periodictask",), ("view",))
    contracts = _contract_permissions()
    finance, auditor = finance + contracts[FINANCE], auditor + contracts[AUDITOR]
    sales_view = sales_view + contracts[SALES_REP]
    return {
        FINANCE: finance + REVENUE_PERMISSIONS[FINANCE],
        SALES_REP: sales_view,
        SALES_MANAGER: sales_view,
        SUPPORT: support + REVENUE_PERMISSIONS[SUPPORT],
        AUDITOR: auditor + REVENUE_PERMISSIONS[AUDITOR],
    }


def extend_role(role: str, codenames: list[str]) -> None:
    """Other apps (crm, alerts) add their own permissions to a role."""
    _extra.setdefault(role, []).extend(codenames)


_extra: dict[str, list[str]] = {}


def ensure_roles() -> dict[str, Group]:
    """Create or update the role groups so each has exactly its permissions. Idempotent."""
    groups = {}
    wanted = role_permissions()
    for role in ROLES:
        codes = set(wanted[role]) | set(_extra.get(role, []))
        perms = []
        for code in sorted(codes):
            app_label, codename = code.split(".", 1)
            perm = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if perm is not None:
                perms.append(perm)
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.set(perms)
        groups[role] = group
    return groups


def ensure_roles_after_migrate(sender, **kwargs) -> None:
    ensure_roles()
