-- Add a token, or replace the one of the same name (new secret, fields reset to what is given).
--   psql -v name=alice -v secret=sk-... -v pepper="$(cat /path/to/pepper)" -v priority=5 -v threshold=100 \
--        -f db-init/postgres/add_token.sql
-- Optional: -v owner=team-a -v expires='2027-01-01 00:00' -v models=llama,mistral -v rpm=60 -v tpm=100000
--           -v max_seconds=60 (a request gives up after that, if sooner than SENDER_DEADLINE_SECONDS)
--           -v max_parallel=8 (requests queued or running at once, per sender replica)
-- pepper: the senders' SENDER_TOKEN_PEPPER. The secret is stored as its HMAC-SHA-256 keyed with the
-- pepper, exactly as the sender computes it (built here from the built-in sha256(), PostgreSQL 11+,
-- so no extension is needed). Without a pepper, as plain SHA-256 (a sender with a pepper still
-- accepts it, and rewrites it with the peppered hash the first time the token is used).
\set ON_ERROR_STOP on
\if :{?owner} \else \set owner '' \endif
\if :{?expires} \else \set expires '' \endif
\if :{?models} \else \set models '' \endif
\if :{?rpm} \else \set rpm '' \endif
\if :{?tpm} \else \set tpm '' \endif
\if :{?max_seconds} \else \set max_seconds '' \endif
\if :{?max_parallel} \else \set max_parallel '' \endif
\if :{?priority} \else \set priority 0 \endif
\if :{?threshold} \else \set threshold 100 \endif
\if :{?pepper} \else \set pepper '' \endif

-- Refuse values the sender could not honour, before anything is written (the database's CHECK
-- constraints would refuse some of them too, less clearly). Optional: -v max_priority=9, the top of
-- the sender's priority scale (SENDER_MAX_PRIORITY).
\if :{?max_priority} \else \set max_priority 9 \endif
SELECT set_config('dispatcher.priority', :'priority', false) AS _priority,
       set_config('dispatcher.threshold', :'threshold', false) AS _threshold,
       set_config('dispatcher.rpm', :'rpm', false) AS _rpm,
       set_config('dispatcher.tpm', :'tpm', false) AS _tpm,
       set_config('dispatcher.max_seconds', :'max_seconds', false) AS _max_seconds,
       set_config('dispatcher.max_parallel', :'max_parallel', false) AS _max_parallel,
       set_config('dispatcher.expires', :'expires', false) AS _expires,
       set_config('dispatcher.max_priority', :'max_priority', false) AS _max_priority \gset
DO $$
DECLARE
    top TEXT := current_setting('dispatcher.max_priority');
    field TEXT;
    v TEXT;
BEGIN
    IF top !~ '^[0-9]{1,3}$' OR top::INTEGER > 255 THEN
        RAISE EXCEPTION 'max_priority must be an integer from 0 to 255, got "%"', top;
    END IF;
    v := current_setting('dispatcher.priority');
    IF v <> '' AND (v !~ '^[0-9]{1,9}$' OR v::INTEGER > top::INTEGER) THEN
        RAISE EXCEPTION 'priority must be an integer from 0 to % (higher is served first), got "%"', top, v;
    END IF;
    v := current_setting('dispatcher.threshold');
    IF v <> '' AND (v !~ '^[0-9]{1,10}$' OR v::BIGINT < 1 OR v::BIGINT > 2147483647) THEN
        RAISE EXCEPTION 'threshold must be an integer of at least 1 (the queue depth at which requests get 429), got "%"', v;
    END IF;
    FOREACH field IN ARRAY ARRAY['rpm', 'tpm'] LOOP
        v := current_setting('dispatcher.' || field);
        IF v NOT IN ('', 'none') AND (v !~ '^[0-9]{1,10}$' OR v::BIGINT < 1 OR v::BIGINT > 2147483647) THEN
            RAISE EXCEPTION '% must be a positive integer per minute, or none for no limit, got "%"', field, v;
        END IF;
    END LOOP;
    v := current_setting('dispatcher.max_parallel');
    IF v NOT IN ('', 'none') AND (v !~ '^[0-9]{1,10}$' OR v::BIGINT < 1 OR v::BIGINT > 2147483647) THEN
        RAISE EXCEPTION 'max_parallel must be a positive integer (requests queued or running at once), or none for no limit, got "%"', v;
    END IF;
    v := current_setting('dispatcher.max_seconds');
    IF v NOT IN ('', 'none') AND (v !~ '^[0-9]*[.]?[0-9]+([eE][-+]?[0-9]+)?$' OR v::DOUBLE PRECISION <= 0) THEN
        RAISE EXCEPTION 'max_seconds must be a positive number of seconds, or none for the server''s deadline, got "%"', v;
    END IF;
    v := current_setting('dispatcher.expires');
    IF v NOT IN ('', 'none') THEN
        BEGIN
            PERFORM v::TIMESTAMP;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'expires must be a date (2027-01-01) or a date and time (2027-01-01 12:00) in the database''s local time, or none, got "%"', v;
        END;
    END IF;
