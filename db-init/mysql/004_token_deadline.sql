-- Schema 4: the longest a request of this token may take, in seconds.
-- max_seconds: NULL means the server's deadline (SENDER_DEADLINE_SECONDS); a value only ever
-- lowers it, so a batch token can give up sooner than interactive ones. Positive when set.
-- MySQL 8 has no ADD COLUMN IF NOT EXISTS: the column is added only when missing.

SET @token_deadline_missing = (
    SELECT COUNT(*) = 0 FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'tokens' AND column_name = 'max_seconds'
);
SET @token_deadline_ddl = IF(
    @token_deadline_missing,
    'ALTER TABLE tokens ADD COLUMN max_seconds DOUBLE NULL CHECK (max_seconds > 0)',
    'DO 0'
);
PREPARE token_deadline FROM @token_deadline_ddl;
EXECUTE token_deadline;
DEALLOCATE PREPARE token_deadline;

INSERT IGNORE INTO schema_version (version, name) VALUES (4, 'token_deadline');
