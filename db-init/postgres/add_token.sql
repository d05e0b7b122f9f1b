-- Add a token, or replace the one of the same name (new secret, fields reset to what is given).
--   psql -v name=alice -v secret=sk-... -v priority=5 -v threshold=100 -f db-init/postgres/add_token.sql
-- Optional: -v owner=team-a -v expires='2027-01-01 00:00' -v models=llama,mistral -v rpm=60 -v tpm=100000
--           -v max_seconds=60 (a request gives up after that, if sooner than SENDER_DEADLINE_SECONDS)
-- Only the SHA-256 of the secret is stored, as the sender checks it.
\set ON_ERROR_STOP on
\if :{?owner} \else \set owner '' \endif
\if :{?expires} \else \set expires '' \endif
\if :{?models} \else \set models '' \endif
\if :{?rpm} \else \set rpm '' \endif
\if :{?tpm} \else \set tpm '' \endif
\if :{?max_seconds} \else \set max_seconds '' \endif
\if :{?priority} \else \set priority 0 \endif
\if :{?threshold} \else \set threshold 100 \endif

INSERT INTO tokens
    (name, token_hash, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds)
VALUES (
    :'name',
    encode(sha256(convert_to(:'secret', 'UTF8')), 'hex'),
    NULLIF(:'owner', ''),
    CAST(:'priority' AS INTEGER),
    CAST(:'threshold' AS INTEGER),
    TRUE,
    CAST(NULLIF(:'expires', '') AS TIMESTAMP),
    NULLIF(:'models', ''),
    CAST(NULLIF(:'rpm', '') AS INTEGER),
    CAST(NULLIF(:'tpm', '') AS INTEGER),
    CAST(NULLIF(:'max_seconds', '') AS DOUBLE PRECISION)
)
ON CONFLICT (name) DO UPDATE SET
    token_hash = EXCLUDED.token_hash,
    owner = EXCLUDED.owner,
    priority = EXCLUDED.priority,
    threshold = EXCLUDED.threshold,
    enabled = TRUE,
    expires_at = EXCLUDED.expires_at,
    allowed_models = EXCLUDED.allowed_models,
    rpm_limit = EXCLUDED.rpm_limit,
    tpm_limit = EXCLUDED.tpm_limit,
    max_seconds = EXCLUDED.max_seconds;
