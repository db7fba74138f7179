"""``creditdesk_usage_charge_by_key``: one event charged by the customer's external id and the
feature's key, in one statement — resolves the customer's default wallet and the active
feature (as ``billing.api.usage.resolve`` does), refuses a zero quantity the feature does
not allow, then calls ``creditdesk_usage_charge``. ``resolved`` says how far it got:
``no_customer``, ``no_feature`` and ``zero_quantity`` write nothing (the caller answers
them through the ordinary path, which words the refusal); ``ok`` carries the charge's
outputs. Saves the API a round trip (or a stale cache entry) per event.
"""

from django.db import migrations

SQL = r"""CREATE OR REPLACE FUNCTION creditdesk_usage_charge_by_key(
    p_customer text, p_feature text, p_event_id text, p_quantity numeric, p_occurred_at timestamptz,
    p_properties jsonb, p_request_hash text, p_now timestamptz, p_entries_at timestamptz, p_precision integer,
    OUT resolved text, OUT customer_id bigint, OUT wallet_id bigint, OUT feature_id bigint,
    OUT outcome text, OUT credits numeric, OUT available numeric, OUT ledger_after numeric,
    OUT grant_ids bigint[], OUT takes numeric[], OUT over numeric, OUT paused_reason text,
    OUT prior_status text, OUT prior_response text, OUT prior_credits numeric, OUT prior_hash_matches boolean
) LANGUAGE plpgsql
-- As creditdesk_usage_charge (0020): its two look-ups planned once per session, not on every call.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_allow_zero boolean;
BEGIN
    SELECT w.id, c.id INTO wallet_id, customer_id
      FROM billing_customer c JOIN billing_wallet w ON w.customer_id = c.id AND w.is_default
     WHERE c.external_id = p_customer;
    IF NOT FOUND THEN
        resolved := 'no_customer';
        RETURN;
    END IF;
    SELECT f.id, f.allow_zero_quantity INTO feature_id, v_allow_zero
      FROM billing_feature f WHERE f.key = p_feature AND f.active;
    IF NOT FOUND THEN
        resolved := 'no_feature';
        RETURN;
    END IF;
    IF p_quantity = 0 AND NOT v_allow_zero THEN
        resolved := 'zero_quantity';
        RETURN;
    END IF;
    resolved := 'ok';
    SELECT c.outcome, c.credits, c.available, c.ledger_after, c.grant_ids, c.takes, c.over, c.paused_reason,
           c.prior_status, c.prior_response, c.prior_credits, c.prior_hash_matches
      INTO outcome, credits, available, ledger_after, grant_ids, takes, over, paused_reason,
           prior_status, prior_response, prior_credits, prior_hash_matches
      FROM creditdesk_usage_charge(customer_id, wallet_id, feature_id, p_event_id, p_quantity, p_occurred_at,
                                   p_properties, p_request_hash, p_now, p_entries_at, p_precision) AS c;
END;
$fn$;
"""

REVERSE = """DROP FUNCTION IF EXISTS creditdesk_usage_charge_by_key(
    text, text, text, numeric, timestamptz, jsonb, text, timestamptz, timestamptz, integer);"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0021_usage_charge_batch_leaner")]
    operations = [migrations.RunSQL(SQL, REVERSE)]
