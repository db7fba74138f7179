"""Reservations: hold credits, then capture (one usage charge) or release."""

from __future__ import annotations

from django.db import transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from billing.api.base import (
    BALANCE_READ,
    USAGE_WRITE,
    ApiView,
    active_feature,
    customer_wallet,
    errors,
    validated,
)
from billing.api.idempotency import idempotency_key, idempotency_parameter, run_idempotent
from billing.api.serializers import (
    ErrorSerializer,
    ReservationCaptureInput,
    ReservationCreateInput,
    ReservationSerializer,
    UsageChargeSerializer,
)
from billing.errors import Conflict, NotFound
from billing.models import Reservation, UsageEvent
from billing.services.locks import lock_key
from billing.services.reservations import reservation_capture, reservation_create, reservation_release


def load_reservation(reservation_id: int) -> Reservation:
    reservation = Reservation.objects.select_related("customer", "feature").filter(pk=reservation_id).first()
    if reservation is None:
        raise NotFound(f"No reservation {reservation_id}.", details={"reservation": "not found"})
    return reservation


class ReservationCreateApi(ApiView):
    """Hold ``amount`` credits, or ``quantity`` of ``feature`` at today's cost, for
    ``ttl_seconds`` (default 900). Scope ``usage:write``; ``Idempotency-Key``
    required. Does not fit the available balance: 402, nothing held."""

    scopes = {"POST": (USAGE_WRITE,)}

    @extend_schema(operation_id="reservations_create", request=ReservationCreateInput,
                   parameters=[idempotency_parameter()],
                   responses={201: ReservationSerializer, **errors(400, 402, 404, 409)})
    def post(self, request):
        key = idempotency_key(request)
        data = validated(ReservationCreateInput, request.data)
        wallet = customer_wallet(data["customer"])
        feature = active_feature(data["feature"]) if "feature" in data else None

        def perform():
            reservation = reservation_create(
                customer=wallet.customer, wallet_id=wallet.pk, amount=data.get("amount"), feature=feature,
                quantity=data.get("quantity"), ttl_seconds=data["ttl_seconds"], idempotency_key=key,
            )
            return 201, ReservationSerializer(reservation).data

        return run_idempotent(operation="reservations.create", key=key, payload=dict(data), perform=perform)


class ReservationDetailApi(ApiView):
    """One hold and its status (scope ``usage:write`` or ``balance:read``)."""

    scopes = {"GET": (USAGE_WRITE, BALANCE_READ)}

    @extend_schema(operation_id="reservations_retrieve", responses={200: ReservationSerializer, **errors(404)})
    def get(self, request, reservation_id: int):
        return Response(ReservationSerializer(load_reservation(reservation_id)).data)


class ReservationCaptureApi(ApiView):
    """Charge the actual usage of a hold — ``quantity`` (priced by the hold's
    feature) or ``amount`` (credits) — under ``event_id``, and close the hold
    whatever the amount (scope ``usage:write``). The answer is the usage result;
    a replay of the ``event_id`` returns it again. A hold that expired, was
    released or was captured under another event id: 409 ``conflict``."""

    scopes = {"POST": (USAGE_WRITE,)}

    @extend_schema(operation_id="reservations_capture", request=ReservationCaptureInput, responses={
        201: UsageChargeSerializer, **errors(400, 404),
        402: OpenApiResponse(ErrorSerializer, description="The capture does not fit; the hold stays open"),
        409: OpenApiResponse(ErrorSerializer, description="conflict (hold not open) or idempotency_conflict"),
    })
    def post(self, request, reservation_id: int):
        data = validated(ReservationCaptureInput, request.data)
        with transaction.atomic():
            # One capture of a hold at a time; a hold captured under another event id
            # is refused here, before the charge engine sees it.
            lock_key("reservations.capture", str(reservation_id))
            reservation = load_reservation(reservation_id)
            if reservation.status == Reservation.Status.CAPTURED and not UsageEvent.objects.filter(
                    pk=reservation.usage_event_id, event_id=data["event_id"]).exists():
                raise Conflict("The reservation was already captured under another event_id.",
                               details={"reservation": reservation.pk})
            result = reservation_capture(
                reservation=reservation, event_id=data["event_id"], quantity=data.get("quantity"),
                amount=data.get("amount"), properties=data["properties"],
            )
        return Response(result.body, status=result.http_status)


class ReservationReleaseApi(ApiView):
    """Release a hold (scope ``usage:write``): 200 with ``"status": "released"``
    (``expired`` if it had already run out). A captured hold: 409 ``conflict``."""

    scopes = {"POST": (USAGE_WRITE,)}

    @extend_schema(operation_id="reservations_release", request=None,
                   responses={200: ReservationSerializer, **errors(404, 409)})
    def post(self, request, reservation_id: int):
        reservation = reservation_release(reservation_id=reservation_id)
        return Response(ReservationSerializer(load_reservation(reservation.pk)).data)
