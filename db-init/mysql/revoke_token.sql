-- Revoke a token: it stops working within SENDER_TOKEN_CACHE_SECONDS. Its row (and usage) stays;
-- set_token.sql with @enabled=TRUE turns it back on.
--   mysql -e "SET @name='alice'; SOURCE db-init/mysql/revoke_token.sql;"

UPDATE tokens SET enabled = FALSE WHERE name = @name;
SELECT CONCAT('no token named ', @name, ': nothing changed') AS result
FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM tokens WHERE name = @name);
SELECT name, enabled FROM tokens WHERE name = @name;
