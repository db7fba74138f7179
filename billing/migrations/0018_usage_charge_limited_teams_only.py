"""``creditdesk_usage_charge`` defers to the Python engine only for an event whose
team has a limit on the wallet (migration 0011 deferred every event with a team
on a wallet with limits): a pooled wallet's unlimited teams keep the one-statement
path. The limit is looked up after the wallet lock, which ``team_limit_set`` and
``team_limit_remove`` also take, so it cannot change under the charge.
"""

import importlib

from django.db import migrations

SQL = r"""CREATE OR REPLACE FUNCTION creditdesk_usage_charge(
    p_customer_id bigint, p_wallet_id bigint, p_feature_id bigint, p_event_id text, p_quantity numeric,
    p_occurred_at timestamptz, p_properties jsonb, p_request_hash text, p_now timestamptz,
    p_entries_at timestamptz, p_precision integer,
    OUT outcome text, OUT credits numeric, OUT available numeric, OUT ledger_after numeric,
    OUT grant_ids bigint[], OUT takes numeric[], OUT over numeric, OUT paused_reason text,
    OUT prior_status text, OUT prior_response text, OUT prior_credits numeric, OUT prior_hash_matches boolean
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_prior record;
    v_rate record;
    v_wallet record;
    v_grant record;
    v_locked bigint[];
    v_exact numeric;
    v_usable numeric;
    v_held numeric;
    v_borrow numeric;
    v_left numeric;
    v_take numeric;
    v_taken numeric := 0;
    v_after numeric;
    v_shown numeric;
    v_seq bigint;
    v_balance numeric;
    v_event bigint;
    v_response jsonb;
    v_reference text := left('usage:' || p_event_id, 255);
    i integer;
BEGIN
    -- 1. The event id: serialise on it, then replay a prior answer.
    PERFORM pg_advisory_xact_lock(p_customer_id::integer, hashtext(p_event_id));
    SELECT u.status, u.request_hash, u.response::text AS response, u.credits INTO v_prior
      FROM billing_usageevent u WHERE u.customer_id = p_customer_id AND u.event_id = p_event_id;
    IF FOUND THEN
        outcome := 'duplicate';
        prior_status := v_prior.status;
        prior_response := v_prior.response;
        prior_credits := v_prior.credits;
        prior_hash_matches := v_prior.request_hash = p_request_hash;
        RETURN;
    END IF;

    -- 2. Price it: the customer's override effective then, else the rate card; rounded once.
    SELECT c.id, c.credits_per_unit INTO v_rate FROM billing_featurecost c
     WHERE c.feature_id = p_feature_id AND c.customer_id = p_customer_id AND c.effective_from <= p_occurred_at
     ORDER BY c.effective_from DESC, c.id DESC LIMIT 1;
    IF NOT FOUND THEN
        SELECT c.id, c.credits_per_unit INTO v_rate FROM billing_featurecost c
         WHERE c.feature_id = p_feature_id AND c.customer_id IS NULL AND c.effective_from <= p_occurred_at
         ORDER BY c.effective_from DESC, c.id DESC LIMIT 1;
        IF NOT FOUND THEN
            outcome := 'no_rate';
            RETURN;
        END IF;
    END IF;
    v_exact := p_quantity * v_rate.credits_per_unit;
    -- Python multiplies in a p_precision-digit context: exact only if the significant digits fit.
    IF length(trim(BOTH '0' FROM replace(trim_scale(abs(v_exact))::text, '.', ''))) > p_precision THEN
        outcome := 'fallback';
        RETURN;
    END IF;
    credits := round(v_exact, 6);
    IF abs(credits) >= 1e14 THEN
        outcome := 'fallback';
        RETURN;
    END IF;

    -- 3. Locks: the wallet's usable grants in primary-key order, then the wallet.
    SELECT array_agg(g.id ORDER BY g.id) INTO v_locked FROM (
        SELECT id FROM billing_creditgrant
         WHERE wallet_id = p_wallet_id AND status = 'active' AND effective_at <= p_now AND remaining > 0
           AND (expires_at IS NULL OR expires_at > p_now)
         ORDER BY id FOR UPDATE
    ) g;
    SELECT w.policy, w.credit_limit, w.overage, w.ledger_balance, w.last_sequence, w.status, w.paused_reason,
           w.alert_below, w.alert_at_or_above, w.has_team_limits
      INTO v_wallet FROM billing_wallet w WHERE w.id = p_wallet_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'fallback';
        RETURN;
    END IF;
    -- A team's spending limit is the Python engine's to check (billing.services.team_limits).
    IF v_wallet.has_team_limits AND jsonb_typeof(p_properties -> 'team') = 'string' AND EXISTS (
        SELECT 1 FROM billing_teamspendinglimit t WHERE t.wallet_id = p_wallet_id AND t.team = p_properties ->> 'team'
    ) THEN
        outcome := 'fallback';
        RETURN;
    END IF;

    -- 4. Available = usable remaining (in scope) - open holds + overdraft headroom.
    SELECT sum(r.amount) INTO v_held FROM billing_reservation r
     WHERE r.wallet_id = p_wallet_id AND r.status = 'open' AND r.expires_at > p_now;
    v_held := coalesce(v_held, 0);
    SELECT sum(g.remaining) INTO v_usable FROM billing_creditgrant g
     WHERE g.id = ANY (v_locked) AND (g.feature_id IS NULL OR g.feature_id = p_feature_id);
    v_usable := coalesce(v_usable, 0);
    v_borrow := 0;
    IF v_wallet.policy = 'overdraft' THEN
        v_borrow := v_wallet.credit_limit - v_wallet.overage - 0;
        IF 0 > v_borrow THEN
            v_borrow := 0;
        END IF;
    END IF;
    available := v_usable - v_held + v_borrow;

    IF v_wallet.status = 'paused' THEN
        outcome := 'paused';
        paused_reason := v_wallet.paused_reason;
        RETURN;
    END IF;

    IF credits > available THEN
        v_shown := round(CASE WHEN 0 > available THEN 0 ELSE available END, 6);
        v_response := jsonb_build_object('error', jsonb_build_object(
            'code', 'insufficient_credits',
            'message', format('The wallet has %s credits available; this event needs %s.', v_shown, credits),
            'details', jsonb_build_object('required', credits::text, 'available', v_shown::text,
                                          'event_id', p_event_id)));
        INSERT INTO billing_usageevent (customer_id, wallet_id, feature_id, event_id, quantity, occurred_at,
            properties, rate_id, credits_per_unit, credits, status, request_hash, response, reservation_id,
            created_at)
        VALUES (p_customer_id, p_wallet_id, p_feature_id, p_event_id, p_quantity, p_occurred_at, p_properties,
            v_rate.id, v_rate.credits_per_unit, credits, 'rejected', p_request_hash, v_response, NULL, p_now);
        outcome := 'rejected';
        RETURN;
    END IF;

    -- A crossing of an alert mark calls Python subscribers: leave that to the Python engine.
    v_after := available - credits;
    IF (v_wallet.alert_below IS NOT NULL AND available >= v_wallet.alert_below AND v_wallet.alert_below > v_after)
       OR (v_wallet.alert_at_or_above IS NOT NULL AND available < v_wallet.alert_at_or_above
           AND v_wallet.alert_at_or_above <= v_after) THEN
        outcome := 'fallback';
        RETURN;
    END IF;

    -- 5. Allocate in consumption order, never more than usable minus held from grants.
    v_left := v_usable - v_held;
    IF 0 > v_left THEN
        v_left := 0;
    END IF;
    IF v_left >= credits THEN
        v_left := credits;
    END IF;
    grant_ids := '{}';
    takes := '{}';
    FOR v_grant IN
        SELECT g.id, g.remaining FROM billing_creditgrant g
         WHERE g.id = ANY (v_locked) AND (g.feature_id IS NULL OR g.feature_id = p_feature_id)
         ORDER BY g.priority, g.expires_at ASC NULLS LAST, g.per_unit_cost_basis, g.effective_at, g.created_at, g.id
    LOOP
        EXIT WHEN v_left <= 0;
        v_take := CASE WHEN v_left < v_grant.remaining THEN v_left ELSE v_grant.remaining END;
        v_left := v_left - v_take;
        v_taken := v_taken + v_take;
        grant_ids := grant_ids || v_grant.id;
        takes := takes || v_take;
    END LOOP;
    over := credits - v_taken;
    ledger_after := v_wallet.ledger_balance - v_taken - CASE WHEN over > 0 THEN over ELSE 0 END;

    v_response := jsonb_build_object(
        'event_id', p_event_id, 'status', 'charged', 'credits', credits::text,
        'allocations', coalesce((SELECT jsonb_agg(jsonb_build_object('grant', a.id, 'amount', a.take::text)
                                                  ORDER BY a.n)
                                   FROM unnest(grant_ids, takes) WITH ORDINALITY AS a(id, take, n)), '[]'::jsonb)
                       || CASE WHEN over > 0
                               THEN jsonb_build_array(jsonb_build_object('grant', NULL, 'amount', over::text,
                                                                         'overage', true))
                               ELSE '[]'::jsonb END,
        'balance', jsonb_build_object('available', v_after::text, 'ledger_balance', ledger_after::text));
    INSERT INTO billing_usageevent (customer_id, wallet_id, feature_id, event_id, quantity, occurred_at,
        properties, rate_id, credits_per_unit, credits, status, request_hash, response, reservation_id, created_at)
    VALUES (p_customer_id, p_wallet_id, p_feature_id, p_event_id, p_quantity, p_occurred_at, p_properties,
        v_rate.id, v_rate.credits_per_unit, credits, 'charged', p_request_hash, v_response, NULL, p_now)
    RETURNING id INTO v_event;

    IF cardinality(grant_ids) > 0 THEN
        UPDATE billing_creditgrant g
           SET remaining = g.remaining - a.take,
               status = CASE WHEN g.remaining - a.take = 0 THEN 'depleted' ELSE g.status END
          FROM unnest(grant_ids, takes) AS a(id, take)
         WHERE g.id = a.id;
    END IF;

    -- 6. The ledger: one entry per grant touched, then the overage; the wallet's balance last.
    IF cardinality(grant_ids) > 0 OR over > 0 THEN
        v_seq := v_wallet.last_sequence;
        v_balance := v_wallet.ledger_balance;
        FOR i IN 1 .. cardinality(grant_ids) LOOP
            v_seq := v_seq + 1;
            v_balance := v_balance - takes[i];
            INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after,
                usage_event_id, reservation_id, reference, idempotency_key, memo, created_at)
            VALUES (p_wallet_id, grant_ids[i], 'usage', -takes[i], v_seq, v_balance, v_event, NULL, v_reference,
                '', '', p_entries_at);
        END LOOP;
        IF over > 0 THEN
            v_seq := v_seq + 1;
            v_balance := v_balance - over;
            INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after,
                usage_event_id, reservation_id, reference, idempotency_key, memo, created_at)
            VALUES (p_wallet_id, NULL, 'overage', -over, v_seq, v_balance, v_event, NULL, v_reference, '', '',
                p_entries_at);
        END IF;
        UPDATE billing_wallet
           SET ledger_balance = v_balance, last_sequence = v_seq,
               overage = overage + CASE WHEN over > 0 THEN over ELSE 0 END
         WHERE id = p_wallet_id;
    END IF;
    outcome := 'charged';
END;
$fn$;
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0017_credit_note_email")]
    # Reversed: the function as migration 0011 left it.
    operations = [migrations.RunSQL(SQL, importlib.import_module("billing.migrations.0011_usage_charge_team_limits").SQL)]
