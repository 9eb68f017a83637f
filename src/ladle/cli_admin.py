"""`ladle tenants`, `ladle keys`, `ladle usage report`: HTTP clients of a running server's admin
API and /v1/usage (docs/tenants.md). They hold no logic of the server's: validation, costs and
sums come back from it; a refusal prints its message as one line (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import sys

from ladle.errors import LadleError

DEFAULT_URL = "http://127.0.0.1:8000"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
QUOTA_FLAGS = {  # flag dest -> the quota field it sets
    "rpm": "requests_per_minute", "tpm": "tokens_per_minute", "token_budget": "token_budget",
    "cost_budget": "cost_budget", "budget_period": "budget_period",
}  # fmt: skip
SUM_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens", "engine_s", "cost")


class Client:
    """Requests to one server with one bearer token; errors as LadleError."""

    def __init__(self, url: str, key: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        import httpx

        try:
            r = httpx.request(method, self.url + path, json=body, params=params, headers=self.headers, timeout=30)
        except httpx.HTTPError as e:
            raise LadleError(f"cannot reach the server at {self.url}: {e}") from None
        try:
            data = r.json()
        except ValueError:
            data = {}
        if r.status_code >= 400:
            message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else None
            raise LadleError(f"{method} {path}: {r.status_code}: {message or r.text.strip() or r.reason_phrase}")
        return data


def _client(args: argparse.Namespace, key: str | None = None) -> Client:
    key = key or args.admin_key
    if not key:
        raise LadleError("no key: give --admin-key KEY or set LADLE_ADMIN_KEY")
    return Client(args.url, key)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server ({DEFAULT_URL})")
    p.add_argument("--admin-key", default=os.environ.get("LADLE_ADMIN_KEY"), metavar="KEY",
                   help="the server's admin key (default: $LADLE_ADMIN_KEY)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the server's JSON")


def _when(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(rows: list[dict], columns: list[str], out=None) -> None:
    out = out or sys.stdout
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        out.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")


def _print(args, data: dict, rows: list[dict], columns: list[str]) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_table(rows, columns)
    return 0


# -- tenants ---------------------------------------------------------------------------------------


def _tenant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None, metavar="A,B", help="the models it may use (default: all)")
    p.add_argument("--priority-class", choices=["interactive", "batch"], default=None)
    p.add_argument("--weight", type=float, default=None, help="its share under fair scheduling (1)")
    p.add_argument("--rpm", type=int, default=None, metavar="N", help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, metavar="N", help="tokens per minute")
    p.add_argument("--token-budget", type=int, default=None, metavar="N", help="tokens per budget period")
    p.add_argument("--cost-budget", type=float, default=None, metavar="X", help="cost per budget period")
    p.add_argument("--budget-period", choices=["day", "month"], default=None)


def _tenant_body(args: argparse.Namespace) -> dict:
    """The fields the flags give (and only those: an update changes nothing else)."""
    body: dict = {}
    if args.models is not None:
        body["models"] = [m for m in args.models.split(",") if m]
    if args.priority_class is not None:
        body["priority_class"] = args.priority_class
    if args.weight is not None:
        body["weight"] = args.weight
    quota = {field: getattr(args, dest) for dest, field in QUOTA_FLAGS.items() if getattr(args, dest) is not None}
    if quota:
        body["quota"] = quota
    return body


def _tenant_row(t: dict) -> dict:
    q = t["quota"]
    return {
        "id": t["id"],
        "models": ",".join(t["models"]) or "(all)",
        "class": t["priority_class"],
        "weight": f"{t['weight']:g}",
        "rpm": q["requests_per_minute"],
        "tpm": q["tokens_per_minute"],
        "token_budget": q["token_budget"],
        "cost_budget": q["cost_budget"],
        "period": q["budget_period"],
    }


TENANT_COLUMNS = ["id", "models", "class", "weight", "rpm", "tpm", "token_budget", "cost_budget", "period"]


def _cmd_tenants_create(args) -> int:
    t = _client(args).call("POST", "/admin/tenants", {"id": args.id, **_tenant_body(args)})
    return _print(args, t, [_tenant_row(t)], TENANT_COLUMNS)


def _cmd_tenants_update(args) -> int:
    body = _tenant_body(args)
    if not body:
        raise LadleError("nothing to change: give --models, --priority-class, --weight or a quota flag")
    t = _client(args).call("PATCH", f"/admin/tenants/{args.id}", body)
    return _print(args, t, [_tenant_row(t)], TENANT_COLUMNS)


def _cmd_tenants_list(args) -> int:
    data = _client(args).call("GET", "/admin/tenants")
    return _print(args, data, [_tenant_row(t) for t in data["data"]], TENANT_COLUMNS)


def _cmd_tenants_delete(args) -> int:
    _client(args).call("DELETE", f"/admin/tenants/{args.id}")
    print(f"deleted tenant {args.id} and its keys")
    return 0


# -- keys ------------------------------------------------------------------------------------------

KEY_COLUMNS = ["id", "tenant", "prefix", "name", "created", "revoked"]


def _key_row(k: dict) -> dict:
    return {**k, "created": _when(k["created_s"]), "revoked": _when(k["revoked_s"])}


def _cmd_keys_create(args) -> int:
    k = _client(args).call("POST", f"/admin/tenants/{args.tenant}/keys", {"name": args.name})
    if args.json:
        print(json.dumps(k, indent=2))
    else:
        print(k["key"])
        print(f"key {k['id']} of tenant {k['tenant']}: this is the only time it is shown", file=sys.stderr)
    return 0


def _cmd_keys_list(args) -> int:
    data = _client(args).call("GET", "/admin/keys", params={"tenant": args.tenant} if args.tenant else None)
    return _print(args, data, [_key_row(k) for k in data["data"]], KEY_COLUMNS)


def _cmd_keys_revoke(args) -> int:
    k = _client(args).call("DELETE", f"/admin/keys/{args.key_id}")
    print(f"revoked {k['id']} ({k['prefix']}..., tenant {k['tenant']}) at {_when(k['revoked_s'])}")
    return 0


# -- usage -----------------------------------------------------------------------------------------


def parse_since(value: str, flag: str, now_s: float) -> str:
    """A duration back from now (`7d`, `12h`, `30m`) as Unix seconds, else the value as given (ISO
    8601 or Unix seconds, which the server reads)."""
    m = _DURATION.match(value.strip())
    if m:
        return repr(now_s - float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        float(value)
        return value
    except ValueError:
        pass
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise LadleError(f"{flag}: expected a duration (7d, 12h, 30m), an ISO 8601 time or Unix seconds, "
                         f"got {value!r}") from None  # fmt: skip
    return value


def _cmd_usage_report(args) -> int:
    import time

    now_s = time.time()
    params = {"group_by": args.by, "start": parse_since(args.since, "--since", now_s)}
    if args.until:
        params["end"] = parse_since(args.until, "--until", now_s)
    if args.granularity:
        params["granularity"] = args.granularity
    if args.tenant:
        params["tenant"] = args.tenant
    data = _client(args, args.api_key).call("GET", "/v1/usage", params=params)
    columns = (["bucket"] if data["granularity"] else []) + data["group_by"] + list(SUM_COLUMNS)
    rows = [{**r, "engine_s": f"{r['engine_s']:.3f}", "cost": f"{r['cost']:.6f}"} for r in data["data"]]
    if args.csv:
        writer = csv.DictWriter(sys.stdout, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    return _print(args, data, rows, columns)


def add_parsers(sub) -> None:
    """The tenants, keys and usage commands, on the `ladle` parser's subparsers."""
    ten = sub.add_parser("tenants", help="tenants of a running server (admin API)")
    ten = ten.add_subparsers(dest="tenants", metavar="ACTION", required=True)
    for name, func, help_ in (("create", _cmd_tenants_create, "a new tenant"),
                              ("update", _cmd_tenants_update, "change the fields given")):  # fmt: skip
        p = ten.add_parser(name, help=help_)
        p.add_argument("id", help="the tenant's id: a-z, 0-9, '.', '_', '-'")
        _tenant_flags(p)
        _common(p)
        p.set_defaults(func=func)
    p = ten.add_parser("list", help="every tenant")
    _common(p)
    p.set_defaults(func=_cmd_tenants_list)
    p = ten.add_parser("delete", help="a tenant and its keys (its usage rows stay)")
    p.add_argument("id")
    _common(p)
    p.set_defaults(func=_cmd_tenants_delete)

    keys = sub.add_parser("keys", help="tenants' API keys (admin API)")
    keys = keys.add_subparsers(dest="keys", metavar="ACTION", required=True)
    p = keys.add_parser("create", help="a new key for a tenant, printed once")
    p.add_argument("tenant")
    p.add_argument("--name", default="", help="what the key is for")
    _common(p)
    p.set_defaults(func=_cmd_keys_create)
    p = keys.add_parser("list", help="keys (ids and prefixes, never the keys)")
    p.add_argument("--tenant", default=None, help="one tenant's keys only")
    _common(p)
    p.set_defaults(func=_cmd_keys_list)
    p = keys.add_parser("revoke", help="refuse a key from now on")
    p.add_argument("key_id", help="the key's id (key_...)")
    _common(p)
    p.set_defaults(func=_cmd_keys_revoke)
    _add_usage_parser(sub)


def _add_usage_parser(sub) -> None:
    usage = sub.add_parser("usage", help="usage and cost reports (GET /v1/usage)")
    usage = usage.add_subparsers(dest="usage", metavar="ACTION", required=True)
    p = usage.add_parser("report", help="tokens, engine time and cost per group")
    p.add_argument(
        "--by",
        default="tenant,model",
        metavar="COLS",
        help="group by these: tenant, model, model_requested, key_id, api, outcome (tenant,model)",
    )
    p.add_argument("--since", default="7d", help="start: 7d, 12h, 30m back, ISO 8601 or Unix seconds (7d)")
    p.add_argument("--until", default=None, help="end, as --since (default: now)")
    p.add_argument("--granularity", choices=["hour", "day"], default=None, help="one row per group and bucket")
    p.add_argument("--tenant", default=None, help="one tenant only (the admin key; a tenant's key sees its own)")
    p.add_argument("--api-key", default=os.environ.get("LADLE_API_KEY"), metavar="KEY",
                   help="a tenant's key instead of the admin key (default: $LADLE_API_KEY)")  # fmt: skip
    p.add_argument("--csv", action="store_true", help="CSV on stdout")
    _common(p)
    p.set_defaults(func=_cmd_usage_report)
