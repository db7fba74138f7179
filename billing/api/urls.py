"""/api/v1/ routes, exactly as API.md names them (no trailing slashes)."""

import threading

from django.urls import path, re_path, register_converter
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from billing.api.base import BALANCE_READ, USAGE_WRITE
from billing.api.contracts import ContractDetailApi, ContractListApi, ContractStatementApi
from billing.api.customers import (
    CustomerBalanceApi,
    CustomerCreateApi,
    CustomerDetailApi,
    CustomerGrantsApi,
    CustomerLedgerApi,
    GrantVoidApi,
    balance_body,
)
from billing.api.fast import hot_route
from billing.api.features import FeatureCostCreateApi, FeaturesApi
from billing.api.invoices import CustomerInvoicesApi, InvoiceDetailApi, InvoicePdfApi
from billing.api.payments import PaymentWebhookApi
from billing.api.reservations import (
    ReservationCaptureApi,
    ReservationCreateApi,
    ReservationDetailApi,
    ReservationReleaseApi,
)
from billing.api.subscriptions import (
    CustomerSubscriptionsApi,
    SubscriptionCancelApi,
    SubscriptionChangePlanApi,
    SubscriptionChangePreviewApi,
    SubscriptionDetailApi,
)
from billing.api.usage import UsageBatchApi, UsageChargeApi, UsageCheckApi, charge_batch, charge_one


class RowIdConverter:
    """A primary key that fits PostgreSQL's bigint (longer digit strings are a 404, not a database error)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(RowIdConverter, "rowid")


class PublicSchemaView(SpectacularAPIView):
    """The OpenAPI schema, one generation at a time per process: drf-spectacular loads its
    extensions lazily on the first generation, rewriting class attributes as it goes, and two
    threads generating at once (the web server's pool) can see a half-loaded one (a 500)."""

    authentication_classes: list = []
    permission_classes: list = []
    _generating = threading.Lock()

    def _get_schema_response(self, request):  # (drf-spectacular's; ``get`` keeps its schema decoration)
        with self._generating:
            return super()._get_schema_response(request)


class PublicDocsView(SpectacularSwaggerView):
    authentication_classes: list = []
    permission_classes: list = []


urlpatterns = [
    path("customers", CustomerCreateApi.as_view(), name="api-customers"),
    # external_id may contain "/" (sent as %2F): the suffixed routes come first.
    path("customers/<path:external_id>/balance", hot_route(
        CustomerBalanceApi.as_view(), "GET, HEAD, OPTIONS", "GET", (BALANCE_READ,), balance_body, with_body=False), name="api-customer-balance"),
    path("customers/<path:external_id>/ledger", CustomerLedgerApi.as_view(), name="api-customer-ledger"),
    path("customers/<path:external_id>/grants", CustomerGrantsApi.as_view(), name="api-customer-grants"),
    path("customers/<path:external_id>/subscriptions", CustomerSubscriptionsApi.as_view(),
         name="api-customer-subscriptions"),
    path("customers/<path:external_id>/invoices", CustomerInvoicesApi.as_view(), name="api-customer-invoices"),
    path("customers/<path:external_id>", CustomerDetailApi.as_view(), name="api-customer"),
    path("grants/<rowid:grant_id>/void", GrantVoidApi.as_view(), name="api-grant-void"),
    path("features", FeaturesApi.as_view(), name="api-features"),
    path("features/<str:key>/costs", FeatureCostCreateApi.as_view(), name="api-feature-costs"),
    # The hot routes: plain Django views for the ordinary request, the DRF view for the rest (billing/api/fast.py).
    path("usage", hot_route(UsageChargeApi.as_view(), "POST, OPTIONS", "POST", (USAGE_WRITE,), charge_one,
                            with_body=True), name="api-usage"),
    path("usage/batch", hot_route(UsageBatchApi.as_view(), "POST, OPTIONS", "POST", (USAGE_WRITE,), charge_batch,
                                  with_body=True), name="api-usage-batch"),
    path("usage/check", UsageCheckApi.as_view(), name="api-usage-check"),
    path("reservations", ReservationCreateApi.as_view(), name="api-reservations"),
    path("reservations/<rowid:reservation_id>", ReservationDetailApi.as_view(), name="api-reservation"),
    path("reservations/<rowid:reservation_id>/capture", ReservationCaptureApi.as_view(),
         name="api-reservation-capture"),
    path("reservations/<rowid:reservation_id>/release", ReservationReleaseApi.as_view(),
         name="api-reservation-release"),
    path("contracts", ContractListApi.as_view(), name="api-contracts"),
    path("contracts/<rowid:contract_id>", ContractDetailApi.as_view(), name="api-contract"),
    path("contracts/<rowid:contract_id>/statement", ContractStatementApi.as_view(), name="api-contract-statement"),
    path("subscriptions/<rowid:subscription_id>", SubscriptionDetailApi.as_view(), name="api-subscription"),
    path("subscriptions/<rowid:subscription_id>/cancel", SubscriptionCancelApi.as_view(),
         name="api-subscription-cancel"),
    path("subscriptions/<rowid:subscription_id>/change-plan", SubscriptionChangePlanApi.as_view(),
         name="api-subscription-change-plan"),
    path("subscriptions/<rowid:subscription_id>/change-plan/preview", SubscriptionChangePreviewApi.as_view(),
         name="api-subscription-change-plan-preview"),
    path("invoices/<str:number>", InvoiceDetailApi.as_view(), name="api-invoice"),
    path("invoices/<str:number>/pdf", InvoicePdfApi.as_view(), name="api-invoice-pdf"),
    path("payments/webhook", PaymentWebhookApi.as_view(), name="api-payments-webhook"),
    re_path(r"^schema/?$", PublicSchemaView.as_view(), name="api-schema"),
    re_path(r"^docs/?$", PublicDocsView.as_view(url_name="api-schema"), name="api-docs"),
]
