-- Change a token's fields; fields not set stay as they are, 'none' clears an optional one.
--   mysql -e "SET @name='alice', @priority=7, @rpm=120, @expires='none'; SOURCE db-init/mysql/set_token.sql;"
-- Fields: @owner, @priority, @threshold, @enabled (TRUE/FALSE), @expires ('2027-01-01 00:00' or 'none'),
--         @models (comma-separated, or 'none' for all), @rpm, @tpm (a number, or 'none' for no limit),
--         @max_seconds (seconds a request may take, or 'none' for the server's deadline),
--         @max_parallel (requests queued or running at once, per sender replica, or 'none' for no limit).
-- A new mysql session starts with every @variable unset (NULL); in one session, reset those you set.
-- Values the sender could not honour (a priority off 0..@max_priority, a threshold below 1, a limit of
-- 0 or less, a date it cannot read) are refused with a message and nothing is changed.

-- Refuse values the sender could not honour, before anything is written (the database's CHECK
-- constraints would refuse some of them too, less clearly). Optional: @max_priority, the top of the
-- sender's priority scale (SENDER_MAX_PRIORITY, default 9). MariaDB raises the message with SIGNAL;
-- MySQL, which cannot SIGNAL outside a stored program, reports it as a value sql_mode refuses.
SET @token_refusal = CASE
    WHEN CAST(COALESCE(@max_priority, 9) AS CHAR) NOT REGEXP '^[0-9]{1,3}$' OR COALESCE(@max_priority, 9) > 255
        THEN CONCAT('refused: max_priority must be an integer from 0 to 255 - got ', @max_priority)
    WHEN @priority IS NOT NULL AND (CAST(@priority AS CHAR) NOT REGEXP '^[0-9]{1,9}$'
                                    OR CAST(@priority AS UNSIGNED) > COALESCE(@max_priority, 9))
        THEN CONCAT('refused: priority must be an integer from 0 to ', COALESCE(@max_priority, 9),
                    ' (higher is served first) - got ', @priority)
    WHEN @threshold IS NOT NULL AND (CAST(@threshold AS CHAR) NOT REGEXP '^[0-9]{1,10}$'
                                     OR CAST(@threshold AS UNSIGNED) < 1 OR CAST(@threshold AS UNSIGNED) > 2147483647)
        THEN CONCAT('refused: threshold must be an integer of at least 1 (the queue depth at which requests get 429) - got ', @threshold)
    WHEN @rpm IS NOT NULL AND CAST(@rpm AS CHAR) <> 'none' AND (CAST(@rpm AS CHAR) NOT REGEXP '^[0-9]{1,10}$'
                                                                OR CAST(@rpm AS UNSIGNED) < 1 OR CAST(@rpm AS UNSIGNED) > 2147483647)
        THEN CONCAT('refused: rpm must be a positive integer per minute or none for no limit - got ', @rpm)
    WHEN @tpm IS NOT NULL AND CAST(@tpm AS CHAR) <> 'none' AND (CAST(@tpm AS CHAR) NOT REGEXP '^[0-9]{1,10}$'
                                                                OR CAST(@tpm AS UNSIGNED) < 1 OR CAST(@tpm AS UNSIGNED) > 2147483647)
        THEN CONCAT('refused: tpm must be a positive integer per minute or none for no limit - got ', @tpm)
    WHEN @max_parallel IS NOT NULL AND CAST(@max_parallel AS CHAR) <> 'none' AND (CAST(@max_parallel AS CHAR) NOT REGEXP '^[0-9]{1,10}$'
                                                                OR CAST(@max_parallel AS UNSIGNED) < 1 OR CAST(@max_parallel AS UNSIGNED) > 2147483647)
        THEN CONCAT('refused: max_parallel must be a positive integer (requests at once) or none for no limit - got ', @max_parallel)
    WHEN @max_seconds IS NOT NULL AND CAST(@max_seconds AS CHAR) <> 'none'
         AND (CAST(@max_seconds AS CHAR) NOT REGEXP '^[0-9]*[.]?[0-9]+([eE][-+]?[0-9]+)?$' OR CAST(@max_seconds AS DOUBLE) <= 0)
        THEN CONCAT('refused: max_seconds must be a positive number of seconds or none for the server''s deadline - got ', @max_seconds)
    WHEN @expires IS NOT NULL AND CAST(@expires AS CHAR) NOT IN ('', 'none') AND CAST(@expires AS DATETIME) IS NULL
        THEN CONCAT('refused: expires must be a date (2027-01-01) or a date and time (2027-01-01 12:00) in the database''s local time or none - got ', @expires)
END;
SET @token_check = IF(@token_refusal IS NULL, 'DO 0', IF(VERSION() LIKE '%MariaDB%',
    CONCAT('SIGNAL SQLSTATE ''45000'' SET MESSAGE_TEXT = ', QUOTE(@token_refusal)),
    CONCAT('SET SESSION sql_mode = ', QUOTE(@token_refusal))));
PREPARE token_check FROM @token_check;
EXECUTE token_check;
DEALLOCATE PREPARE token_check;

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
                  ELSE CAST(@max_seconds AS DOUBLE) END,
    max_parallel = CASE WHEN @max_parallel IS NULL THEN max_parallel WHEN CAST(@max_parallel AS CHAR) = 'none' THEN NULL
                   ELSE CAST(@max_parallel AS SIGNED) END
WHERE name = @name AND @token_refusal IS NULL;
SELECT CONCAT('no token named ', @name, ': nothing changed') AS result
FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM tokens WHERE name = @name);
SELECT name, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds, max_parallel
FROM tokens WHERE name = @name;
