"""``creditdesk_usage_charge_batch`` takes the event-id locks and the replay look-up
too, and reads typed arrays instead of one jsonb document.

A batch repeats the same few payloads (customer, wallet, feature, quantity,
occurred_at, properties, rate, credits, request hash) over many event ids, so the
caller (billing/services/usage.py ``_charge_in_database``) sends each distinct
payload once (the ``s_*`` arrays, a "shape") and, per event, only its shape and
its event id. Each (customer, event id) comes once: same-batch repeats are the
caller's. In one statement, in this order:

1. an advisory lock per (customer, event id), in (customer, event id) order (the
   lock ``creditdesk_usage_charge`` and the Python engine take);
2. the events already stored: one ``duplicate`` row each, with the stored status,
   hash, answer and credits (the caller replays or refuses them);
3. the rest whose shape has credits (a priced event; the caller answers the
   unpriced ones) are decided exactly as migration 0019's function decides them:
   locks on the usable grants of their wallets then the wallets, in primary-key
   order; a last ``fallback`` row, having written nothing, when a limited team is
   involved; each event in input order, all-or-nothing, in DESIGN.md §3
   consumption order; one ``charged``, ``rejected`` (stored) or ``paused`` (not
   stored) row each; then the usage events, ledger entries, grants and wallets
   written in one statement each.

Row ``r_n`` is the event's 1-based position in ``p_event``. A charged row's
``r_response`` is the JSON text of its first answer, keys in the order the Python
engine writes them (what is stored, as jsonb); the caller parses it only if read.
"""

import importlib

from django.db import migrations

_0019 = importlib.import_module("billing.migrations.0019_usage_charge_batch_function")

_SIGNATURE = (
    "creditdesk_usage_charge_batch(integer[], text[], bigint[], bigint[], bigint[], text[], text[], text[], bigint[],"
    " text[], text[], text[], timestamptz, timestamptz)"
)

