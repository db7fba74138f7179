from django.apps import AppConfig

ALERTS_MODELS = (
    "alertsprofile", "alertrule", "alertlevel", "alertstate", "webhookendpoint", "notification", "webhookdelivery",
    "notificationattempt", "autotopup", "autotopuprun", "pendingtopupapproval",
)


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts and notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Subscribe to billing's hooks (billing never imports alerts) and give
        the roles their alerts permissions: Finance everything, Support and Auditor read."""
        from django.db.models.signals import post_migrate

        from alerts.services import subscribers
        from alerts.services.evaluation import on_balance_crossed
        from billing import events, roles

        events.on_balance_crossed(on_balance_crossed)
        events.subscribe("grant.activated", subscribers.on_grant_activated)
        events.subscribe("grant.expired", subscribers.on_grant_expired)
        events.subscribe("wallet.paused", subscribers.on_wallet_paused)
        events.subscribe("wallet.resumed", subscribers.on_wallet_resumed)
        events.subscribe("invoice.payment_failed", subscribers.on_invoice_payment_failed)

        view = [f"alerts.view_{m}" for m in ALERTS_MODELS]
        roles.extend_role(roles.FINANCE, view + [f"alerts.{action}_{m}" for m in ALERTS_MODELS
                                                  for action in ("add", "change", "delete")])
        roles.extend_role(roles.SUPPORT, view)
        roles.extend_role(roles.AUDITOR, view)
        # Our permissions exist only after our own post_migrate: assign them then.
        post_migrate.connect(roles.ensure_roles_after_migrate, sender=self)
