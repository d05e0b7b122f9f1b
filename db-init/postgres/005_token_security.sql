-- Schema 5: how each token's hash was made, and CHECK constraints on the token fields.
-- hash_kind: 'sha256' (plain SHA-256 of the secret, as before) or 'hmac-sha256' (keyed with the
-- sender's SENDER_TOKEN_PEPPER). Existing rows are 'sha256'; a sender with a pepper still accepts
-- them and rewrites each with its peppered hash the first time its token is used.
-- Rows the new checks would refuse are first brought within them, keeping what the sender did with
-- them: a priority below 0 was served as 0; a threshold below 1, or a limit of 0 or less, refused
-- every request, so such a token is disabled (and its value set to the lowest valid one).

SET client_min_messages = warning;

ALTER TABLE tokens ADD COLUMN IF NOT EXISTS hash_kind VARCHAR(16) NOT NULL DEFAULT 'sha256';

UPDATE tokens SET priority = 0 WHERE priority < 0;
UPDATE tokens SET priority = 255 WHERE priority > 255;
UPDATE tokens SET enabled = FALSE, threshold = 1 WHERE threshold < 1;
UPDATE tokens SET enabled = FALSE, rpm_limit = 1 WHERE rpm_limit < 1;
UPDATE tokens SET enabled = FALSE, tpm_limit = 1 WHERE tpm_limit < 1;

ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_priority_range;
ALTER TABLE tokens ADD CONSTRAINT tokens_priority_range CHECK (priority BETWEEN 0 AND 255);
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_threshold_positive;
ALTER TABLE tokens ADD CONSTRAINT tokens_threshold_positive CHECK (threshold >= 1);
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_rpm_positive;
ALTER TABLE tokens ADD CONSTRAINT tokens_rpm_positive CHECK (rpm_limit >= 1);
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_tpm_positive;
ALTER TABLE tokens ADD CONSTRAINT tokens_tpm_positive CHECK (tpm_limit >= 1);
ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_hash_kind;
ALTER TABLE tokens ADD CONSTRAINT tokens_hash_kind CHECK (hash_kind IN ('sha256', 'hmac-sha256'));

INSERT INTO schema_version (version, name) VALUES (5, 'token_security') ON CONFLICT (version) DO NOTHING;
