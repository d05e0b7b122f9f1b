-- Change a token's fields; fields not given stay as they are, `none` clears an optional one.
--   psql -v name=alice -v priority=7 -v rpm=120 -v expires=none -f db-init/postgres/set_token.sql
-- Fields: owner, priority, threshold, enabled (true/false), expires ('2027-01-01 00:00' or none),
--         models (comma-separated, or none for all), rpm, tpm (a number, or none for no limit),
--         max_seconds (seconds a request may take, or none for the server's deadline),
--         max_parallel (requests queued or running at once, per sender replica, or none for no limit).
-- Values the sender could not honour (a priority off 0..max_priority, a threshold below 1, a limit of
-- 0 or less, a date it cannot read) are refused with a message and nothing is changed.
\set ON_ERROR_STOP on
\if :{?owner} \else \set owner '' \endif
\if :{?priority} \else \set priority '' \endif
\if :{?threshold} \else \set threshold '' \endif
\if :{?enabled} \else \set enabled '' \endif
\if :{?expires} \else \set expires '' \endif
\if :{?models} \else \set models '' \endif
\if :{?rpm} \else \set rpm '' \endif
\if :{?tpm} \else \set tpm '' \endif
\if :{?max_seconds} \else \set max_seconds '' \endif
\if :{?max_parallel} \else \set max_parallel '' \endif

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

UPDATE tokens SET
    owner = CASE :'owner' WHEN '' THEN owner WHEN 'none' THEN NULL ELSE :'owner' END,
    priority = COALESCE(CAST(NULLIF(:'priority', '') AS INTEGER), priority),
    threshold = COALESCE(CAST(NULLIF(:'threshold', '') AS INTEGER), threshold),
    enabled = COALESCE(CAST(NULLIF(:'enabled', '') AS BOOLEAN), enabled),
    expires_at = CASE :'expires' WHEN '' THEN expires_at WHEN 'none' THEN NULL
                 ELSE CAST(NULLIF(NULLIF(:'expires', ''), 'none') AS TIMESTAMP) END,
    allowed_models = CASE :'models' WHEN '' THEN allowed_models WHEN 'none' THEN NULL ELSE :'models' END,
    rpm_limit = CASE :'rpm' WHEN '' THEN rpm_limit WHEN 'none' THEN NULL
                ELSE CAST(NULLIF(NULLIF(:'rpm', ''), 'none') AS INTEGER) END,
    tpm_limit = CASE :'tpm' WHEN '' THEN tpm_limit WHEN 'none' THEN NULL
                ELSE CAST(NULLIF(NULLIF(:'tpm', ''), 'none') AS INTEGER) END,
    max_seconds = CASE :'max_seconds' WHEN '' THEN max_seconds WHEN 'none' THEN NULL
                  ELSE CAST(NULLIF(NULLIF(:'max_seconds', ''), 'none') AS DOUBLE PRECISION) END,
    max_parallel = CASE :'max_parallel' WHEN '' THEN max_parallel WHEN 'none' THEN NULL
                   ELSE CAST(NULLIF(NULLIF(:'max_parallel', ''), 'none') AS INTEGER) END
WHERE name = :'name';
SELECT 'no token named ' || :'name' || ': nothing changed' AS result
WHERE NOT EXISTS (SELECT 1 FROM tokens WHERE name = :'name');
