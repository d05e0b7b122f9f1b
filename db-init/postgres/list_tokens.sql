-- List tokens. Never shows secrets (they are not stored) and only the first 8 characters of a hash.
--   psql -f db-init/postgres/list_tokens.sql
\set ON_ERROR_STOP on
SELECT name, owner, priority, threshold, enabled, created_at, expires_at,
       COALESCE(NULLIF(allowed_models, ''), '*') AS models, rpm_limit AS rpm, tpm_limit AS tpm, max_seconds,
       max_parallel,
       LEFT(token_hash, 8) || '...' AS hash_prefix, hash_kind
FROM tokens
ORDER BY name;
