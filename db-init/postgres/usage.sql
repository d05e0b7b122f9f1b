-- Usage per token and model over a time range (database local time; default: the last 24 hours).
--   psql -v from='2026-11-01' -v to='2026-12-01' -f db-init/postgres/usage.sql
-- Optional: -v name=alice (one token only).
\set ON_ERROR_STOP on
\if :{?from} \else \set from '' \endif
\if :{?to} \else \set to '' \endif
\if :{?name} \else \set name '' \endif
SELECT token_name AS token, model,
       COUNT(*) AS requests,
       SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
       SUM(prompt_tokens) AS prompt_tokens,
       SUM(completion_tokens) AS completion_tokens,
       ROUND(AVG(queue_ms)) AS avg_queue_ms,
       ROUND(AVG(total_ms)) AS avg_total_ms
FROM usage_records
WHERE finished_at >= COALESCE(CAST(NULLIF(:'from', '') AS TIMESTAMP), LOCALTIMESTAMP - INTERVAL '1 day')
  AND finished_at < COALESCE(CAST(NULLIF(:'to', '') AS TIMESTAMP), LOCALTIMESTAMP + INTERVAL '1 minute')
  AND (:'name' = '' OR token_name = :'name')
GROUP BY token_name, model
ORDER BY token_name, model;
