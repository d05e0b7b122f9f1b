-- Schema 5: how each token's hash was made, and CHECK constraints on the token fields.
-- hash_kind: 'sha256' (plain SHA-256 of the secret, as before) or 'hmac-sha256' (keyed with the
-- sender's SENDER_TOKEN_PEPPER). Existing rows are 'sha256'; a sender with a pepper still accepts
-- them and rewrites each with its peppered hash the first time its token is used.
-- Rows the new checks would refuse are first brought within them, keeping what the sender did with
-- them: a priority below 0 was served as 0; a threshold below 1, or a limit of 0 or less, refused
-- every request, so such a token is disabled (and its value set to the lowest valid one).
-- MySQL 8 has neither ADD COLUMN IF NOT EXISTS nor ADD CONSTRAINT IF NOT EXISTS: each is added
-- only when information_schema does not list it (CHECK constraints: MySQL 8.0.16+, MariaDB 10.2+).

SET @token_hash_kind_missing = (
    SELECT COUNT(*) = 0 FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = 'tokens' AND column_name = 'hash_kind'
);
SET @token_hash_kind_ddl = IF(
    @token_hash_kind_missing,
    'ALTER TABLE tokens ADD COLUMN hash_kind VARCHAR(16) NOT NULL DEFAULT ''sha256''',
    'DO 0'
);
PREPARE token_hash_kind FROM @token_hash_kind_ddl;
EXECUTE token_hash_kind;
DEALLOCATE PREPARE token_hash_kind;

UPDATE tokens SET priority = 0 WHERE priority < 0;
UPDATE tokens SET priority = 255 WHERE priority > 255;
UPDATE tokens SET enabled = FALSE, threshold = 1 WHERE threshold < 1;
UPDATE tokens SET enabled = FALSE, rpm_limit = 1 WHERE rpm_limit < 1;
UPDATE tokens SET enabled = FALSE, tpm_limit = 1 WHERE tpm_limit < 1;

SET @token_check_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.table_constraints
     WHERE constraint_schema = DATABASE() AND table_name = 'tokens' AND constraint_name = 'tokens_priority_range') = 0,
    'ALTER TABLE tokens ADD CONSTRAINT tokens_priority_range CHECK (priority BETWEEN 0 AND 255)',
    'DO 0'
);
PREPARE token_check FROM @token_check_ddl;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

SET @token_check_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.table_constraints
     WHERE constraint_schema = DATABASE() AND table_name = 'tokens' AND constraint_name = 'tokens_threshold_positive') = 0,
    'ALTER TABLE tokens ADD CONSTRAINT tokens_threshold_positive CHECK (threshold >= 1)',
    'DO 0'
);
PREPARE token_check FROM @token_check_ddl;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

SET @token_check_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.table_constraints
     WHERE constraint_schema = DATABASE() AND table_name = 'tokens' AND constraint_name = 'tokens_rpm_positive') = 0,
    'ALTER TABLE tokens ADD CONSTRAINT tokens_rpm_positive CHECK (rpm_limit >= 1)',
    'DO 0'
);
PREPARE token_check FROM @token_check_ddl;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

SET @token_check_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.table_constraints
     WHERE constraint_schema = DATABASE() AND table_name = 'tokens' AND constraint_name = 'tokens_tpm_positive') = 0,
    'ALTER TABLE tokens ADD CONSTRAINT tokens_tpm_positive CHECK (tpm_limit >= 1)',
    'DO 0'
);
PREPARE token_check FROM @token_check_ddl;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

SET @token_check_ddl = IF(
    (SELECT COUNT(*) FROM information_schema.table_constraints
     WHERE constraint_schema = DATABASE() AND table_name = 'tokens' AND constraint_name = 'tokens_hash_kind') = 0,
    'ALTER TABLE tokens ADD CONSTRAINT tokens_hash_kind CHECK (hash_kind IN (''sha256'', ''hmac-sha256''))',
    'DO 0'
);
PREPARE token_check FROM @token_check_ddl;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

INSERT IGNORE INTO schema_version (version, name) VALUES (5, 'token_security');
