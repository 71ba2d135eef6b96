"""An HTTP reverse proxy on 127.0.0.1 that emulates the published limits of Azure ML's or
Databricks' MLflow endpoints in front of a plain `mlflow server`.

These are emulations of limits reported in public sources, not the services. Each rule in
PROFILES names its source as a GitHub reference (owner/repo#number) or a document title, and
every error the proxy sends repeats the rule's source and states that it comes from this
emulation. No rule was checked against a live service.

Run it as `python -m rig.policy_proxy --profile azureml|databricks --target-port T
[--listen-port P] [--control-port C] [--limits JSON] [--tls-cert-file F --tls-key-file K]
[--strip-path-prefix REGEX] [--bearer-token-file F] [--dbfs-root DIR]
[--emulate-run-artifacts]`. Port 0 lets the system pick a free port. Once both listeners are
bound, the proxy prints one JSON line to stdout,
`{"listen_port": ..., "control_port": ...}`. It stops on SIGTERM or SIGINT.

The proxy reads each request body in full, checks it against the profile, and then forwards
it to the target, possibly rewritten (tags dropped at runs/create), or responds itself with
an MLflow-style JSON error. Requests outside the MLflow REST API (`/api/2.0/mlflow/...`,
`/ajax-api/2.0/mlflow/...`) pass through unchanged.

The proxy can also stand in for a service's front door, so that the real Databricks and
Azure ML clients reach it: with `--tls-cert-file` and `--tls-key-file` it serves https;
with the environment variable RIG_PROXY_BEARER_TOKEN set, or `--bearer-token-file` naming a
file that contains the token, it responds with 401 to a request whose `Authorization` header is
not `Bearer <that token>`, and never logs the token; with
`--strip-path-prefix` it removes a leading match of the regular expression from each path
(Azure ML's `/mlflow/v2.0/subscriptions/.../workspaces/<ws>`) before applying the rules.
Under the databricks profile it responds itself to the Databricks SDK's discovery request
`GET /.well-known/databricks-config`, which carries no token. With `--dbfs-root` it serves the
DBFS calls of MLflow's DBFS artifact repository from files under that folder
(`rig.dbfs_emulation`), after the token check. With `--emulate-run-artifacts` it serves
Azure ML's run artifact routes itself (`rig.azureml_artifacts`), after the token check.

Control endpoint (GET only, one JSON object per response):
  /throttle?count=K&retry_after_s=S
               respond to the next K requests on a throttled route (runs/log-batch) with 429
               REQUEST_LIMIT_EXCEEDED and `Retry-After: S`, without forwarding them
  /stats       requests seen and forwarded, requests per route, the filters of the last
               1,000 search requests, rejections per rule, throttling, dropped tags and
               hidden experiments, unauthenticated requests, DBFS requests

`PolicyProxy` starts this module as a subprocess in its own session and controls it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import hmac
import re
import signal
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

import aiohttp
from aiohttp import web

from rig.dbfs_emulation import DbfsEmulation
from rig.proxy_process import HOST, ControlClient, ProxyProcess
from rig.tls import CertificateFiles

log = logging.getLogger("rig.policy_proxy")



class Limit(NamedTuple):
    """One published limit of a backend: the value the proxy enforces and its public source."""

    value: object
    source: str


# The rules of each profile. A rule missing from a profile is not enforced. `--limits` (or
# `PolicyProxy(limits=...)`) replaces a value, and a value of None turns the rule off.
PROFILES: dict[str, dict[str, Limit]] = {
    "azureml": {
        "max_metric_values_per_key_per_batch": Limit(
            250, 'mlflow/mlflow#11462 ("MetricV2Dto.Value Count Limit=250")'
        ),
        "max_params_per_run": Limit(200, "Azure/azure-sdk-for-python#35685"),
        "max_param_value_length": Limit(500, "kedro-mlflow#551"),
        "rejected_run_tags": Limit(("mlflow.user",), "mlflow/mlflow-export-import#78"),
        # mlflow.user is dropped here too, because the service rejects it as a tag.
        "dropped_create_run_tags": Limit(
            ("mlflow.source.name", "mlflow.source.type", "mlflow.user"),
            "Azure/azure-sdk-for-python#45207, mlflow/mlflow-export-import#78",
        ),
        # The page size must be under 1,000, so 999 is the largest accepted.
        "max_metric_history_page_size": Limit(999, "mlflow/mlflow#10694"),
        "missing_routes": Limit(
            ("logged-models", "experiments/update"),
            "Azure/azure-sdk-for-python#44896 (logged models), "
            "Microsoft's MLflow support matrix for Azure ML (experiment rename)",
        ),
        "hidden_experiment_name_pattern": Limit("/", "Azure/azure-sdk-for-python#45209"),
        "hidden_experiments_left_out_of_search": Limit(True, "Azure/azure-sdk-for-python#45209"),
        "search_rejects_or": Limit(True, "Azure/azure-sdk-for-python#41453"),
        "search_rejects_tag_not_equal": Limit(True, "Azure/azure-sdk-for-python#41453"),
        "search_rejects_tag_like": Limit(True, "Azure/azure-sdk-for-python#41453"),
        "search_rejected_order_by_prefixes": Limit(
            ("metrics", "metric", "params", "param", "tags", "tag"),
            "Azure/azure-sdk-for-python#41453",
        ),
        "throttled_routes": Limit(("runs/log-batch",), "mlflow/mlflow#11462"),
    },
    "databricks": {
        "max_metrics_per_batch": Limit(1000, "MLflow REST API LogBatch limits"),
        "max_params_per_batch": Limit(100, "MLflow REST API LogBatch limits"),
        "max_tags_per_batch": Limit(100, "MLflow REST API LogBatch limits"),
        "max_entities_per_batch": Limit(1000, "MLflow REST API LogBatch limits"),
        # NOTE: no public source for 1,600 params per run was at hand.
        "max_params_per_run": Limit(1600, "Databricks resource limits (unverified)"),
        "max_param_value_length": Limit(6000, "mlflow/mlflow PR #9709"),
        # An absolute workspace path: /Users/<user>/... or /Shared/..., also accepted with a
        # leading /Workspace or repeated slashes, which the next rule then hides.
        "experiment_name_pattern": Limit(
            r"^/+(Workspace/+)?(Users/+[^/]+|Shared)/+[^/]", "mlflow/mlflow#8269"
        ),
        "hidden_experiment_name_pattern": Limit(r"^(/Workspace/|//)", "mlflow/mlflow#11077"),
        "throttled_routes": Limit(("runs/log-batch",), "databrickslabs/dbx#690"),
    },
}
SERVICE_NAMES = {"azureml": "Azure ML", "databricks": "Databricks"}

# MLflow REST paths: the route is the part after "mlflow/", such as "runs/log-batch".
MLFLOW_PATH = re.compile(r"^/(?:ajax-)?api/2\.0/(?:preview/)?mlflow/(?P<route>.+?)/?$")
# Headers that describe one connection or one encoding of the body, so they are not copied.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length",
        "content-encoding", "accept-encoding",
    }
)
MAX_REQUEST_BODY_BYTES = 256 * 1024 * 1024
MAX_RECORDED_SEARCH_FILTERS = 1000
MAX_THROTTLE_COUNT = 1_000_000
MAX_RETRY_AFTER_S = 86_400
TARGET_TIMEOUT_S = 300
# Environment variable with the bearer token the proxy requires; unset accepts any request.
BEARER_TOKEN_ENV = "RIG_PROXY_BEARER_TOKEN"
# The Databricks SDK requests this path without credentials whenever it builds a client, and
# logs a warning unless it gets a JSON object. The rig's workspace id is made up.
DATABRICKS_METADATA_PATH = "/.well-known/databricks-config"
DATABRICKS_METADATA = {"workspace_id": "1000000000000001"}

# Single- or double-quoted string literals and backquoted identifiers of an MLflow filter.
_FILTER_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`")
_FILTER_OR = re.compile(r"\bOR\b", re.IGNORECASE)
# A tag identifier (quoted parts already replaced by _) followed by a comparator.
_FILTER_TAG_NOT_EQUAL = re.compile(r"\btags?\.[\w.\-]+\s*(?:!=|<>)", re.IGNORECASE)
_FILTER_TAG_LIKE = re.compile(r"\btags?\.[\w.\-]+\s+(?:NOT\s+)?I?LIKE\b", re.IGNORECASE)



class PolicyViolation(Exception):
    """A request that the emulated backend would reject, with the MLflow error to send."""

    def __init__(self, rule: str, status: int, error_code: str, message: str):
        super().__init__(message)
        self.rule = rule
        self.status = status
        self.error_code = error_code
        self.message = message


class Policy:
    """The rules of one profile, applied to parsed MLflow requests and responses."""

    def __init__(self, profile: str, overrides: dict | None = None):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        self.profile = profile
        self.service = SERVICE_NAMES[profile]
        self.rules = dict(PROFILES[profile])
        for name, value in (overrides or {}).items():
            self.rules[name] = Limit(value, "overridden by --limits")

    def limit(self, rule: str):
        """Return the value of `rule`, or None when this profile does not enforce it."""
        entry = self.rules.get(rule)
        return None if entry is None else entry.value

    def violation(
        self, rule: str, detail: str, status: int = 400, error_code: str = "INVALID_PARAMETER_VALUE"
    ) -> PolicyViolation:
        """Build the error for `rule`, with the gist that it is an emulated published limit."""
        message = (
            f"{detail} [rig.policy_proxy: emulation of a published {self.service} limit "
            f"({self.rules[rule].source}), not the real service]"
        )
        return PolicyViolation(rule, status, error_code, message)

    def is_missing_route(self, route: str) -> bool:
        missing = self.limit("missing_routes") or ()
        return any(route == prefix or route.startswith(prefix + "/") for prefix in missing)

    def is_throttled_route(self, route: str) -> bool:
        return route in (self.limit("throttled_routes") or ())

    def is_hidden_experiment_name(self, name: str) -> bool:
        pattern = self.limit("hidden_experiment_name_pattern")
        return pattern is not None and re.search(pattern, name) is not None

    # Checks of one request each. `fields` is the parsed JSON body, or the query of a GET.

    def check_batch(self, fields: dict) -> None:
        """Check the per-request limits of runs/log-batch."""
        metrics = fields.get("metrics") or []
        params = fields.get("params") or []
        tags = fields.get("tags") or []
        for rule, count, what in (
            ("max_metrics_per_batch", len(metrics), "metrics"),
            ("max_params_per_batch", len(params), "params"),
            ("max_tags_per_batch", len(tags), "tags"),
            ("max_entities_per_batch", len(metrics) + len(params) + len(tags), "entities"),
        ):
            maximum = self.limit(rule)
            if maximum is not None and count > maximum:
                raise self.violation(
                    rule,
                    f"A log-batch request may contain at most {maximum} {what}, but this one "
                    f"contains {count}. Split the batch.",
                )

        maximum = self.limit("max_metric_values_per_key_per_batch")
        if maximum is not None:
            counts = collections.Counter(metric.get("key") for metric in metrics)
            for key, count in counts.items():
                if count > maximum:
                    raise self.violation(
                        "max_metric_values_per_key_per_batch",
                        f"A log-batch request may contain at most {maximum} values of one "
                        f"metric key, but it contains {count} values of {key!r}. Split the batch.",
                    )
        self.check_tags(tags)

    def check_tags(self, tags: list[dict]) -> None:
        rejected = self.limit("rejected_run_tags") or ()
        for tag in tags:
            if tag.get("key") in rejected:
                raise self.violation(
                    "rejected_run_tags",
                    f"The run tag {tag.get('key')!r} is reserved and cannot be set.",
                )

    def check_param_values(self, params: list[dict]) -> None:
        maximum = self.limit("max_param_value_length")
        if maximum is None:
            return
        for param in params:
            length = len(str(param.get("value", "")))
            if length > maximum:
                raise self.violation(
                    "max_param_value_length",
                    f"The value of param {param.get('key')!r} is {length} characters long; "
                    f"the maximum is {maximum}.",
                )

    def check_params_per_run(self, run_id: str, existing_keys: set, params: list[dict]) -> None:
        """Check the number of distinct param keys on the run after this request."""
        maximum = self.limit("max_params_per_run")
        if maximum is None:
            return
        total = len(existing_keys | {param.get("key") for param in params})
        if total > maximum:
            raise self.violation(
                "max_params_per_run",
                f"Run {run_id} would have {total} params ({len(existing_keys)} already logged); "
                f"the maximum per run is {maximum}.",
            )

    def drop_create_run_tags(self, fields: dict) -> list[str]:
        """Remove the tags this backend drops at runs/create; return the dropped keys."""
        dropped_keys = self.limit("dropped_create_run_tags") or ()
        tags = fields.get("tags") or []
        kept = [tag for tag in tags if tag.get("key") not in dropped_keys]
        dropped = [tag.get("key") for tag in tags if tag.get("key") in dropped_keys]
        if dropped:
            fields["tags"] = kept
        return dropped

    def check_metric_history(self, fields: dict) -> None:
        maximum = self.limit("max_metric_history_page_size")
        raw = fields.get("max_results")
        if maximum is None or raw in (None, ""):
            return
        try:
            page_size = int(raw)
        except (TypeError, ValueError):
            return
        if page_size > maximum:
            # The error reported from the service for this limit has BAD_REQUEST (mlflow/mlflow#10694).
            raise self.violation(
                "max_metric_history_page_size",
                f"max_results {page_size} is too large for metrics/get-history; the maximum "
                f"is {maximum}.",
                error_code="BAD_REQUEST",
            )

    def check_experiment_name(self, name: str) -> None:
        pattern = self.limit("experiment_name_pattern")
        if pattern is not None and re.search(pattern, name or "") is None:
            raise self.violation(
                "experiment_name_pattern",
                f"Invalid experiment name {name!r}: it must be an absolute workspace path, "
                "/Users/<user>/<name> or /Shared/<name>.",
            )

    def check_search(self, fields: dict) -> None:
        """Check the filter and order_by of runs/search or experiments/search."""
        filter_string = fields.get("filter") or ""
        unquoted = _FILTER_QUOTED.sub("_", filter_string)
        for rule, pattern, what in (
            ("search_rejects_or", _FILTER_OR, "OR"),
            ("search_rejects_tag_not_equal", _FILTER_TAG_NOT_EQUAL, "!= on a tag"),
            ("search_rejects_tag_like", _FILTER_TAG_LIKE, "LIKE or ILIKE on a tag"),
        ):
            if self.limit(rule) and pattern.search(unquoted):
                raise self.violation(
                    rule, f"Unsupported search filter {filter_string!r}: {what} is not supported."
                )

        prefixes = self.limit("search_rejected_order_by_prefixes") or ()
        order_by = fields.get("order_by") or []
        if isinstance(order_by, str):
            order_by = [order_by]
        for clause in order_by:
            entity = clause.strip().lstrip("`").split(".", 1)[0].lower()
            if "." in clause and entity in prefixes:
                raise self.violation(
                    "search_rejected_order_by_prefixes",
                    f"Unsupported order_by {clause!r}: ordering by metrics, params or tags is "
                    "not supported.",
                )

    def filter_experiments(self, payload: dict) -> int:
        """Remove hidden experiments from a search response; return how many were removed."""
        if not self.limit("hidden_experiments_left_out_of_search"):
            return 0
        experiments = payload.get("experiments") or []
        visible = [e for e in experiments if not self.is_hidden_experiment_name(e.get("name", ""))]
        if len(visible) != len(experiments):
            payload["experiments"] = visible
        return len(experiments) - len(visible)


class ProxyState:
    """Counters and the pending throttle of one proxy."""

    def __init__(self):
        self.requests_total = 0
        self.forwarded = 0
        self.rejected = collections.Counter()
        self.throttle_count = 0
        self.throttle_retry_after_s = 0
        self.throttled = 0
        self.dropped_tags = collections.Counter()
        self.experiments_hidden = 0
        self.target_failures = 0
        # Requests per MLflow route, and the filter of each recent search request.
        self.routes = collections.Counter()
        self.search_filters = collections.deque(maxlen=MAX_RECORDED_SEARCH_FILTERS)
        self.unauthenticated = 0
        # Requests served by the DBFS emulation, by method and path ("POST /dbfs", ...).
        self.dbfs_requests = collections.Counter()

    def take_throttle(self) -> int | None:
        """Consume one pending throttle and return its Retry-After in seconds, or None."""
        if self.throttle_count <= 0:
            return None
        self.throttle_count -= 1
        self.throttled += 1
        return self.throttle_retry_after_s

    def snapshot(self) -> dict:
        return {
            "requests_total": self.requests_total,
            "forwarded": self.forwarded,
            "rejected": dict(self.rejected),
            "throttle_pending": self.throttle_count,
            "throttle_retry_after_s": self.throttle_retry_after_s,
            "throttled": self.throttled,
            "dropped_tags": dict(self.dropped_tags),
            "experiments_hidden": self.experiments_hidden,
            "target_failures": self.target_failures,
            "routes": dict(self.routes),
            "search_filters": list(self.search_filters),
            "unauthenticated": self.unauthenticated,
            "dbfs_requests": dict(self.dbfs_requests),
        }


def _error_response(status: int, error_code: str, message: str, headers=None) -> web.Response:
    return web.json_response(
        {"error_code": error_code, "message": message}, status=status, headers=headers
    )


def _request_fields(request: web.Request, body: bytes) -> dict | None:
    """Return the MLflow request fields: the JSON body, or the query string of a GET.

    Returns None for a body that is not a JSON object, which is then forwarded unchecked.
    """
    if request.method == "GET":
        fields = {}
        for key in request.query:
            values = request.query.getall(key)
            fields[key] = values if key == "order_by" or len(values) > 1 else values[0]
        return fields
    if not body:
        return {}
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


class FrontDoor(NamedTuple):
    """The checks and rewrites of a service before a request reaches its MLflow API."""

    # The token a request must carry as `Authorization: Bearer <token>`; None accepts any.
    bearer_token: str | None = None
    # A regular expression; a match at the start of the path is removed.
    strip_path_prefix: re.Pattern | None = None
    # The emulation that serves DBFS requests from local files. None forwards them as usual.
    dbfs: DbfsEmulation | None = None
    # The emulation of Azure ML's run artifact routes (rig.azureml_artifacts), or None.
    run_artifacts: object | None = None


class PolicyForwarder:
    """Accepts MLflow requests on 127.0.0.1, applies the policy and forwards to the target."""

    def __init__(
        self, policy: Policy, state: ProxyState, target_port: int, front: FrontDoor = FrontDoor()
    ):
        self.policy = policy
        self.state = state
        self.front = front
        self.target = f"http://{HOST}:{target_port}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TARGET_TIMEOUT_S), trust_env=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.state.requests_total += 1
        if self.policy.profile == "databricks" and request.path == DATABRICKS_METADATA_PATH:
            return web.json_response(DATABRICKS_METADATA)
        if not self._authenticated(request):
            self.state.unauthenticated += 1
            log.info("%s %s rejected: missing or wrong bearer token", request.method, request.path)
            return _error_response(
                401, "UNAUTHENTICATED",
                "rig.policy_proxy: the request did not carry the expected bearer token.",
            )
        if self.front.run_artifacts is not None and self.front.run_artifacts.matches(request.path):
            self.state.routes["history/run-artifacts"] += 1
            return await self.front.run_artifacts.handle(request)
        request = self._without_path_prefix(request)
        if self.front.dbfs is not None and self.front.dbfs.handles(request.path):
            kind = "/dbfs" if request.path.startswith("/dbfs/") else request.path
            self.state.dbfs_requests[f"{request.method} {kind}"] += 1
            return await self.front.dbfs.handle(request)
        body = await request.read()
        match = MLFLOW_PATH.match(request.path)
        if match is None:
            return await self._forward(request, body)

        route = match.group("route")
        self.state.routes[route] += 1
        if route.endswith("/search"):
            search_fields = _request_fields(request, body) or {}
            self.state.search_filters.append(
                {"route": route, "filter": str(search_fields.get("filter") or "")}
            )
        if self.policy.is_throttled_route(route) and not self.policy.is_missing_route(route):
            retry_after_s = self.state.take_throttle()
            if retry_after_s is not None:
                return self._throttled_response(request, retry_after_s)

        fields = _request_fields(request, body)
        try:
            body = await self._apply_request_rules(request, route, fields, body)
        except PolicyViolation as violation:
            self.state.rejected[violation.rule] += 1
            log.info("%s %s rejected by rule %s", request.method, request.path, violation.rule)
            return _error_response(violation.status, violation.error_code, violation.message)

        if request.method == "GET" and route == "experiments/get-by-name":
            name = (fields or {}).get("experiment_name", "")
            if self.policy.is_hidden_experiment_name(name):
                self.state.experiments_hidden += 1
                violation = self.policy.violation(
                    "hidden_experiment_name_pattern",
                    f"Could not find experiment with name '{name}'.",
                    status=404,
                    error_code="RESOURCE_DOES_NOT_EXIST",
                )
                return _error_response(violation.status, violation.error_code, violation.message)

        response = await self._forward(request, body)
        if route == "experiments/search" and response.status == 200:
            response = self._filter_search_response(response)
        return response

    def _authenticated(self, request: web.Request) -> bool:
        if self.front.bearer_token is None:
            return True
        expected = f"Bearer {self.front.bearer_token}".encode()
        return hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected)

    def _without_path_prefix(self, request: web.Request) -> web.Request:
        if self.front.strip_path_prefix is None:
            return request
        match = self.front.strip_path_prefix.match(request.raw_path)
        if match is None or match.end() == 0:
            return request
        return request.clone(rel_url=request.raw_path[match.end():] or "/")

    def _throttled_response(self, request: web.Request, retry_after_s: int) -> web.Response:
        violation = self.policy.violation(
            "throttled_routes",
            f"Too many requests to {request.path}; retry after {retry_after_s} s.",
            status=429,
            error_code="REQUEST_LIMIT_EXCEEDED",
        )
        log.info("%s %s throttled, Retry-After %d s", request.method, request.path, retry_after_s)
        return _error_response(
            violation.status, violation.error_code, violation.message,
            headers={"Retry-After": str(retry_after_s)},
        )

    async def _apply_request_rules(
        self, request: web.Request, route: str, fields: dict | None, body: bytes
    ) -> bytes:
        """Raise PolicyViolation for a rejected request; return the body to forward."""
        policy = self.policy
        if policy.is_missing_route(route):
            raise policy.violation(
                "missing_routes",
                f"{request.method} {request.path} is not available on this endpoint.",
                status=404,
                error_code="ENDPOINT_NOT_FOUND",
            )

        if fields is None:
            return body

        if route == "runs/log-batch":
            policy.check_batch(fields)
            await self._check_params(fields, fields.get("params") or [])
        elif route in ("runs/log-parameter", "runs/log-param"):
            param = {"key": fields.get("key"), "value": fields.get("value", "")}
            await self._check_params(fields, [param])
        elif route == "runs/set-tag":
            policy.check_tags([{"key": fields.get("key")}])
        elif route == "runs/create":
            dropped = policy.drop_create_run_tags(fields)
            if dropped:
                self.state.dropped_tags.update(dropped)
                log.info("runs/create: dropped tags %s", ", ".join(dropped))
                return json.dumps(fields).encode()
        elif route == "metrics/get-history":
            policy.check_metric_history(fields)
        elif route == "experiments/create":
            policy.check_experiment_name(fields.get("name", ""))
        elif route in ("runs/search", "experiments/search"):
            policy.check_search(fields)
        return body

    async def _check_params(self, fields: dict, params: list[dict]) -> None:
        self.policy.check_param_values(params)
        if not params or self.policy.limit("max_params_per_run") is None:
            return
        run_id = fields.get("run_id") or fields.get("run_uuid")
        existing_keys = await self._run_param_keys(run_id)
        if existing_keys is not None:
            self.policy.check_params_per_run(run_id, existing_keys, params)

    async def _run_param_keys(self, run_id: str | None) -> set | None:
        """Read the run from the target and return its param keys, or None if that fails.

        On None the request is forwarded, so the target reports a missing run itself.
        """
        if not run_id:
            return None
        url = f"{self.target}/api/2.0/mlflow/runs/get"
        try:
            async with self._session.get(url, params={"run_id": run_id}) as response:
                if response.status != 200:
                    return None
                payload = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            log.warning("reading run %s from the target failed: %r", run_id, error)
            return None
        params = payload.get("run", {}).get("data", {}).get("params", [])
        return {param.get("key") for param in params}

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP_HEADERS
        }
        url = self.target + request.rel_url.path_qs
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as target_response:
                payload = await target_response.read()
                status = target_response.status
                response_headers = {
                    name: value
                    for name, value in target_response.headers.items()
                    if name.lower() not in HOP_BY_HOP_HEADERS
                }
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            self.state.target_failures += 1
            log.error("forwarding %s %s to %s failed: %r", request.method, request.path, url, error)
            return _error_response(
                502, "TEMPORARILY_UNAVAILABLE", f"rig.policy_proxy could not reach the target: {error}"
            )
        self.state.forwarded += 1
        return web.Response(status=status, body=payload, headers=response_headers)

    def _filter_search_response(self, response: web.Response) -> web.Response:
        try:
            payload = json.loads(response.body)
        except ValueError:
            return response
        removed = self.policy.filter_experiments(payload)
        if removed == 0:
            return response
        self.state.experiments_hidden += removed
        # NOTE: a page can come back shorter than max_results once hidden names are removed.
        return web.json_response(payload, status=response.status)


class ControlEndpoint:
    """GET routes that change or report the proxy's state."""

    def __init__(self, state: ProxyState):
        self.state = state

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/throttle", self.throttle)
        app.router.add_get("/stats", self.stats)
        return app

    async def throttle(self, request: web.Request) -> web.Response:
        count = _query_int(request, "count")
        if count is None or not 0 <= count <= MAX_THROTTLE_COUNT:
            return web.json_response(
                {"error": f"invalid or missing count; give one integer from 0 to {MAX_THROTTLE_COUNT}"},
                status=400,
            )
        retry_after_s = _query_int(request, "retry_after_s")
        if retry_after_s is None or not 0 <= retry_after_s <= MAX_RETRY_AFTER_S:
            return web.json_response(
                {"error": "invalid or missing retry_after_s; give one integer number of seconds "
                 f"from 0 to {MAX_RETRY_AFTER_S}"},
                status=400,
            )
        # A new /throttle replaces the pending one, and count=0 cancels it.
        self.state.throttle_count = count
        self.state.throttle_retry_after_s = retry_after_s
        log.info("the next %d throttled-route requests get 429, Retry-After %d s", count,
                 retry_after_s)
        return web.json_response(self.state.snapshot())

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot())


