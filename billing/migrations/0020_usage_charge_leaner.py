"""``creditdesk_usage_charge`` with fewer and cheaper statements: same signature, outputs,
decisions and rows as migration 0018's (work in progress: for now 0018's SQL unchanged).
"""

import importlib

from django.db import migrations

_0018 = importlib.import_module("billing.migrations.0018_usage_charge_limited_teams_only")

SQL = _0018.SQL


class Migration(migrations.Migration):
    dependencies = [("billing", "0019_usage_charge_batch_function")]
    # Reversed: the function as migration 0018 left it.
    operations = [migrations.RunSQL(SQL, _0018.SQL)]
