-- Schema 1: the token table and the schema version table (MySQL 8 / MariaDB 10.11).
-- Idempotent: safe to run again. The version a database is at:
--   SELECT max(version) FROM schema_version;

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    applied_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(255) NOT NULL UNIQUE,
    token_hash VARCHAR(64) NOT NULL UNIQUE,
    priority INTEGER NOT NULL DEFAULT 0,
    threshold INTEGER NOT NULL DEFAULT 100,
    created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);

INSERT IGNORE INTO schema_version (version, name) VALUES (1, 'tokens');
