-- Add a token, or replace the one of the same name (new secret, fields reset to what is given).
--   mysql -e "SET @name='alice', @secret='sk-...', @priority=5, @threshold=100; SOURCE db-init/mysql/add_token.sql;"
-- Optional: @owner='team-a', @expires='2027-01-01 00:00', @models='llama,mistral', @rpm=60, @tpm=100000
--           @max_seconds=60 (a request gives up after that, if sooner than SENDER_DEADLINE_SECONDS)
-- Only the SHA-256 of the secret is stored, as the sender checks it.

INSERT INTO tokens
    (name, token_hash, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds)
VALUES (
    @name,
    SHA2(@secret, 256),
    NULLIF(@owner, ''),
    COALESCE(@priority, 0),
    COALESCE(@threshold, 100),
    TRUE,
    CAST(NULLIF(@expires, '') AS DATETIME),
    NULLIF(@models, ''),
    @rpm,
    @tpm,
    @max_seconds
)
ON DUPLICATE KEY UPDATE
    token_hash = VALUES(token_hash),
    owner = VALUES(owner),
    priority = VALUES(priority),
    threshold = VALUES(threshold),
    enabled = TRUE,
    expires_at = VALUES(expires_at),
    allowed_models = VALUES(allowed_models),
    rpm_limit = VALUES(rpm_limit),
    tpm_limit = VALUES(tpm_limit),
    max_seconds = VALUES(max_seconds);
