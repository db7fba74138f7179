"""What every API view shares: the parser, scopes, look-ups by public id."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework.views import APIView

from billing.api.auth import ApiKeyRateThrottle
from billing.api.inputs import MAX_ID_LENGTH, DecimalJSONParser, storable
from billing.api.serializers import ErrorSerializer
from billing.errors import InvalidRequest, NotFound
from billing.models import ApiKey, Feature, Wallet

USAGE_WRITE = ApiKey.Scope.USAGE_WRITE.value
BALANCE_READ = ApiKey.Scope.BALANCE_READ.value
ADMIN = ApiKey.Scope.ADMIN.value


class ApiView(APIView):
    """Base view: exact-decimal JSON in, JSON out; ``scopes`` maps method → accepted scopes."""

    parser_classes = [DecimalJSONParser]
    throttle_classes = [ApiKeyRateThrottle]
    scopes: dict[str, tuple[str, ...]] = {}

    def actor_label(self) -> str:
        return self.request.auth.label


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """OpenAPI responses for the error envelope under ``statuses`` (401, 403 and 429 always)."""
    described = {400: "Invalid request (details name the field)", 401: "No, unknown or revoked API key",
                 402: "Insufficient credits", 403: "The key lacks the scope", 404: "Not found",
                 409: "Conflict or idempotency conflict", 429: "rate_limited: over the key's request rate",
                 503: "not_configured: the server lacks the setting this endpoint needs"}
    return {status: OpenApiResponse(ErrorSerializer, description=described.get(status, "Error"))
            for status in sorted({401, 403, 429, *statuses})}


def customer_wallet(external_id: str) -> Wallet:
    """The customer's default wallet, with the customer, in one query; 404 if unknown."""
    wallet = None
    if len(external_id) <= MAX_ID_LENGTH and storable(external_id):
        wallet = Wallet.objects.select_related("customer").filter(
            customer__external_id=external_id, is_default=True).first()
    if wallet is None:
        raise customer_not_found(external_id)
    return wallet


def customer_not_found(external_id: str) -> NotFound:
    return NotFound(f"No customer with external_id {external_id!r}."[:300], details={"customer": "not found"})


def active_feature(key: str, *, field: str = "feature", active_only: bool = True) -> Feature:
    feature = None
    if len(key) <= 100 and storable(key):
        features = Feature.objects.filter(key=key)
        feature = (features.filter(active=True) if active_only else features).first()
    if feature is None:
        raise NotFound(f"No {'active ' if active_only else ''}feature with key {key!r}."[:300],
                       details={field: "not found"})
    return feature


def validated(serializer_class, data, **kwargs) -> dict:
    """Run an input serializer; a non-object body or invalid field raises a 400 naming it."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", details={"body": "must be a JSON object"})
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
