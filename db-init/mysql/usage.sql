-- Usage per token and model over a time range (database local time; default: the last 24 hours).
--   mysql -e "SET @from='2026-11-01', @to='2026-12-01'; SOURCE db-init/mysql/usage.sql;"
-- Optional: @name='alice' (one token only).

SELECT token_name AS token, model,
       COUNT(*) AS requests,
       SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
       SUM(prompt_tokens) AS prompt_tokens,
       SUM(completion_tokens) AS completion_tokens,
       ROUND(AVG(queue_ms)) AS avg_queue_ms,
       ROUND(AVG(total_ms)) AS avg_total_ms
FROM usage_records
WHERE finished_at >= COALESCE(CAST(@from AS DATETIME), NOW() - INTERVAL 1 DAY)
  AND finished_at < COALESCE(CAST(@to AS DATETIME), NOW() + INTERVAL 1 MINUTE)
  AND (@name IS NULL OR token_name = @name)
GROUP BY token_name, model
ORDER BY token_name, model;
