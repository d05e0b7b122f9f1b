-- Schema 2: who owns a token, whether it works, until when, for which models, how fast.
-- allowed_models: comma-separated model names; NULL or empty means every model.
-- rpm_limit / tpm_limit: requests / tokens per minute; NULL means no limit.
-- MySQL 8 has no ADD COLUMN IF NOT EXISTS: the columns are added only when missing.

SET @token_fields_missing = (
    SELECT COUNT(*) = 0 FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'tokens' AND column_name = 'enabled'
);
SET @token_fields_ddl = IF(
    @token_fields_missing,
    'ALTER TABLE tokens
        ADD COLUMN owner VARCHAR(255) NULL,
        ADD COLUMN enabled BOOLEAN NOT NULL DEFAULT TRUE,
        ADD COLUMN expires_at DATETIME NULL,
        ADD COLUMN allowed_models TEXT NULL,
        ADD COLUMN rpm_limit INTEGER NULL,
        ADD COLUMN tpm_limit INTEGER NULL',
    'DO 0'
);
PREPARE token_fields FROM @token_fields_ddl;
EXECUTE token_fields;
DEALLOCATE PREPARE token_fields;

INSERT IGNORE INTO schema_version (version, name) VALUES (2, 'token_fields');
