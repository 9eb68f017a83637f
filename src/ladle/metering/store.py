"""Where tenants, their keys and the usage ledger persist: one schema (SQLAlchemy Core) on SQLite
or PostgreSQL, created and upgraded by the Alembic migrations in `migrations/` when it opens.

SQLite (the default: DATA_DIR/ladle.db) runs in WAL mode with synchronous=NORMAL: a writer's
committed transactions survive a kill -9 of the process, readers never block it. PostgreSQL URLs
(`postgresql://...`) go through psycopg 3. Every method is blocking: the server calls them from a
thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import sqlalchemy as sa

from ladle.config import MeteringConfig
from ladle.errors import LadleError
from ladle.metering.tenants import KeyRecord, Quota, Tenant, TenantDirectory
from ladle.metering.usage import UsageRecord

GROUP_COLUMNS = ("tenant", "model", "model_requested", "key_id", "api", "outcome")  # what a report groups by
GRANULARITIES = {"hour": 3600, "day": 86400}  # a report's time buckets (UTC), in seconds
QUOTA_FIELDS = tuple(f.name for f in dataclasses.fields(Quota))
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x1AD1E  # pg_advisory_xact_lock key: one process migrates at a time

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
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

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("created_s", sa.Double, nullable=False),
    sa.Column("revoked_s", sa.Double),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time_s", sa.Double, nullable=False, index=True),
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
    sa.Index("ix_usage_tenant_time_s", "tenant", "time_s"),
)


class NotFound(LadleError):
    """No tenant or key of that id."""


class Conflict(LadleError):
    """A tenant of that id exists already."""


def database_url(cfg: MeteringConfig) -> str:
    """The SQLAlchemy URL of cfg.database, or the SQLite file under cfg.data_dir (created)."""
    if cfg.database:
        for scheme in ("postgresql://", "postgres://"):
            if cfg.database.startswith(scheme):
                return "postgresql+psycopg://" + cfg.database[len(scheme) :]
        return cfg.database
    data_dir = Path(cfg.data_dir).expanduser()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LadleError(f"--data-dir {cfg.data_dir}: cannot create it: {e.strerror or e}") from None
    return f"sqlite:///{data_dir / 'ladle.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=10000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def shown(url: str) -> str:
    """The URL as an error may print it: no password."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def create_engine(url: str) -> sa.Engine:
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise LadleError(
            f"--database {shown(url)}: cannot open this URL ({e}): use sqlite:///FILE or postgresql://USER@HOST/DB"
        ) from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@contextlib.contextmanager
