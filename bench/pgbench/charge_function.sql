-- One usage charge (1 credit) through creditdesk_usage_charge, as the HTTP API's single-event path calls it:
-- compare its pgbench limit with charge.sql's (the minimal SQL of the same charge), back to back.
-- In the bench database the 1,000 spread wallets' customer id equals the wallet id; feature 1 is priced.
\set w random(1, 1000)
SELECT * FROM creditdesk_usage_charge(:w, :w, 1, gen_random_uuid()::text, 1, now(), '{}'::jsonb, 'h', now(), now(), 28);
