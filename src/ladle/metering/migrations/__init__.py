"""Alembic migrations of the metering database (tenants, api_keys, usage); run by Store.open."""