def _query_int(request: web.Request, name: str) -> int | None:
    values = request.query.getall(name, [])
    if len(values) != 1:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


async def _start_site(
    app: web.Application, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, ssl_context=ssl_context)
    await site.start()
    bound_port = runner.addresses[0][1]
    return runner, bound_port


async def run_proxy(
    profile: str,
    target_port: int,
    listen_port: int,
    control_port: int,
    overrides: dict,
    front: FrontDoor = FrontDoor(),
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, after printing the ready line to stdout."""
    policy = Policy(profile, overrides)
    state = ProxyState()
    forwarder = PolicyForwarder(policy, state, target_port, front)
    await forwarder.start()

    app = web.Application(client_max_size=MAX_REQUEST_BODY_BYTES)
    app.router.add_route("*", "/{path:.*}", forwarder.handle)
    proxy_runner, listen_port = await _start_site(app, listen_port, ssl_context)
    control_runner, control_port = await _start_site(ControlEndpoint(state).build_app(), control_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    log.info(
        "%s policy proxy on %s://%s:%d to port %d, control on port %d (PID %d)",
        policy.service, "https" if ssl_context else "http", HOST, listen_port, target_port,
        control_port, os.getpid(),
    )
    print(json.dumps({"listen_port": listen_port, "control_port": control_port}), flush=True)

    await stop.wait()
    log.info("stopping policy proxy on port %d: %s", listen_port, json.dumps(state.snapshot()))
    await control_runner.cleanup()
    await proxy_runner.cleanup()
    await forwarder.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rig.policy_proxy",
        description="HTTP proxy on 127.0.0.1 that emulates published limits of Azure ML's or "
        "Databricks' MLflow endpoints in front of an MLflow server.",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True,
                        help="which backend's limits to emulate")
    parser.add_argument("--target-port", type=int, required=True,
                        help="port of the MLflow server on 127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0,
                        help="port to accept clients on (0: any free port)")
    parser.add_argument("--control-port", type=int, default=0,
                        help="port of the HTTP control endpoint (0: any free port)")
    parser.add_argument("--limits", default="{}",
                        help='JSON object of rule values that replace the profile\'s, such as '
                        '\'{"max_params_per_run": 300}\'; null turns a rule off')
    parser.add_argument("--tls-cert-file",
                        help="PEM certificate to serve https with (needs --tls-key-file)")
    parser.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    parser.add_argument("--strip-path-prefix", type=re.compile,
                        help="regular expression; a match at the start of a request path is "
                        "removed before the rules apply")
    parser.add_argument("--bearer-token-file",
                        help="file whose content (stripped) is the bearer token requests must "
                        "carry; overrides RIG_PROXY_BEARER_TOKEN")
    parser.add_argument("--dbfs-root",
                        help="folder of the DBFS emulation: serve the DBFS calls of MLflow's "
                        "DBFS artifact repository from files under it")
    parser.add_argument("--emulate-run-artifacts", action="store_true",
                        help="serve the Azure ML run artifact routes that azureml-mlflow calls "
                        "(rig.azureml_artifacts), with files in the Azurite account named by "
                        "AZURE_STORAGE_CONNECTION_STRING")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level of messages on stderr (default INFO)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        parser.error("--tls-cert-file and --tls-key-file go together")
    try:
        overrides = json.loads(args.limits)
    except ValueError as error:
        parser.error(f"--limits is not valid JSON: {error}")
    if not isinstance(overrides, dict):
        parser.error("--limits must be a JSON object")

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    ssl_context = None
    if args.tls_cert_file:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert_file, args.tls_key_file)
    bearer_token = os.environ.get(BEARER_TOKEN_ENV) or None
    if args.bearer_token_file:
        with open(args.bearer_token_file) as token_file:
            bearer_token = token_file.read().strip()
        if not bearer_token:
            parser.error(f"--bearer-token-file {args.bearer_token_file} is empty")
    run_artifacts = None
    if args.emulate_run_artifacts:
        connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if not connection_string:
            parser.error("--emulate-run-artifacts needs AZURE_STORAGE_CONNECTION_STRING (Azurite)")
        from rig.azureml_artifacts import RunArtifactService

        run_artifacts = RunArtifactService(connection_string)
    front = FrontDoor(
        bearer_token=bearer_token,
        strip_path_prefix=args.strip_path_prefix,
        dbfs=DbfsEmulation(args.dbfs_root) if args.dbfs_root else None,
        run_artifacts=run_artifacts,
    )
    asyncio.run(
        run_proxy(
            args.profile, args.target_port, args.listen_port, args.control_port, overrides,
            front, ssl_context,
        )
    )


# The parent side: start, control and stop the proxy subprocess.


class PolicyProxyControl(ControlClient):
    """Client of a running policy proxy's control endpoint; works from any process."""

    kind = "policy proxy"

    def throttle(self, count: int, retry_after_s: int) -> dict:
        """Respond to the next `count` log-batch requests with 429 and `Retry-After: retry_after_s`."""
        query = urllib.parse.urlencode({"count": count, "retry_after_s": retry_after_s})
        return self._get(f"/throttle?{query}")


class PolicyProxy(ProxyProcess):
    """A policy proxy subprocess with one profile in front of `target_port` on 127.0.0.1.

    Use as a context manager, or call `start()` and `stop()`. The subprocess runs in its own
    session, so `stop()` signals exactly its process group. Its stderr goes to `log_path`, or
    to a temporary file when `log_path` is None.
    """

    kind = "policy proxy"

    def __init__(
        self,
        target_port: int,
        profile: str,
        *,
        limits: dict | None = None,
        tls: CertificateFiles | None = None,
        bearer_token: str | None = None,
        strip_path_prefix: str | None = None,
        dbfs_root: str | os.PathLike | None = None,
        emulate_run_artifacts: bool = False,
        log_path: str | os.PathLike | None = None,
        startup_timeout_s: float = 10.0,
    ):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        super().__init__(log_path, startup_timeout_s)
        self.target_port = target_port
        self.profile = profile
        self.limits = dict(limits or {})
        self.tls = tls
        self.bearer_token = bearer_token
        self.strip_path_prefix = strip_path_prefix
        self.dbfs_root = dbfs_root
        self.emulate_run_artifacts = emulate_run_artifacts
        self.port: int | None = None
        self.control: PolicyProxyControl | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("the policy proxy is not running; call start() first")
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def throttle(self, count: int, retry_after_s: int) -> dict:
        return self._require_control().throttle(count, retry_after_s)

    def stats(self) -> dict:
        return self._require_control().stats()

    def _require_control(self) -> PolicyProxyControl:
        if self.control is None:
            raise RuntimeError("the policy proxy is not running; call start() first")
        return self.control

    def _argv(self) -> list[str]:
        argv = [
            "-m", "rig.policy_proxy",
            "--profile", self.profile,
            "--target-port", str(self.target_port),
            "--listen-port", "0",
            "--control-port", "0",
            "--limits", json.dumps(self.limits),
        ]
        if self.tls is not None:
            argv += ["--tls-cert-file", str(self.tls.certificate),
                     "--tls-key-file", str(self.tls.key)]
        if self.strip_path_prefix is not None:
            argv += ["--strip-path-prefix", self.strip_path_prefix]
        if self.dbfs_root is not None:
            argv += ["--dbfs-root", str(self.dbfs_root)]
        if self.emulate_run_artifacts:
            argv.append("--emulate-run-artifacts")
        return argv

    def _environment(self) -> dict[str, str]:
        environment = {name: value for name, value in os.environ.items()
                       if name != BEARER_TOKEN_ENV}
        if self.bearer_token is not None:
            environment[BEARER_TOKEN_ENV] = self.bearer_token
        return environment

    def _on_ready(self, ready: dict) -> None:
        self.port = ready["listen_port"]
        self.control = PolicyProxyControl(ready["control_port"])
        log.info(
            "%s policy proxy on port %d for port %d (PID %d)",
            self.profile, self.port, self.target_port, self.pid,
        )

    def _on_stopped(self) -> None:
        self.port = None
        self.control = None


if __name__ == "__main__":
    main()
