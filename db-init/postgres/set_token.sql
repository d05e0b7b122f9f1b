-- Change a token's fields; fields not given stay as they are, `none` clears an optional one.
--   psql -v name=alice -v priority=7 -v rpm=120 -v expires=none -f db-init/postgres/set_token.sql
-- Fields: owner, priority, threshold, enabled (true/false), expires ('2027-01-01 00:00' or none),
--         models (comma-separated, or none for all), rpm, tpm (a number, or none for no limit),
--         max_seconds (seconds a request may take, or none for the server's deadline).
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
                  ELSE CAST(NULLIF(NULLIF(:'max_seconds', ''), 'none') AS DOUBLE PRECISION) END
WHERE name = :'name';