END
$$;

-- HMAC-SHA-256 (RFC 2104): sha256((K xor opad) || sha256((K xor ipad) || secret)), K the pepper's
-- bytes (hashed first if longer than the 64-byte block), padded with zeros to 64 bytes.
SELECT CASE WHEN :'pepper' = '' THEN encode(sha256(convert_to(:'secret', 'UTF8')), 'hex') ELSE (
           WITH given AS (
               SELECT convert_to(:'pepper', 'UTF8') AS pepper
           ), k AS (
               SELECT CASE WHEN length(pepper) > 64 THEN sha256(pepper) ELSE pepper END AS key FROM given
           ), padded AS (
               SELECT key || decode(repeat('00', 64 - length(key)), 'hex') AS key FROM k
           ), pads AS (
               SELECT decode(string_agg(lpad(to_hex(get_byte(key, i) # 54), 2, '0'), '' ORDER BY i), 'hex') AS ipad,
                      decode(string_agg(lpad(to_hex(get_byte(key, i) # 92), 2, '0'), '' ORDER BY i), 'hex') AS opad
               FROM padded, generate_series(0, 63) AS i
           )
           SELECT encode(sha256(opad || sha256(ipad || convert_to(:'secret', 'UTF8'))), 'hex') FROM pads
       ) END AS token_hash,
       CASE WHEN :'pepper' = '' THEN 'sha256' ELSE 'hmac-sha256' END AS hash_kind \gset

INSERT INTO tokens
    (name, token_hash, hash_kind, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds, max_parallel)
VALUES (
    :'name',
    :'token_hash',
    :'hash_kind',
    NULLIF(:'owner', ''),
    CAST(:'priority' AS INTEGER),
    CAST(:'threshold' AS INTEGER),
    TRUE,
    CAST(NULLIF(NULLIF(:'expires', ''), 'none') AS TIMESTAMP),
    NULLIF(:'models', ''),
    CAST(NULLIF(NULLIF(:'rpm', ''), 'none') AS INTEGER),
    CAST(NULLIF(NULLIF(:'tpm', ''), 'none') AS INTEGER),
    CAST(NULLIF(NULLIF(:'max_seconds', ''), 'none') AS DOUBLE PRECISION),
    CAST(NULLIF(NULLIF(:'max_parallel', ''), 'none') AS INTEGER)
)
ON CONFLICT (name) DO UPDATE SET
    token_hash = EXCLUDED.token_hash,
    hash_kind = EXCLUDED.hash_kind,
    owner = EXCLUDED.owner,
    priority = EXCLUDED.priority,
    threshold = EXCLUDED.threshold,
    enabled = TRUE,
    expires_at = EXCLUDED.expires_at,
    allowed_models = EXCLUDED.allowed_models,
    rpm_limit = EXCLUDED.rpm_limit,
    tpm_limit = EXCLUDED.tpm_limit,
    max_seconds = EXCLUDED.max_seconds,
    max_parallel = EXCLUDED.max_parallel;
