"""Enterprise contracts over the API (scope ``balance:read``): the list of a
customer's contracts, one contract with its instalments and true-ups, and its
true-up statement — committed, consumed to date, projected consumption at the
true-up date and at term end, projected true-up amount. Credits and money are
decimal strings."""

from __future__ import annotations

from decimal import Decimal

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from billing.api.base import BALANCE_READ, ApiView, customer_not_found, errors
from billing.api.inputs import MAX_ID_LENGTH, AwareDateTimeField, DecimalStringField, storable
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import credits_field, money_field, rate_field
from billing.errors import NotFound
from billing.models import Contract, Customer
from billing.services.contracts import contract_statement


def percent_field(**kwargs) -> DecimalStringField:
    return DecimalStringField(places=2, maximum=Decimal(100), allow_zero=True, **kwargs)


class ContractInstalmentSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    due_at = AwareDateTimeField()
    credits = credits_field()
    unit_price = rate_field(help_text="Effective price per credit, fixed when released.")
    amount = money_field()
    invoice = serializers.CharField(source="invoice.number", allow_null=True, default=None)
    grant = serializers.IntegerField(source="grant_id", allow_null=True)
    released_at = AwareDateTimeField(allow_null=True)


class TrueUpSerializer(serializers.Serializer):
    period_start = AwareDateTimeField()
    period_end = AwareDateTimeField(help_text="The true-up date.")
    committed = credits_field()
    consumed = credits_field()
    overage_credits = credits_field()
    unit_price = rate_field()
    amount = money_field()
    invoice = serializers.CharField(source="invoice.number", allow_null=True, default=None)
    settled_at = AwareDateTimeField(allow_null=True)


class ContractSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    reference = serializers.CharField()
    customer = serializers.CharField(source="customer.external_id")
    status = serializers.CharField()
    starts_at = AwareDateTimeField()
    ends_at = AwareDateTimeField()
    committed_credits = credits_field(help_text="Per contract year.")
    currency = serializers.CharField()


class ContractSerializer(ContractSummarySerializer):
    commitment = serializers.CharField(help_text="credits or spend (per contract year)")
    committed_spend = money_field()
    list_price = rate_field()
    discount_percent = percent_field()
    payment_schedule = serializers.CharField()
    true_up_cadence = serializers.CharField()
    true_up_price = rate_field(allow_null=True, help_text="Null: the effective contract price.")
    rollover_percent = percent_field()
    instalments = ContractInstalmentSerializer(many=True)
    true_ups = TrueUpSerializer(many=True)


class ContractPageSerializer(serializers.Serializer):
    results = ContractSummarySerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class ContractStatementSerializer(serializers.Serializer):
    contract = serializers.IntegerField(source="contract.id")
    currency = serializers.CharField(source="contract.currency")
    as_of = AwareDateTimeField()
    period_start = AwareDateTimeField()
    period_end = AwareDateTimeField(help_text="The next (or last) true-up date.")
    committed = credits_field(help_text="Credits committed for the true-up period.")
    consumed = credits_field(help_text="Credits consumed in the period so far.")
    burn_rate_per_day = credits_field()
    projected_consumption = credits_field(help_text="At the true-up date, at the burn rate so far.")
    outstanding_overage = credits_field()
    credits_available = credits_field(help_text="Usable credits in the pooled wallet now.")
    credits_to_release = credits_field(help_text="Instalment credits still to come before the true-up date.")
    projected_overage = credits_field()
    true_up_price = rate_field()
    projected_true_up_amount = money_field()
    effective_price = rate_field()
    term_end = AwareDateTimeField()
    term_committed = credits_field()
    term_consumed = credits_field()
    projected_term_consumption = credits_field()


def _contract(contract_id: int, prefetch: tuple[str, ...] = ()) -> Contract:
    contract = Contract.objects.select_related("customer").prefetch_related(*prefetch).filter(pk=contract_id).first()
    if contract is None:
        raise NotFound(f"No contract #{contract_id}.", details={"contract": "not found"})
    return contract


class ContractListApi(ApiView):
    """Contracts, newest first; ``?customer=<external_id>`` for one customer's (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="contracts_list", parameters=[
        *PAGE_PARAMETERS,
        OpenApiParameter("customer", OpenApiTypes.STR, OpenApiParameter.QUERY, description="external_id"),
    ], responses={200: ContractPageSerializer, **errors(400, 404)})
    def get(self, request):
        page = page_request(request.query_params, key_type=int)
        contracts = Contract.objects.select_related("customer")
        external_id = request.query_params.get("customer")
        if external_id is not None:
            customer = None
            if len(external_id) <= MAX_ID_LENGTH and storable(external_id):
                customer = Customer.objects.filter(external_id=external_id).first()
            if customer is None:
                raise customer_not_found(external_id)
            contracts = contracts.filter(customer=customer)
        return Response(paginate(contracts, page, key="pk", descending=True,
                                 represent=lambda c: ContractSummarySerializer(c).data))


class ContractDetailApi(ApiView):
    """One contract with its instalments and true-ups (scope ``balance:read``)."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="contracts_retrieve", responses={200: ContractSerializer, **errors(404)})
    def get(self, request, contract_id: int):
        contract = _contract(contract_id, prefetch=("instalments__invoice", "true_ups__invoice"))
        return Response(ContractSerializer(contract).data)


class ContractStatementApi(ApiView):
    """The contract's true-up statement as of now (scope ``balance:read``); a
    draft contract has none yet: 400 ``invalid_request``."""

    scopes = {"GET": (BALANCE_READ,)}

    @extend_schema(operation_id="contracts_statement",
                   responses={200: ContractStatementSerializer, **errors(400, 404)})
    def get(self, request, contract_id: int):
        statement = contract_statement(contract=_contract(contract_id))
        return Response(ContractStatementSerializer(statement).data)
