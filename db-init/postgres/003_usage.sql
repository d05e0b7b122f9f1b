-- Schema 3: one usage row per finished request, and the per-minute counters of the rate limits.

CREATE TABLE IF NOT EXISTS usage_records (
    id BIGSERIAL PRIMARY KEY,
    finished_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    token_id INTEGER,
    token_name VARCHAR(255) NOT NULL,
    model VARCHAR(255) NOT NULL,
    path VARCHAR(255) NOT NULL,
    request_id VARCHAR(64),
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    queue_ms INTEGER,
    total_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    streamed BOOLEAN NOT NULL
);

CREATE INDEX IF NOT EXISTS usage_records_token_time ON usage_records (token_name, finished_at);
CREATE INDEX IF NOT EXISTS usage_records_time ON usage_records (finished_at);

-- window_start: Unix time in minutes. Rows older than an hour are deleted by the senders.
CREATE TABLE IF NOT EXISTS rate_windows (
    token_id INTEGER NOT NULL,
    window_start BIGINT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, window_start)
);

INSERT INTO schema_version (version, name) VALUES (3, 'usage') ON CONFLICT (version) DO NOTHING;
