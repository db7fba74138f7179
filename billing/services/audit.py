"""Audit trail: who changed what. Written inside the transaction of the change."""

from __future__ import annotations

from django.db import models

from billing.models import AuditEvent


def _jsonable(value):
    if isinstance(value, models.Model):
        return value.pk
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def audit_record(*, actor=None, actor_label: str = "", action: str, obj: models.Model, changes: dict | None = None):
    return AuditEvent.objects.create(
        actor=actor if actor is not None and getattr(actor, "is_authenticated", False) else None,
        actor_label=actor_label or (getattr(actor, "username", "") if actor is not None else "system"),
        action=action,
        object_type=obj._meta.label_lower,
        object_id=str(obj.pk),
        object_repr=str(obj)[:255],
        changes={key: _jsonable(value) for key, value in (changes or {}).items()},
    )
