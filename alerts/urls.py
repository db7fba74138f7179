"""/api/v1/alerts/ routes (mounted from config/urls.py)."""

from django.urls import path

from alerts.api import CustomerAlertRulesApi, CustomerAutoTopUpApi, WebhookDeliveriesApi

urlpatterns = [
    path("alerts/customers/<path:external_id>/rules", CustomerAlertRulesApi.as_view(), name="api-alerts-rules"),
    path("alerts/customers/<path:external_id>/auto-top-up", CustomerAutoTopUpApi.as_view(),
         name="api-alerts-auto-top-up"),
    path("alerts/webhook-deliveries", WebhookDeliveriesApi.as_view(), name="api-alerts-webhook-deliveries"),
]