def _migration_lock(conn: sa.Connection, url: sa.URL):
    """One process migrates at a time (two servers starting on a fresh database)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
        yield
    elif conn.dialect.name == "sqlite" and url.database not in (None, "", ":memory:"):
        import fcntl

        with open(f"{url.database}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    else:
        yield


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration (nothing to do where it is there already)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn, _migration_lock(conn, engine.url):
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    """Tenants, keys and usage rows in one database; thread-safe (a connection pool)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    @classmethod
    def open(cls, cfg: MeteringConfig) -> Store:
        url = database_url(cfg)
        engine = create_engine(url)
        try:
            migrate(engine)
        except sa.exc.OperationalError as e:
            engine.dispose()
            where = f"--database {shown(cfg.database)}" if cfg.database else f"--data-dir {cfg.data_dir}"
            problem = " ".join(str(e.orig or e).split())  # one line
            raise LadleError(f"{where}: cannot open the metering database: {problem}") from None
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- tenants -----------------------------------------------------------------------------------

    def tenants(self) -> list[Tenant]:
        with self.engine.connect() as conn:
            return [_tenant(r) for r in conn.execute(sa.select(tenants).order_by(tenants.c.id))]

    def tenant(self, tenant_id: str) -> Tenant:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        return _tenant(row)

    def create_tenant(self, tenant: Tenant) -> Tenant:
        try:
            with self.engine.begin() as conn:
                conn.execute(tenants.insert().values(_tenant_row(tenant)))
        except sa.exc.IntegrityError:
            raise Conflict(f"tenant {tenant.id!r} already exists") from None
        return tenant

    def update_tenant(self, tenant: Tenant) -> Tenant:
        row = {k: v for k, v in _tenant_row(tenant).items() if k not in ("id", "created_s")}
        with self.engine.begin() as conn:
            done = conn.execute(tenants.update().where(tenants.c.id == tenant.id).values(row)).rowcount
        if not done:
            raise NotFound(f"no tenant {tenant.id!r}")
        return tenant

    def delete_tenant(self, tenant_id: str) -> None:
        """The tenant and its keys; its usage rows stay (the ledger is history)."""
        with self.engine.begin() as conn:
            conn.execute(api_keys.delete().where(api_keys.c.tenant == tenant_id))
            done = conn.execute(tenants.delete().where(tenants.c.id == tenant_id)).rowcount
        if not done:
            raise NotFound(f"no tenant {tenant_id!r}")

    # -- keys --------------------------------------------------------------------------------------

    def create_key(self, key: KeyRecord) -> KeyRecord:
        with self.engine.begin() as conn:
            if conn.execute(sa.select(tenants.c.id).where(tenants.c.id == key.tenant)).first() is None:
                raise NotFound(f"no tenant {key.tenant!r}")
            conn.execute(api_keys.insert().values(dataclasses.asdict(key)))
        return key

    def keys(self, tenant: str | None = None) -> list[KeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_s, api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [KeyRecord(**r._asdict()) for r in conn.execute(query)]

    def revoke_key(self, key_id: str, when_s: float | None = None) -> KeyRecord:
        """The key, revoked (a key revoked before keeps its first revocation time)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            key = KeyRecord(**row._asdict())
            if key.revoked_s is None:
                key = dataclasses.replace(key, revoked_s=time.time() if when_s is None else when_s)
                conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(revoked_s=key.revoked_s))
        return key

    def load_directory(self) -> TenantDirectory:
        """The tenants and their live keys, for the server's authentication."""
        return TenantDirectory(self.tenants(), [k for k in self.keys() if k.revoked_s is None])

    # -- usage -------------------------------------------------------------------------------------

    def insert_usage(self, rows: list[UsageRecord]) -> None:
        """All the rows in one transaction: a crash keeps all of them or none."""
        if rows:
            with self.engine.begin() as conn:
                conn.execute(usage.insert(), [dataclasses.asdict(r) for r in rows])

    def usage_report(
        self,
        group_by: tuple[str, ...] = (),
        start_s: float | None = None,
        end_s: float | None = None,
        granularity: str | None = None,
        tenant: str | None = None,
    ) -> list[dict]:
        """Sums of the rows with start_s <= time_s < end_s, per group (and per UTC hour or day
        bucket: `bucket` is its start in Unix seconds, None without a granularity)."""
        keys = _report_keys(group_by, granularity)
        query = sa.select(*keys, *_SUMS).group_by(*keys)
        for condition in _report_filter(start_s, end_s, tenant):
            query = query.where(condition)
        with self.engine.connect() as conn:
            out = [_report_row(r._asdict(), group_by) for r in conn.execute(query)]
        out = [r for r in out if r["requests"]]  # no grouping over no rows sums to one empty row
        return sorted(out, key=lambda r: (r["bucket"] or 0.0, *[(r[g] is None, r[g] or "") for g in group_by]))


_SUMS = (
    sa.func.count().label("requests"),
    sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
    sa.func.coalesce(sa.func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
    sa.func.coalesce(sa.func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
    sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0).label("total_tokens"),
    sa.func.coalesce(sa.func.sum(usage.c.engine_s), 0.0).label("engine_s"),
    sa.func.coalesce(sa.func.sum(usage.c.cost), 0.0).label("cost"),
)
_INT_SUMS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")


def _report_keys(group_by: tuple[str, ...], granularity: str | None) -> list:
    unknown = [g for g in group_by if g not in GROUP_COLUMNS]
    if unknown:
        raise LadleError(f"group_by: unknown column {unknown[0]!r} (choose from {', '.join(GROUP_COLUMNS)})")
    keys = [usage.c[g] for g in dict.fromkeys(group_by)]
    if granularity is None:
        return keys
    if granularity not in GRANULARITIES:
        raise LadleError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    width = sa.literal_column(str(GRANULARITIES[granularity]))  # literal: the same SQL in SELECT and GROUP BY
    return [(sa.func.floor(usage.c.time_s / width) * width).label("bucket"), *keys]


def _report_filter(start_s: float | None, end_s: float | None, tenant: str | None) -> list:
    conditions = []
    if start_s is not None:
        conditions.append(usage.c.time_s >= start_s)
    if end_s is not None:
        conditions.append(usage.c.time_s < end_s)
    if tenant is not None:
        conditions.append(usage.c.tenant == tenant)
    return conditions


def _report_row(row: dict, group_by: tuple[str, ...]) -> dict:
    """Plain numbers (PostgreSQL sums integers as numeric) in a fixed order: bucket, groups, sums."""
    out = {"bucket": float(row["bucket"]) if row.get("bucket") is not None else None}
    out.update({g: row[g] for g in group_by})
    out.update({k: int(row[k]) for k in _INT_SUMS})
    out.update(engine_s=float(row["engine_s"]), cost=float(row["cost"]))
    return out


def _tenant_row(t: Tenant) -> dict:
    quota = {f: getattr(t.quota, f) for f in QUOTA_FIELDS}
    return {"id": t.id, "models": list(t.models), "priority_class": t.priority_class, "weight": t.weight,
            **quota, "created_s": t.created_s}  # fmt: skip


def _tenant(row) -> Tenant:
    m = row._mapping
    return Tenant(
        id=m["id"],
        models=tuple(m["models"]),
        priority_class=m["priority_class"],
        weight=m["weight"],
        quota=Quota(**{f: m[f] for f in QUOTA_FIELDS}),
        created_s=m["created_s"],
    )
