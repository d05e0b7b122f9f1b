-- Schema 1: the token table and the schema version table.
-- Idempotent: safe to run again. The version a database is at:
--   SELECT max(version) FROM schema_version;

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS tokens (
    id SERIAL PRIMARY KEY,
    name VARCHAR(255) NOT NULL UNIQUE,
    token_hash VARCHAR(64) NOT NULL UNIQUE,
    priority INTEGER NOT NULL DEFAULT 0,
    threshold INTEGER NOT NULL DEFAULT 100,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

INSERT INTO schema_version (version, name) VALUES (1, 'tokens') ON CONFLICT (version) DO NOTHING;
