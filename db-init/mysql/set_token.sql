-- Change a token's fields; fields not set stay as they are, 'none' clears an optional one.
--   mysql -e "SET @name='alice', @priority=7, @rpm=120, @expires='none'; SOURCE db-init/mysql/set_token.sql;"
-- Fields: @owner, @priority, @threshold, @enabled (TRUE/FALSE), @expires ('2027-01-01 00:00' or 'none'),
--         @models (comma-separated, or 'none' for all), @rpm, @tpm (a number, or 'none' for no limit),
--         @max_seconds (seconds a request may take, or 'none' for the server's deadline).
-- A new mysql session starts with every @variable unset (NULL); in one session, reset those you set.

UPDATE tokens SET
    owner = CASE WHEN @owner IS NULL THEN owner WHEN @owner = 'none' THEN NULL ELSE @owner END,
    priority = COALESCE(@priority, priority),
    threshold = COALESCE(@threshold, threshold),
    enabled = COALESCE(@enabled, enabled),
    expires_at = CASE WHEN @expires IS NULL THEN expires_at WHEN CAST(@expires AS CHAR) = 'none' THEN NULL
                 ELSE CAST(@expires AS DATETIME) END,
    allowed_models = CASE WHEN @models IS NULL THEN allowed_models WHEN @models = 'none' THEN NULL
                     ELSE @models END,
    rpm_limit = CASE WHEN @rpm IS NULL THEN rpm_limit WHEN CAST(@rpm AS CHAR) = 'none' THEN NULL
                ELSE CAST(@rpm AS SIGNED) END,
    tpm_limit = CASE WHEN @tpm IS NULL THEN tpm_limit WHEN CAST(@tpm AS CHAR) = 'none' THEN NULL
                ELSE CAST(@tpm AS SIGNED) END,
    max_seconds = CASE WHEN @max_seconds IS NULL THEN max_seconds WHEN CAST(@max_seconds AS CHAR) = 'none' THEN NULL
                  ELSE CAST(@max_seconds AS DOUBLE) END
WHERE name = @name;
SELECT name, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds
FROM tokens WHERE name = @name;
