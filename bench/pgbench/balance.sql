-- The minimal SQL of a balance read: the wallet, its usable grants in consumption order, its open holds.
\set w random(:wlo, :whi)
SELECT id, policy, credit_limit, overage, ledger_balance FROM billing_wallet WHERE id = :w;
SELECT id, kind, remaining, original_amount, priority, effective_at, expires_at, status, feature_id
  FROM billing_creditgrant
 WHERE wallet_id = :w AND status = 'active' AND effective_at <= now() AND remaining > 0
   AND (expires_at IS NULL OR expires_at > now())
 ORDER BY priority, expires_at NULLS LAST, per_unit_cost_basis, effective_at, created_at, id;
SELECT coalesce(sum(amount), 0) FROM billing_reservation WHERE wallet_id = :w AND status = 'open' AND expires_at > now();
