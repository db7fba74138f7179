"""Customers, their balance, ledger and grants."""

from __future__ import annotations

from decimal import Decimal

from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from billing.api.base import (
    ADMIN,
    BALANCE_READ,
    USAGE_WRITE,
    ApiView,
    active_feature,
    customer_not_found,
    customer_wallet,
    errors,
    validated,
)
from billing.api.idempotency import idempotency_key, idempotency_parameter, run_idempotent
from billing.api.inputs import MAX_ID_LENGTH, iso, storable
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import (
    BalanceSerializer,
    CustomerCreateInput,
    CustomerSerializer,
    GrantCreateInput,
    GrantPageSerializer,
    GrantSerializer,
    GrantVoidInput,
    LedgerEntrySerializer,
    LedgerPageSerializer,
)
from billing.models import CreditGrant, Customer, LedgerEntry, Wallet
from billing.numbers import ZERO
from billing.selectors import customer_balance
from billing.services.grants import customer_create, grant_create, grant_void


def customer_body(customer: Customer, wallet: Wallet) -> dict:
    customer.wallet = wallet
    return CustomerSerializer(customer).data


class CustomerCreateApi(ApiView):
    """Create a customer and its default wallet.

    Scope: ``usage:write`` or ``admin`` — the product backend that charges usage
    registers its own sign-ups; an existing ``external_id`` is a 409 ``conflict``.
    An ``Idempotency-Key`` header is optional here: with it, a retry replays the
    first answer instead of getting the 409."""

    scopes = {"POST": (USAGE_WRITE, ADMIN)}

    @extend_schema(operation_id="customers_create", request=CustomerCreateInput,
                   parameters=[idempotency_parameter(required=False)],
                   responses={201: CustomerSerializer, **errors(400, 409)})
    def post(self, request):
        key = idempotency_key(request, required=False)
        data = validated(CustomerCreateInput, request.data)

        def perform():
            customer = customer_create(
                external_id=data["external_id"], name=data["name"], email=data["email"],
                currency=data["currency"], timezone_name=data["timezone"],
            )
            return 201, customer_body(customer, customer.wallets.get(is_default=True))

        if key is None:
            status, body = perform()
            return Response(body, status=status)
        return run_idempotent(operation="customers.create", key=key, payload=dict(data), perform=perform)


class CustomerDetailApi(ApiView):
    """A customer and its default wallet (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="customers_retrieve", responses={200: CustomerSerializer, **errors(404)})
    def get(self, request, external_id: str):
        wallet = customer_wallet(external_id)
        return Response(customer_body(wallet.customer, wallet))


class CustomerBalanceApi(ApiView):
    """Available balance, holds, overage, credits by kind and the usable grants in
    consumption order (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="customers_balance", responses={200: BalanceSerializer, **errors(404)})
    def get(self, request, external_id: str):
        status, body = balance_body(external_id=external_id)
        return Response(body, status=status)


_CREDITS = Decimal("0.000001")


def _credits(value: Decimal) -> str:
    """As ``credits_field`` shows it (``BalanceSerializer``)."""
    return str((value if type(value) is Decimal else Decimal(value)).quantize(_CREDITS))


def balance_body(*, external_id: str) -> tuple[int, dict]:
    """GET …/balance: (200, the ``BalanceSerializer`` shape, built by hand from one
    statement); 404 ``NotFound`` for an unknown customer."""
    balance = customer_balance(external_id) if len(external_id) <= MAX_ID_LENGTH and storable(external_id) else None
    if balance is None:
        raise customer_not_found(external_id)
    return 200, {
        "customer": external_id,
        "available": _credits(balance.available),
        "ledger_balance": _credits(balance.ledger_balance),
        "held": _credits(balance.held),
        "overage": _credits(balance.overage),
        "by_kind": {kind: _credits(total) for kind, total in balance.by_kind.items()},
        "grants": [
            {"id": g.id, "kind": g.kind, "remaining": _credits(g.remaining), "original": _credits(g.original_amount),
             "priority": g.priority, "effective_at": iso(g.effective_at), "expires_at": iso(g.expires_at),
             "status": g.status, "feature": g.feature_key}
            for g in balance.grants
        ],
        "as_of": iso(balance.as_of),
    }


class CustomerLedgerApi(ApiView):
    """The default wallet's ledger entries, newest first (by sequence), cursor-paginated
    (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="customers_ledger", parameters=PAGE_PARAMETERS,
                   responses={200: LedgerPageSerializer, **errors(400, 404)})
    def get(self, request, external_id: str):
        page = page_request(request.query_params, key_type=int)
        wallet = customer_wallet(external_id)
        entries = LedgerEntry.objects.filter(wallet_id=wallet.pk)
        return Response(paginate(entries, page, key="sequence", descending=True,
                                 represent=lambda entry: LedgerEntrySerializer(entry).data))


class CustomerGrantsApi(ApiView):
    """``GET``: the default wallet's grants, newest first, any status (scope
    ``balance:read``). ``POST``: grant credits (scope ``admin``, ``Idempotency-Key``
    required); above the approval threshold the grant waits in ``pending_approval``
    until someone other than its requester approves it in the admin."""

    scopes = {"GET": (BALANCE_READ,), "POST": (ADMIN,)}

    @extend_schema(operation_id="customers_grants_list", parameters=PAGE_PARAMETERS,
                   responses={200: GrantPageSerializer, **errors(400, 404)})
    def get(self, request, external_id: str):
        page = page_request(request.query_params, key_type=int)
        wallet = customer_wallet(external_id)
        grants = CreditGrant.objects.filter(wallet_id=wallet.pk).select_related("feature")
        customer = wallet.customer

        def represent(grant: CreditGrant) -> dict:
            grant.wallet = wallet
            wallet.customer = customer
            return GrantSerializer(grant).data

        return Response(paginate(grants, page, key="pk", descending=True, represent=represent))

    @extend_schema(operation_id="customers_grants_create", request=GrantCreateInput,
                   parameters=[idempotency_parameter()], responses={201: GrantSerializer, **errors(400, 404, 409)})
    def post(self, request, external_id: str):
        key = idempotency_key(request)
        data = validated(GrantCreateInput, request.data)
        wallet = customer_wallet(external_id)
        feature = active_feature(data["feature"]) if data.get("feature") else None
        label = self.actor_label()

        def perform():
            grant = grant_create(
                wallet=wallet, kind=data["kind"], amount=data["amount"], source=CreditGrant.Source.API,
                expires_at=data.get("expires_at"), effective_at=data.get("effective_at"),
                priority=data["priority"], price_paid=data.get("price_paid") or ZERO, feature=feature,
                reason=data["reason"], actor_label=label, idempotency_key=key,
            )
            grant.wallet = wallet
            return 201, GrantSerializer(grant).data

        return run_idempotent(operation="grants.create", key=key,
                              payload={"customer": external_id, **data}, perform=perform)


class GrantVoidApi(ApiView):
    """Void a grant: its remaining credits leave through a ``void`` ledger entry
    (scope ``admin``). Voiding a voided grant returns it unchanged."""

    scopes = {"POST": (ADMIN,)}

    @extend_schema(operation_id="grants_void", request=GrantVoidInput,
                   responses={200: GrantSerializer, **errors(400, 404, 409)})
    def post(self, request, grant_id: int):
        data = validated(GrantVoidInput, request.data)
        grant = grant_void(grant_id=grant_id, actor_label=self.actor_label(), reason=data["reason"])
        grant = CreditGrant.objects.select_related("wallet__customer", "feature").get(pk=grant.pk)
        return Response(GrantSerializer(grant).data)

