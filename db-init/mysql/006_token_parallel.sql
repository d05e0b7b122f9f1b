-- Schema 6: the most requests a token may have queued or running at once.
-- max_parallel: NULL means no limit; over it, a request gets 429 too_many_parallel_requests with
-- Retry-After. Each sender replica counts the requests it holds itself. Positive when set.
-- MySQL 8 has no ADD COLUMN IF NOT EXISTS: the column is added only when missing.

SET @token_parallel_missing = (
    SELECT COUNT(*) = 0 FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'tokens' AND column_name = 'max_parallel'
);
SET @token_parallel_ddl = IF(
    @token_parallel_missing,
    'ALTER TABLE tokens ADD COLUMN max_parallel INT NULL CHECK (max_parallel >= 1)',
    'DO 0'
);
PREPARE token_parallel FROM @token_parallel_ddl;
EXECUTE token_parallel;
DEALLOCATE PREPARE token_parallel;

INSERT IGNORE INTO schema_version (version, name) VALUES (6, 'token_parallel');
