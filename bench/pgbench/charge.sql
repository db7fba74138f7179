-- The minimal SQL of one usage charge (1 credit): lock/update the wallet's grant,
-- move the wallet's balance and sequence, store the usage event and its ledger entry.
-- Variables: wlo/whi (wallet id range; equal for the hot wallet), fid (feature), rid (rate version).
\set w random(:wlo, :whi)
BEGIN;
UPDATE billing_creditgrant SET remaining = remaining - 1
 WHERE wallet_id = :w AND status = 'active' RETURNING id AS gid \gset
UPDATE billing_wallet SET ledger_balance = ledger_balance - 1, last_sequence = last_sequence + 1
 WHERE id = :w RETURNING last_sequence AS seq, ledger_balance AS bal, customer_id AS cid \gset
INSERT INTO billing_usageevent (customer_id, wallet_id, feature_id, event_id, quantity, occurred_at, properties,
  rate_id, credits_per_unit, credits, status, request_hash, response, created_at)
 VALUES (:cid, :w, :fid, gen_random_uuid()::text, 1, now(), '{}', :rid, 1, 1, 'charged', 'pgbench', '{}', now())
 RETURNING id AS eid \gset
INSERT INTO billing_ledgerentry (wallet_id, grant_id, type, amount, sequence, balance_after, usage_event_id,
  reference, idempotency_key, memo, created_at)
 VALUES (:w, :gid, 'usage', -1, :seq, :bal, :eid, 'pgbench', '', '', now());
END;
