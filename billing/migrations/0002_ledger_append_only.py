"""The ledger is append-only, enforced by PostgreSQL: UPDATE, DELETE and TRUNCATE
on ledger entries raise an error whatever the client (DESIGN.md §4.5)."""

from django.db import migrations

SQL = """
CREATE OR REPLACE FUNCTION creditdesk_refuse_ledger_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only: % refused on %', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_ledgerentry_append_only
    BEFORE UPDATE OR DELETE ON billing_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION creditdesk_refuse_ledger_change();

CREATE TRIGGER billing_ledgerentry_no_truncate
    BEFORE TRUNCATE ON billing_ledgerentry
    FOR EACH STATEMENT EXECUTE FUNCTION creditdesk_refuse_ledger_change();
"""

REVERSE = """
DROP TRIGGER IF EXISTS billing_ledgerentry_no_truncate ON billing_ledgerentry;
DROP TRIGGER IF EXISTS billing_ledgerentry_append_only ON billing_ledgerentry;
DROP FUNCTION IF EXISTS creditdesk_refuse_ledger_change();
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunSQL(SQL, REVERSE)]
