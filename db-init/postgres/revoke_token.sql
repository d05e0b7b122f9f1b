-- Revoke a token: it stops working within SENDER_TOKEN_CACHE_SECONDS. Its row (and usage) stays;
-- set_token.sql with -v enabled=true turns it back on.
--   psql -v name=alice -f db-init/postgres/revoke_token.sql
\set ON_ERROR_STOP on
UPDATE tokens SET enabled = FALSE WHERE name = :'name';
SELECT 'no token named ' || :'name' || ': nothing changed' AS result
WHERE NOT EXISTS (SELECT 1 FROM tokens WHERE name = :'name');
