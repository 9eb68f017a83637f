"""The first schema: tenants, their API keys, the usage ledger.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("priority_class", sa.String(32), nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("requests_per_minute", sa.Integer),
        sa.Column("tokens_per_minute", sa.BigInteger),
        sa.Column("token_budget", sa.BigInteger),
        sa.Column("cost_budget", sa.Float),
        sa.Column("budget_period", sa.String(16), nullable=False),
        sa.Column("created_s", sa.Double, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_s", sa.Double, nullable=False),
        sa.Column("revoked_s", sa.Double),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "usage",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("time_s", sa.Double, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("api", sa.String(255), nullable=False),
        sa.Column("model_requested", sa.String(255)),
        sa.Column("model", sa.String(255)),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("queue_s", sa.Double),
        sa.Column("ttft_s", sa.Double),
        sa.Column("duration_s", sa.Double, nullable=False),
        sa.Column("engine_s", sa.Double, nullable=False),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("cost", sa.Double, nullable=False),
    )
    op.create_index("ix_usage_time_s", "usage", ["time_s"])
    op.create_index("ix_usage_tenant_time_s", "usage", ["tenant", "time_s"])


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("api_keys")
    op.drop_table("tenants")
