-- Schema 6: the most requests a token may have queued or running at once.
-- max_parallel: NULL means no limit; over it, a request gets 429 too_many_parallel_requests with
-- Retry-After. Each sender replica counts the requests it holds itself. Positive when set.

ALTER TABLE tokens ADD COLUMN IF NOT EXISTS max_parallel INTEGER CHECK (max_parallel >= 1);

INSERT INTO schema_version (version, name) VALUES (6, 'token_parallel') ON CONFLICT (version) DO NOTHING;
