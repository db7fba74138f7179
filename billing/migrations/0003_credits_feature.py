"""The built-in ``credits`` feature (1 credit per unit), used when a hold is
captured by amount rather than by a feature's quantity."""

from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations


def create(apps, schema_editor):
    Feature = apps.get_model("billing", "Feature")
    FeatureCost = apps.get_model("billing", "FeatureCost")
    feature, _ = Feature.objects.get_or_create(
        key="credits", defaults={"name": "Credits (captured holds)", "unit": "credit"}
    )
    FeatureCost.objects.get_or_create(
        feature=feature, customer=None, effective_from=datetime(2000, 1, 1, tzinfo=UTC),
        defaults={"credits_per_unit": Decimal(1), "note": "Built in: one credit per credit."},
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_ledger_append_only")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
