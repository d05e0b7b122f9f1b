-- Schema 4: the longest a request of this token may take, in seconds.
-- max_seconds: NULL means the server's deadline (SENDER_DEADLINE_SECONDS); a value only ever
-- lowers it, so a batch token can give up sooner than interactive ones. Positive when set.

ALTER TABLE tokens ADD COLUMN IF NOT EXISTS max_seconds DOUBLE PRECISION CHECK (max_seconds > 0);

INSERT INTO schema_version (version, name) VALUES (4, 'token_deadline') ON CONFLICT (version) DO NOTHING;
