"""``creditdesk_usage_charge_batch``: the Python engine's ``_charge`` for a batch of
already priced events, set-based, in one statement (billing/services/usage.py
``_charge_in_database``). Locks every usable grant of the batch's wallets, then the
wallets, in primary-key order (grants → wallets, as ``_charge``); decides events in
input order, each all-or-nothing, in DESIGN.md §3 consumption order; then writes the
usage events, ledger entries (per-wallet sequence, balance after), grants and wallets
in one statement each. Returns one row per event: outcome ``charged``, ``rejected``
(stored) or ``paused`` (not stored), or a single ``fallback`` row, having written
nothing, when a wallet's limited team is involved (billing.services.team_limits).
"""

from django.db import migrations

SQL = r"""CREATE OR REPLACE FUNCTION creditdesk_usage_charge_batch(
    p_events jsonb, p_now timestamptz, p_entries_at timestamptz)
RETURNS TABLE (r_n integer, r_outcome text, r_available numeric, r_grant_ids bigint[], r_takes numeric[],
               r_over numeric, r_ledger_after numeric, r_paused_reason text, r_alert_below numeric,
               r_alert_at_or_above numeric)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_wallets bigint[];
    w_policy text[]; w_limit numeric[]; w_overage numeric[]; w_balance numeric[]; w_seq bigint[];
    w_status text[]; w_paused text[]; w_below numeric[]; w_above numeric[]; w_team boolean[];
    w_held numeric[]; w_over numeric[]; w_moved boolean[]; w_gfrom integer[]; w_gto integer[];
    g_id bigint[]; g_wallet bigint[]; g_feature bigint[]; g_rem numeric[]; g_touched boolean[];
    e_n integer[] := '{}'; e_status text[] := '{}'; e_response jsonb[] := '{}';
    l_n integer[] := '{}'; l_wallet bigint[] := '{}'; l_grant bigint[] := '{}'; l_type text[] := '{}';
    l_amount numeric[] := '{}'; l_seq bigint[] := '{}'; l_after numeric[] := '{}';
    ev record;
    wi integer;
    gi integer;
    v_usable numeric;
    v_borrow numeric;
    v_left numeric;
    v_take numeric;
    v_taken numeric;
    v_shown numeric;
    v_alloc jsonb;
BEGIN
    SELECT array_agg(DISTINCT (x ->> 'w')::bigint ORDER BY (x ->> 'w')::bigint) INTO v_wallets
      FROM jsonb_array_elements(p_events) AS x;

    -- 1. Locks: the wallets' usable grants in primary-key order, then the wallets.
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
        SELECT 1 FROM jsonb_to_recordset(p_events) AS x(w bigint, p jsonb)
          JOIN billing_teamspendinglimit t ON t.wallet_id = x.w AND t.team = x.p ->> 'team'
         WHERE jsonb_typeof(x.p -> 'team') = 'string') THEN
        r_outcome := 'fallback';
        RETURN NEXT;
        RETURN;
    END IF;

    -- 2. What the decisions need: usable grants in consumption order per wallet, open holds.
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
    g_touched := array_fill(false, ARRAY[cardinality(g_id)]);
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
    w_moved := array_fill(false, ARRAY[cardinality(v_wallets)]);

    -- 3. Each event in input order, all-or-nothing.
    FOR ev IN SELECT x.n, x.w, x.f, x.e, x.k AS kt, x.k::numeric AS k FROM jsonb_to_recordset(p_events)
                  AS x(n integer, w bigint, f bigint, e text, k text) ORDER BY x.n LOOP
        wi := array_position(v_wallets, ev.w);
        v_usable := 0;
        FOR gi IN w_gfrom[wi] .. w_gto[wi] LOOP
            IF g_rem[gi] > 0 AND (g_feature[gi] IS NULL OR g_feature[gi] = ev.f) THEN
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
        r_n := ev.n;
        r_available := v_usable - w_held[wi] + v_borrow;
        r_alert_below := w_below[wi];
        r_alert_at_or_above := w_above[wi];
        r_grant_ids := NULL;
        r_takes := NULL;
        r_over := NULL;
        r_ledger_after := NULL;
        r_paused_reason := NULL;
        IF w_status[wi] = 'paused' THEN
            r_outcome := 'paused';
            r_paused_reason := w_paused[wi];
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF ev.k > r_available THEN
            v_shown := round(CASE WHEN 0 > r_available THEN 0 ELSE r_available END, 6);
            e_n := e_n || ev.n;
            e_status := e_status || 'rejected'::text;
            e_response := e_response || jsonb_build_object('error', jsonb_build_object(
                'code', 'insufficient_credits',
                'message', format('The wallet has %s credits available; this event needs %s.', v_shown, ev.kt),
                'details', jsonb_build_object('required', ev.kt, 'available', v_shown::text, 'event_id', ev.e)));
            r_outcome := 'rejected';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- Consume grants in consumption order; never more than usable minus held from grants.
        v_left := v_usable - w_held[wi];
        IF 0 > v_left THEN
            v_left := 0;
        END IF;
        IF v_left >= ev.k THEN
            v_left := ev.k;
        END IF;
        v_taken := 0;
        r_grant_ids := '{}';
        r_takes := '{}';
        v_alloc := '[]';
        FOR gi IN w_gfrom[wi] .. w_gto[wi] LOOP
            EXIT WHEN v_left <= 0;
            CONTINUE WHEN NOT (g_rem[gi] > 0 AND (g_feature[gi] IS NULL OR g_feature[gi] = ev.f));
            v_take := CASE WHEN v_left < g_rem[gi] THEN v_left ELSE g_rem[gi] END;
            g_rem[gi] := g_rem[gi] - v_take;
            g_touched[gi] := true;
            v_left := v_left - v_take;
            v_taken := v_taken + v_take;
            r_grant_ids := r_grant_ids || g_id[gi];
            r_takes := r_takes || v_take;
            v_alloc := v_alloc || jsonb_build_object('grant', g_id[gi], 'amount', v_take::text);
            w_seq[wi] := w_seq[wi] + 1;
            w_balance[wi] := w_balance[wi] - v_take;
            w_moved[wi] := true;
            l_n := l_n || ev.n; l_wallet := l_wallet || ev.w; l_grant := l_grant || g_id[gi];
            l_type := l_type || 'usage'::text; l_amount := l_amount || -v_take; l_seq := l_seq || w_seq[wi];
            l_after := l_after || w_balance[wi];
        END LOOP;
        r_over := ev.k - v_taken;
        IF r_over > 0 THEN
            w_over[wi] := w_over[wi] + r_over;
            v_alloc := v_alloc || jsonb_build_object('grant', NULL, 'amount', r_over::text, 'overage', true);
            w_seq[wi] := w_seq[wi] + 1;
            w_balance[wi] := w_balance[wi] - r_over;
            w_moved[wi] := true;
            l_n := l_n || ev.n; l_wallet := l_wallet || ev.w; l_grant := l_grant || NULL::bigint;
            l_type := l_type || 'overage'::text; l_amount := l_amount || -r_over; l_seq := l_seq || w_seq[wi];
            l_after := l_after || w_balance[wi];
        END IF;
        r_ledger_after := w_balance[wi];
        e_n := e_n || ev.n;
        e_status := e_status || 'charged'::text;
        e_response := e_response || jsonb_build_object(
            'event_id', ev.e, 'status', 'charged', 'credits', ev.kt, 'allocations', v_alloc,
            'balance', jsonb_build_object('available', (r_available - ev.k)::text,
                                          'ledger_balance', r_ledger_after::text));
        r_outcome := 'charged';
        RETURN NEXT;
    END LOOP;

    -- 4. The rows: usage events in input order, their ledger entries, grants, wallets.
    WITH events AS (
        SELECT x.* FROM jsonb_to_recordset(p_events) AS x(n integer, c bigint, w bigint, f bigint, e text,
               q numeric, o timestamptz, p jsonb, r bigint, u numeric, k numeric, h text)
    ), inserted AS (
        INSERT INTO billing_usageevent (customer_id, wallet_id, feature_id, event_id, quantity, occurred_at,
            properties, rate_id, credits_per_unit, credits, status, request_hash, response, reservation_id,
            created_at)
        SELECT x.c, x.w, x.f, x.e, x.q, x.o, x.p, x.r, x.u, x.k, d.status, x.h, d.response, NULL, p_now
          FROM unnest(e_n, e_status, e_response) AS d(n, status, response) JOIN events x ON x.n = d.n
         ORDER BY d.n
        RETURNING id, customer_id, event_id
    )
    INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after, usage_event_id,
        reservation_id, reference, idempotency_key, memo, created_at)
    SELECT l.wallet, l.grant_id, l.type, l.amount, l.seq, l.after, i.id, NULL, left('usage:' || x.e, 255), '', '',
           p_entries_at
      FROM unnest(l_n, l_wallet, l_grant, l_type, l_amount, l_seq, l_after)
           WITH ORDINALITY AS l(n, wallet, grant_id, type, amount, seq, after, o)
      JOIN events x ON x.n = l.n
      JOIN inserted i ON i.customer_id = x.c AND i.event_id = x.e
     ORDER BY l.o;
    UPDATE billing_creditgrant g
       SET remaining = v.rem, status = CASE WHEN v.rem = 0 THEN 'depleted' ELSE g.status END
      FROM unnest(g_id, g_rem, g_touched) AS v(id, rem, touched)
     WHERE v.touched AND g.id = v.id;
    UPDATE billing_wallet w
       SET ledger_balance = v.balance, last_sequence = v.seq, overage = w.overage + v.over
      FROM unnest(v_wallets, w_balance, w_seq, w_over, w_moved) AS v(id, balance, seq, over, moved)
     WHERE v.moved AND w.id = v.id;
END;
$fn$;
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0018_usage_charge_limited_teams_only")]
    operations = [migrations.RunSQL(SQL, "DROP FUNCTION creditdesk_usage_charge_batch(jsonb, timestamptz, timestamptz)")]
