-- Schema 2: who owns a token, whether it works, until when, for which models, how fast.
-- allowed_models: comma-separated model names; NULL or empty means every model.
-- rpm_limit / tpm_limit: requests / tokens per minute; NULL means no limit.

ALTER TABLE tokens ADD COLUMN IF NOT EXISTS owner VARCHAR(255);
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS enabled BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS expires_at TIMESTAMP;
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS allowed_models TEXT;
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS rpm_limit INTEGER;
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS tpm_limit INTEGER;

INSERT INTO schema_version (version, name) VALUES (2, 'token_fields') ON CONFLICT (version) DO NOTHING;
