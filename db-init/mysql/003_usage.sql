-- Schema 3: one usage row per finished request, and the per-minute counters of the rate limits.

CREATE TABLE IF NOT EXISTS usage_records (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    finished_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    token_id INTEGER NULL,
    token_name VARCHAR(255) NOT NULL,
    model VARCHAR(255) NOT NULL,
    path VARCHAR(255) NOT NULL,
    request_id VARCHAR(64) NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    queue_ms INTEGER NULL,
    total_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    streamed BOOLEAN NOT NULL,
    INDEX usage_records_token_time (token_name, finished_at),
    INDEX usage_records_time (finished_at)
);

-- window_start: Unix time in minutes. Rows older than an hour are deleted by the senders.
CREATE TABLE IF NOT EXISTS rate_windows (
    token_id INTEGER NOT NULL,
    window_start BIGINT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, window_start)
);

INSERT IGNORE INTO schema_version (version, name) VALUES (3, 'usage');
