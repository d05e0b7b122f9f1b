"""The database tables, as SQLAlchemy sees them.

The schema itself is created by the numbered scripts in ``db-init/`` (one
source of truth that an operator can also apply with ``psql`` or ``mysql``);
these definitions only describe it for queries, and a test checks them
against what the scripts create on both databases.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

schema_version_table = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
)

tokens_table = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("threshold", sa.Integer, nullable=False, server_default="100"),
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("owner", sa.String(255), nullable=True),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("expires_at", sa.DateTime, nullable=True),
    sa.Column("allowed_models", sa.Text, nullable=True),
    sa.Column("rpm_limit", sa.Integer, nullable=True),
    sa.Column("tpm_limit", sa.Integer, nullable=True),
    sa.Column("max_seconds", sa.Double, sa.CheckConstraint("max_seconds > 0"), nullable=True),
    sa.Column("hash_kind", sa.String(16), nullable=False, server_default="sha256"),
    sa.Column("max_parallel", sa.Integer, sa.CheckConstraint("max_parallel >= 1"), nullable=True),
    sa.CheckConstraint("priority BETWEEN 0 AND 255", name="tokens_priority_range"),
    sa.CheckConstraint("threshold >= 1", name="tokens_threshold_positive"),
    sa.CheckConstraint("rpm_limit >= 1", name="tokens_rpm_positive"),
    sa.CheckConstraint("tpm_limit >= 1", name="tokens_tpm_positive"),
    sa.CheckConstraint("hash_kind IN ('sha256', 'hmac-sha256')", name="tokens_hash_kind"),
)

usage_table = sa.Table(
    "usage_records",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("finished_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("token_id", sa.Integer, nullable=True),
    sa.Column("token_name", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("path", sa.String(255), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("queue_ms", sa.Integer, nullable=True),
    sa.Column("total_ms", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("streamed", sa.Boolean, nullable=False),
    sa.Index("usage_records_token_time", "token_name", "finished_at"),
    sa.Index("usage_records_time", "finished_at"),
)

rate_windows_table = sa.Table(
    "rate_windows",
    metadata,
    sa.Column("token_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tokens", sa.BigInteger, nullable=False, server_default="0"),
)
