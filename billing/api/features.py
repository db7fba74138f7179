"""Features and their credit costs."""

from __future__ import annotations

from django.db.models import OuterRef, Subquery
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from billing.api.base import ADMIN, BALANCE_READ, ApiView, active_feature, customer_wallet, errors, validated
from billing.api.pagination import PAGE_PARAMETERS, page_request, paginate
from billing.api.serializers import (
    FeatureCostCreateInput,
    FeatureCostSerializer,
    FeatureCreateInput,
    FeaturePageSerializer,
    FeatureSerializer,
)
from billing.models import Feature, FeatureCost
from billing.services.features import feature_cost_create, feature_create


class FeaturesApi(ApiView):
    """``GET``: features with the rate card's credit cost in force now, by key
    (scope ``balance:read``). ``POST``: create a feature with its first credit
    cost (scope ``admin``); an existing key is a 409 ``conflict``."""

    scopes = {"GET": (BALANCE_READ,), "POST": (ADMIN,)}

    @extend_schema(operation_id="features_list", parameters=PAGE_PARAMETERS,
                   responses={200: FeaturePageSerializer, **errors(400)})
    def get(self, request):
        page = page_request(request.query_params, key_type=str)
        current = FeatureCost.objects.filter(
            feature=OuterRef("pk"), customer__isnull=True, effective_from__lte=timezone.now()
        ).order_by("-effective_from", "-pk").values("credits_per_unit")[:1]
        features = Feature.objects.annotate(credits_per_unit=Subquery(current))
        return Response(paginate(features, page, key="key", descending=False,
                                 represent=lambda feature: FeatureSerializer(feature).data))

    @extend_schema(operation_id="features_create", request=FeatureCreateInput,
                   responses={201: FeatureSerializer, **errors(400, 409)})
    def post(self, request):
        data = validated(FeatureCreateInput, request.data)
        feature = feature_create(
            key=data["key"], name=data["name"], unit=data["unit"], credits_per_unit=data["credits_per_unit"],
            effective_from=data.get("effective_from"), allow_zero_quantity=data["allow_zero_quantity"],
            actor_label=self.actor_label(),
        )
        feature.credits_per_unit = data["credits_per_unit"]
        return Response(FeatureSerializer(feature).data, status=201)


class FeatureCostCreateApi(ApiView):
    """Add a credit cost version, effective from ``effective_from`` (default now,
    never in the past), for the rate card or, with ``customer``, as that customer's
    override (scope ``admin``). Charges already made keep their price."""

    scopes = {"POST": (ADMIN,)}

    @extend_schema(operation_id="features_costs_create", request=FeatureCostCreateInput,
                   responses={201: FeatureCostSerializer, **errors(400, 404, 409)})
    def post(self, request, key: str):
        data = validated(FeatureCostCreateInput, request.data)
        feature = active_feature(key, active_only=False)
        customer = customer_wallet(data["customer"]).customer if data.get("customer") else None
        cost = feature_cost_create(
            feature=feature, credits_per_unit=data["credits_per_unit"], effective_from=data.get("effective_from"),
            customer=customer, note=data["note"], actor_label=self.actor_label(),
        )
        return Response(FeatureCostSerializer(cost).data, status=201)