SQL = (
    "DROP FUNCTION IF EXISTS creditdesk_usage_charge_batch(jsonb, timestamptz, timestamptz);\n"
    f"DROP FUNCTION IF EXISTS {_SIGNATURE};\n"
    + r"""CREATE FUNCTION creditdesk_usage_charge_batch(
    p_shape integer[], p_event text[],
    s_customer bigint[], s_wallet bigint[], s_feature bigint[], s_quantity text[], s_occurred_at text[],
    s_properties text[], s_rate bigint[], s_unit text[], s_credits text[], s_hash text[],
    p_now timestamptz, p_entries_at timestamptz)
RETURNS TABLE (r_n integer, r_outcome text, r_available numeric, r_response text, r_paused_reason text,
               r_alert_below numeric, r_alert_at_or_above numeric, r_prior_status text, r_prior_hash text,
               r_prior_response text, r_prior_credits numeric)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_count integer := cardinality(p_event);
    v_shapes integer := cardinality(s_customer);
    s_k numeric[] := s_credits::numeric[];
    s_q numeric[] := s_quantity::numeric[];
    s_u numeric[] := s_unit::numeric[];
    s_o timestamptz[] := s_occurred_at::timestamptz[];
    s_p jsonb[] := s_properties::jsonb[];
    s_todo boolean[] := array_fill(false, ARRAY[cardinality(s_customer)]);
    s_wi integer[];
    e_skip boolean[] := array_fill(false, ARRAY[cardinality(p_event)]);
    v_wallets bigint[];
    w_policy text[]; w_limit numeric[]; w_overage numeric[]; w_balance numeric[]; w_seq bigint[];
    w_status text[]; w_paused text[]; w_below numeric[]; w_above numeric[]; w_team boolean[];
    w_held numeric[]; w_over numeric[]; w_gfrom integer[]; w_gto integer[];
    g_id bigint[]; g_wallet bigint[]; g_feature bigint[]; g_rem numeric[];
    e_n integer[] := '{}'; e_event text[] := '{}'; e_status text[] := '{}'; e_response text[] := '{}';
    e_id bigint[];
    l_e integer[] := '{}'; l_event text[] := '{}'; l_grant bigint[] := '{}'; l_amount numeric[] := '{}';
    l_seq bigint[] := '{}'; l_after numeric[] := '{}';
    v_prior record;
    i integer;
    s integer;
    wi integer;
    gi integer;
    v_feature bigint;
    v_credits numeric;
    v_usable numeric;
    v_borrow numeric;
    v_left numeric;
    v_take numeric;
    v_taken numeric;
    v_shown numeric;
    v_over numeric;
    v_e integer;
    v_ids regclass;
    v_alloc text;
BEGIN
    -- 1. The event ids: serialise on each, in (customer, event id) order.
    PERFORM pg_advisory_xact_lock(k.c::integer, hashtext(k.e))
       FROM (SELECT s_customer[u.s] AS c, u.e FROM unnest(p_shape, p_event) AS u(s, e)
              ORDER BY 1, u.e COLLATE "C") AS k;

    -- 2. Those already stored: the caller replays (or refuses) their first answer.
    FOR v_prior IN
        SELECT k.n, u.status, u.request_hash, u.response::text AS response, u.credits
          FROM unnest(p_shape, p_event) WITH ORDINALITY AS k(s, e, n)
          JOIN billing_usageevent u ON u.customer_id = s_customer[k.s] AND u.event_id = k.e
    LOOP
        e_skip[v_prior.n] := true;
        r_n := v_prior.n;
        r_outcome := 'duplicate';
        r_prior_status := v_prior.status;
        r_prior_hash := v_prior.request_hash;
        r_prior_response := v_prior.response;
        r_prior_credits := v_prior.credits;
        RETURN NEXT;
    END LOOP;
    r_prior_status := NULL;
    r_prior_hash := NULL;
    r_prior_response := NULL;
    r_prior_credits := NULL;

    -- The events to decide: new and priced; their shapes and wallets.
    FOR i IN 1 .. v_count LOOP
        s := p_shape[i];
        IF s_k[s] IS NULL THEN
            e_skip[i] := true;
        ELSIF NOT e_skip[i] THEN
            s_todo[s] := true;
        END IF;
    END LOOP;
    SELECT array_agg(DISTINCT s_wallet[t.k] ORDER BY s_wallet[t.k]) INTO v_wallets
      FROM generate_series(1, v_shapes) AS t(k) WHERE s_todo[t.k];
    IF v_wallets IS NULL THEN
        RETURN;
    END IF;

    -- 3. Locks: the wallets' usable grants in primary-key order, then the wallets.
    PERFORM 1 FROM billing_creditgrant g
     WHERE g.wallet_id = ANY (v_wallets) AND g.status = 'active' AND g.effective_at <= p_now AND g.remaining > 0
       AND (g.expires_at IS NULL OR g.expires_at > p_now)
     ORDER BY g.id FOR UPDATE;
    SELECT array_agg(w.policy ORDER BY w.id), array_agg(w.credit_limit ORDER BY w.id),
           array_agg(w.overage ORDER BY w.id), array_agg(w.ledger_balance ORDER BY w.id),
           array_agg(w.last_sequence ORDER BY w.id), array_agg(w.status ORDER BY w.id),
           array_agg(w.paused_reason ORDER BY w.id), array_agg(w.alert_below ORDER BY w.id),
           array_agg(w.alert_at_or_above ORDER BY w.id), array_agg(w.has_team_limits ORDER BY w.id),
           array_agg(w.id ORDER BY w.id)
      INTO w_policy, w_limit, w_overage, w_balance, w_seq, w_status, w_paused, w_below, w_above, w_team, v_wallets
      FROM (SELECT * FROM billing_wallet WHERE id = ANY (v_wallets) ORDER BY id FOR UPDATE) w;
    -- A team's spending limit is the Python engine's to check: hand the whole batch back.
    IF true = ANY (w_team) AND EXISTS (
        SELECT 1 FROM generate_series(1, v_shapes) AS x(k)
          JOIN billing_teamspendinglimit t ON t.wallet_id = s_wallet[x.k]
           AND t.team = s_p[x.k] ->> 'team'
         WHERE s_todo[x.k] AND jsonb_typeof(s_p[x.k] -> 'team') = 'string') THEN
        r_n := NULL;
        r_outcome := 'fallback';
        RETURN NEXT;
        RETURN;
    END IF;
    s_wi := array_fill(0, ARRAY[v_shapes]);
    FOR s IN 1 .. v_shapes LOOP
        IF s_todo[s] THEN
            s_wi[s] := array_position(v_wallets, s_wallet[s]);
        END IF;
    END LOOP;

    -- 4. What the decisions need: usable grants in consumption order per wallet, open holds.
    SELECT array_agg(g.id ORDER BY g.wallet_id, g.priority, g.expires_at ASC NULLS LAST, g.per_unit_cost_basis,
                     g.effective_at, g.created_at, g.id),
           array_agg(g.wallet_id ORDER BY g.wallet_id, g.priority, g.expires_at ASC NULLS LAST,
                     g.per_unit_cost_basis, g.effective_at, g.created_at, g.id),
           array_agg(g.feature_id ORDER BY g.wallet_id, g.priority, g.expires_at ASC NULLS LAST,
                     g.per_unit_cost_basis, g.effective_at, g.created_at, g.id),
           array_agg(g.remaining ORDER BY g.wallet_id, g.priority, g.expires_at ASC NULLS LAST,
                     g.per_unit_cost_basis, g.effective_at, g.created_at, g.id)
      INTO g_id, g_wallet, g_feature, g_rem
      FROM billing_creditgrant g
     WHERE g.wallet_id = ANY (v_wallets) AND g.status = 'active' AND g.effective_at <= p_now AND g.remaining > 0
       AND (g.expires_at IS NULL OR g.expires_at > p_now);
    g_id := coalesce(g_id, '{}');
    w_gfrom := array_fill(1, ARRAY[cardinality(v_wallets)]);
    w_gto := array_fill(0, ARRAY[cardinality(v_wallets)]);
    FOR gi IN 1 .. cardinality(g_id) LOOP
        wi := array_position(v_wallets, g_wallet[gi]);
        IF w_gto[wi] = 0 THEN
            w_gfrom[wi] := gi;
        END IF;
        w_gto[wi] := gi;
    END LOOP;
    SELECT array_agg(coalesce(h.total, 0) ORDER BY v.id) INTO w_held
      FROM unnest(v_wallets) AS v(id)
      LEFT JOIN (SELECT r.wallet_id, sum(r.amount) AS total FROM billing_reservation r
                  WHERE r.wallet_id = ANY (v_wallets) AND r.status = 'open' AND r.expires_at > p_now
                  GROUP BY r.wallet_id) h ON h.wallet_id = v.id;
    w_over := array_fill(0::numeric, ARRAY[cardinality(v_wallets)]);

    -- 5. Each event in input order, all-or-nothing. A charged event's answer is written as the
    -- JSON text of its first answer (keys in that order): stored as jsonb, read back by the caller.
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN e_skip[i];
        s := p_shape[i];
        wi := s_wi[s];
        v_feature := s_feature[s];
        v_credits := s_k[s];
        v_usable := 0;
        FOR gi IN w_gfrom[wi] .. w_gto[wi] LOOP
            IF g_rem[gi] > 0 AND (g_feature[gi] IS NULL OR g_feature[gi] = v_feature) THEN
                v_usable := v_usable + g_rem[gi];
            END IF;
        END LOOP;
        v_borrow := 0;
        IF w_policy[wi] = 'overdraft' THEN
            v_borrow := w_limit[wi] - w_overage[wi] - w_over[wi];
            IF 0 > v_borrow THEN
                v_borrow := 0;
            END IF;
        END IF;
        r_n := i;
        r_available := v_usable - w_held[wi] + v_borrow;
        r_alert_below := w_below[wi];
        r_alert_at_or_above := w_above[wi];
        r_response := NULL;
        r_paused_reason := NULL;
        IF w_status[wi] = 'paused' THEN
            r_outcome := 'paused';
            r_paused_reason := w_paused[wi];
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF v_credits > r_available THEN
            v_shown := round(CASE WHEN 0 > r_available THEN 0 ELSE r_available END, 6);
            e_n := e_n || i;
            e_event := e_event || p_event[i];
            e_status := e_status || 'rejected'::text;
            e_response := e_response || jsonb_build_object('error', jsonb_build_object(
                'code', 'insufficient_credits',
                'message', format('The wallet has %s credits available; this event needs %s.', v_shown,
                                  s_credits[s]),
                'details', jsonb_build_object('required', s_credits[s], 'available', v_shown::text,
                                              'event_id', p_event[i])))::text;
            r_outcome := 'rejected';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- Consume grants in consumption order; never more than usable minus held from grants.
        v_left := v_usable - w_held[wi];
        IF 0 > v_left THEN
            v_left := 0;
        END IF;
        IF v_left >= v_credits THEN
            v_left := v_credits;
        END IF;
        v_taken := 0;
        v_alloc := '';
        v_e := cardinality(e_n) + 1;
        FOR gi IN w_gfrom[wi] .. w_gto[wi] LOOP
            EXIT WHEN v_left <= 0;
            CONTINUE WHEN NOT (g_rem[gi] > 0 AND (g_feature[gi] IS NULL OR g_feature[gi] = v_feature));
            v_take := CASE WHEN v_left < g_rem[gi] THEN v_left ELSE g_rem[gi] END;
            g_rem[gi] := g_rem[gi] - v_take;
            v_left := v_left - v_take;
            v_taken := v_taken + v_take;
            v_alloc := v_alloc || ',{"grant":' || g_id[gi] || ',"amount":"' || v_take || '"}';
            w_seq[wi] := w_seq[wi] + 1;
            w_balance[wi] := w_balance[wi] - v_take;
            l_e := l_e || v_e; l_event := l_event || p_event[i]; l_grant := l_grant || g_id[gi];
            l_amount := l_amount || -v_take;
            l_seq := l_seq || w_seq[wi]; l_after := l_after || w_balance[wi];
        END LOOP;
        v_over := v_credits - v_taken;
        IF v_over > 0 THEN
            w_over[wi] := w_over[wi] + v_over;
            v_alloc := v_alloc || ',{"grant":null,"amount":"' || v_over || '","overage":true}';
            w_seq[wi] := w_seq[wi] + 1;
            w_balance[wi] := w_balance[wi] - v_over;
            l_e := l_e || v_e; l_event := l_event || p_event[i]; l_grant := l_grant || NULL::bigint;
            l_amount := l_amount || -v_over;
            l_seq := l_seq || w_seq[wi]; l_after := l_after || w_balance[wi];
        END IF;
        r_response := '{"event_id":' || to_json(p_event[i]) || ',"status":"charged","credits":"' || s_credits[s]
            || '","allocations":[' || substr(v_alloc, 2) || '],"balance":{"available":"' || (r_available - v_credits)
            || '","ledger_balance":"' || w_balance[wi] || '"}}';
        e_n := e_n || i;
        e_event := e_event || p_event[i];
        e_status := e_status || 'charged'::text;
        e_response := e_response || r_response;
        r_outcome := 'charged';
        RETURN NEXT;
    END LOOP;

    -- 6. The rows: usage events in input order (ids taken in that order), their ledger entries,
    -- grants, wallets. (In these statements only arrays of fixed-width elements are subscripted:
    -- an element of a text array is found by walking the array.)
    v_ids := pg_get_serial_sequence('billing_usageevent', 'id')::regclass;
    e_id := ARRAY(SELECT nextval(v_ids) FROM generate_series(1, cardinality(e_n)) ORDER BY 1);
    INSERT INTO billing_usageevent (id, customer_id, wallet_id, feature_id, event_id, quantity, occurred_at,
        properties, rate_id, credits_per_unit, credits, status, request_hash, response, reservation_id, created_at)
    SELECT d.id, s_customer[x.s], s_wallet[x.s], s_feature[x.s], d.event_id, s_q[x.s], s_o[x.s], s_p[x.s],
           s_rate[x.s], s_u[x.s], s_k[x.s], d.status, s_hash[x.s], d.response::jsonb, NULL, p_now
      FROM unnest(e_id, e_n, e_event, e_status, e_response) AS d(id, n, event_id, status, response)
     CROSS JOIN LATERAL (SELECT p_shape[d.n] AS s) AS x;
    INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after, usage_event_id,
        reservation_id, reference, idempotency_key, memo, created_at)
    SELECT s_wallet[p_shape[e_n[l.e]]], l.grant_id, CASE WHEN l.grant_id IS NULL THEN 'overage' ELSE 'usage' END,
           l.amount, l.seq, l.after, e_id[l.e], NULL, left('usage:' || l.event_id, 255), '', '', p_entries_at
      FROM unnest(l_e, l_event, l_grant, l_amount, l_seq, l_after) AS l(e, event_id, grant_id, amount, seq, after);
    -- Every take is positive: a grant or wallet was touched exactly when its remaining or sequence moved.
    UPDATE billing_creditgrant g
       SET remaining = v.rem, status = CASE WHEN v.rem = 0 THEN 'depleted' ELSE g.status END
      FROM unnest(g_id, g_rem) AS v(id, rem)
     WHERE g.id = v.id AND g.remaining <> v.rem;
    UPDATE billing_wallet w
       SET ledger_balance = v.balance, last_sequence = v.seq, overage = w.overage + v.over
      FROM unnest(v_wallets, w_balance, w_seq, w_over) AS v(id, balance, seq, over)
     WHERE w.id = v.id AND w.last_sequence <> v.seq;
END;
$fn$;
"""
)

REVERSE_SQL = f"DROP FUNCTION {_SIGNATURE};\n" + _0019.SQL


class Migration(migrations.Migration):
    dependencies = [("billing", "0020_usage_charge_leaner")]
    # Reversed: the function as migration 0019 left it.
    operations = [migrations.RunSQL(SQL, REVERSE_SQL)]
