-- Add a token, or replace the one of the same name (new secret, fields reset to what is given).
--   mysql -e "SET @name='alice', @secret='sk-...', @pepper='...', @priority=5, @threshold=100; SOURCE db-init/mysql/add_token.sql;"
-- Optional: @owner='team-a', @expires='2027-01-01 00:00', @models='llama,mistral', @rpm=60, @tpm=100000
--           @max_seconds=60 (a request gives up after that, if sooner than SENDER_DEADLINE_SECONDS)
--           @max_parallel=8 (requests queued or running at once, per sender replica)
-- @pepper: the senders' SENDER_TOKEN_PEPPER. The secret is stored as its HMAC-SHA-256 keyed with the
-- pepper, exactly as the sender computes it (built here from SHA2(), no function or privilege needed).
-- Without a pepper, as plain SHA-256 (a sender with a pepper still accepts it, and rewrites it with
-- the peppered hash the first time the token is used).
-- A new mysql session starts with every @variable unset (NULL); in one session, reset those you set.

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

-- HMAC-SHA-256 (RFC 2104): SHA2((K xor opad) || SHA2((K xor ipad) || secret)), K the pepper's bytes
-- (hashed first if longer than the 64-byte block), padded with zeros to 64 bytes; the XOR is done
-- 8 bytes at a time, as 64-bit integers (MariaDB has no XOR of binary strings).
SET @token_key = CAST(COALESCE(@pepper, '') AS BINARY);
SET @token_key = IF(LENGTH(@token_key) > 64, UNHEX(SHA2(@token_key, 256)), @token_key);
SET @token_key = RPAD(@token_key, 64, UNHEX('00'));
SET @token_ipad = CONCAT(
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 1, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 9, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 17, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 25, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 33, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 41, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 49, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 57, 8)), 16, 10) AS UNSIGNED) ^ 3906369333256140342), 16, '0')
);
SET @token_opad = CONCAT(
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 1, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 9, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 17, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 25, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 33, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 41, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 49, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0'),
    LPAD(HEX(CAST(CONV(HEX(SUBSTRING(@token_key, 57, 8)), 16, 10) AS UNSIGNED) ^ 6655295901103053916), 16, '0')
);
SET @token_hash = IF(COALESCE(@pepper, '') = '', SHA2(@secret, 256), SHA2(CONCAT(UNHEX(@token_opad),
    UNHEX(SHA2(CONCAT(UNHEX(@token_ipad), CAST(@secret AS BINARY)), 256))), 256));
SET @token_hash_kind = IF(COALESCE(@pepper, '') = '', 'sha256', 'hmac-sha256');
SET @token_key = NULL, @token_ipad = NULL, @token_opad = NULL;

INSERT INTO tokens
    (name, token_hash, hash_kind, owner, priority, threshold, enabled, expires_at, allowed_models, rpm_limit, tpm_limit, max_seconds, max_parallel)
SELECT
    @name,
    @token_hash,
    @token_hash_kind,
    NULLIF(@owner, ''),
    COALESCE(@priority, 0),
    COALESCE(@threshold, 100),
    TRUE,
    CAST(NULLIF(NULLIF(@expires, ''), 'none') AS DATETIME),
    NULLIF(@models, ''),
    IF(CAST(@rpm AS CHAR) = 'none', NULL, @rpm),
    IF(CAST(@tpm AS CHAR) = 'none', NULL, @tpm),
    IF(CAST(@max_seconds AS CHAR) = 'none', NULL, @max_seconds),
    IF(CAST(@max_parallel AS CHAR) = 'none', NULL, @max_parallel)
FROM DUAL
WHERE @token_refusal IS NULL  -- the mysql client goes on after an error in a SOURCEd file: write nothing
ON DUPLICATE KEY UPDATE
    token_hash = VALUES(token_hash),
    hash_kind = VALUES(hash_kind),
    owner = VALUES(owner),
    priority = VALUES(priority),
    threshold = VALUES(threshold),
    enabled = TRUE,
    expires_at = VALUES(expires_at),
    allowed_models = VALUES(allowed_models),
    rpm_limit = VALUES(rpm_limit),
    tpm_limit = VALUES(tpm_limit),
    max_seconds = VALUES(max_seconds),
    max_parallel = VALUES(max_parallel);
SET @token_hash = NULL;
