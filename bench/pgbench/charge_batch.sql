-- The minimal set-based SQL of a batch of 1,000 one-credit events: 100 events on each of
-- 10 wallets (a block of 10 consecutive wallet ids, aligned, as the HTTP batch scenario sends).
-- Variables: wlo (first wallet id), blocks (number of aligned blocks), fid, rid.
\set w :wlo + 10 * random(0, :blocks - 1)
BEGIN;
WITH g AS (
  UPDATE billing_creditgrant SET remaining = remaining - 100
   WHERE wallet_id BETWEEN :w AND :w + 9 AND status = 'active' RETURNING id, wallet_id
), wl AS (
  UPDATE billing_wallet SET ledger_balance = ledger_balance - 100, last_sequence = last_sequence + 100
   WHERE id BETWEEN :w AND :w + 9 RETURNING id, customer_id, last_sequence, ledger_balance
), src AS MATERIALIZED (
  SELECT wl.id AS wallet_id, wl.customer_id, g.id AS grant_id, wl.last_sequence - 100 + n AS seq,
         wl.ledger_balance + 100 - n AS bal, gen_random_uuid()::text AS eid
    FROM wl JOIN g ON g.wallet_id = wl.id CROSS JOIN generate_series(1, 100) AS n
), ev AS (
  INSERT INTO billing_usageevent (customer_id, wallet_id, feature_id, event_id, quantity, occurred_at, properties,
    rate_id, credits_per_unit, credits, status, request_hash, response, created_at)
  SELECT customer_id, wallet_id, :fid, eid, 1, now(), '{}', :rid, 1, 1, 'charged', 'pgbench', '{}', now() FROM src
  RETURNING id, event_id
)
INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after, usage_event_id,
  reference, idempotency_key, memo, created_at)
SELECT src.wallet_id, src.grant_id, 'usage', -1, src.seq, src.bal, ev.id, 'pgbench', '', '', now()
  FROM src JOIN ev ON ev.event_id = src.eid;
END;
