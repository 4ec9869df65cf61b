"""Server configuration: a TOML file, then `RECSERVE_*` environment variables, then flags.

    [server]                      # every key may also come from RECSERVE_<KEY>
    models = "var/models"         # the models folder (bundles published by `recserve train`)
    port = 50051
    metrics_port = 9090           # 0 disables the Prometheus endpoint
    default_model = "hybrid"      # used when a request names no model
    fallback = ["popularity"]     # tried after a model's own chain
    max_k = 1000
    max_concurrency = 64          # Recommender RPCs in flight (per worker); more fail fast
    overload_retry_ms = 50        # RetryInfo delay sent with an OVERLOADED refusal
    queue_budget_ms = 100         # asyncio: refuse new calls while calls wait longer than
                                  # this for the loop (overload fails fast); 0 = never
    max_pending_calls = 10000     # calls gRPC core holds before the server takes them in;
                                  # past it core cancels new ones (CANCELLED)
    batch_delay_ms = 0            # asyncio: concurrent plain Recommend calls to one factor
                                  # model are coalesced for up to this long into one batched
                                  # search (dynamic batching, e.g. 0.5); 0 = never
    max_connection_age_s = 300    # connections are closed (GOAWAY) after this: clients
                                  # reconnect and spread onto new replicas; 0 = never
    workers = 1                   # processes sharing the port (SO_REUSEPORT)
    server = "asyncio"            # grpc.aio, requests computed on the loop; or "threads"
    admin_token = ""              # better RECSERVE_ADMIN_TOKEN; "authorization: Bearer <token>"
    tls_cert = ""                 # + tls_key: TLS; + tls_client_ca: mutual TLS
    state_dir = "var"             # writable state (the feedback log); never the models folder
    feedback = ""                 # "" = sqlite:///<state_dir>/feedback.sqlite; memory:;
                                  # redis://host:6379/0 (rediss:// with TLS): shared by replicas

    [fallbacks]                   # per-model chains, tried in order
    hybrid = ["als", "popularity"]

    [hybrids.hybrid]              # a blend of normalized scores, itself a model name
    als = 0.6
    itemknn = 0.4

    [experiments.homepage]        # an A/B split: a model name whose arms are models
    arms = { als = 0.5, itemknn = 0.5 }
    salt = "2026-11"              # changes the assignment; default: the experiment name

Validation happens here, once, with messages naming the key, so a typo in a
config stops the server at start-up instead of at the first request: an
unknown key in the file, an unknown `RECSERVE_*` variable (but RECSERVE_DEBUG
and RECSERVE_TEST_*, which are not settings), a malformed value of any type
(booleans take true/false, 1/0, yes/no, on/off), and a URL where a path goes.

A reload (Admin.ReloadModels, SIGHUP) reads the same sources again (`reread`)
and applies the settings in LIVE; the others need a restart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A model name: one path component of the models folder, and a metric label value.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Hybrid:
    """A weighted blend of component models' min-max-normalized scores."""

    name: str
    weights: dict[str, float]
    # A new user's answer (an inline history of n events, the user unknown to
    # every component) blends popularity in with weight c / (c + n); 0: none.
    history_prior: float = 0.0
    # The same for a user the first component knows, n their events (training,
    # recorded and inline); 0: none.
    user_prior: float = 0.0
    # Read from the models folder's hybrids.json (`recserve tune --hybrid`), not
    # from the config: a reload reads that file again (reread, relearned_hybrids).
    learned: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Experiment:
    """A deterministic split of users over arms (model names) by hashed user id."""

    name: str
    arms: dict[str, float]
    salt: str


@dataclass(frozen=True)
class ServerConfig:
    """Everything `recserve serve` needs; defaults suit a single small machine."""

    models: str = "var/models"
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    default_model: str = ""
    fallback: tuple[str, ...] = ("popularity",)
    max_k: int = 1000
    max_concurrency: int = 64
    overload_retry_ms: int = 50
    queue_budget_ms: float = 100.0
    max_pending_calls: int = 10_000
    # Dynamic batching's longest wait for peers; 0 = off (the default: on this
    # 2-core VM it gained nothing on a 1M-item IVF catalogue, docs/performance.md).
    batch_delay_ms: float = 0.0
    batch_max: int = 64  # requests in one batched search at most
    batch_min_ms: float = 0.25  # batch only models whose one-call search costs this much
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 30.0
    max_history: int = 10_000
    max_ids: int = 100_000
    max_message_bytes: int = 16 * 1024 * 1024
    unknown_item_tolerance: float = 0.5
    grace_seconds: float = 10.0
    verify: str = "full"
    state_dir: str = "var"  # writable state: the feedback log lives here by default
    feedback: str = ""  # sqlite:///PATH, redis://..., memory:; "" = a SQLite file in state_dir
    feedback_db: str = ""  # the older spelling of feedback = "sqlite:///PATH" (a path)
    online_history: int = 1000
    # Recorded events held in memory over all users (~100 bytes each, plus ~250 a
    # user); past it the least recently active users are dropped; 0 = no bound.
    online_max_events: int = 1_000_000
    kernel_threads: int = 1
    workers: int = 1
    memory_budget_mb: int = (
        0  # bundles mapped at once; a bundle beyond it is refused (0 = no limit)
    )
    server: str = "asyncio"
    admin_token: str = ""  # bearer token Admin RPCs require ("" = no check)
    token_for_all: bool = False  # require the token on Recommender RPCs too
    tls_cert: str = ""  # PEM server certificate chain: serve TLS when set
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates (mutual TLS)
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hybrids: dict[str, Hybrid] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    # What load_config read this from: (file or "", RECSERVE_* variables, flags), so
    # that a reload reads the same sources again (reread); None for a config built
    # in code, whose reload reads only the models folder's hybrids.json.
    origin: tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, Any], ...]] | None = field(
        default=None, compare=False, repr=False
    )

    def feedback_target(self) -> str:
        """Where feedback goes: a SQLite file's path, a redis:// URL, or "" (memory)."""
        return feedback_target(self.feedback, self.feedback_db, self.state_dir)

    def chain(self, name: str) -> list[str]:
        """`name`, its own fallbacks, then the global fallback list, without repeats."""
        out: list[str] = []
        for n in (name, *self.fallbacks.get(name, ()), *self.fallback):
            if n not in out:
                out.append(n)
        return out


_TABLES = ("fallbacks", "hybrids", "experiments")
_SCALARS = frozenset(f.name for f in fields(ServerConfig)) - set(_TABLES) - {"origin"}
# What a reload applies (reread): how requests are routed and bounded, read per
# request. The rest (ports, workers, TLS, admission, feedback, the models folder)
# is bound to sockets, threads or files at start and needs a restart.
LIVE = frozenset(
    {
        "default_model",
        "fallback",
        "fallbacks",
        "hybrids",
        "experiments",
        "max_k",
        "max_history",
        "max_ids",
        "unknown_item_tolerance",
    }
)
_CHECKS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "metrics_port": (0, 65535),
    "max_k": (1, 1_000_000),
    "max_concurrency": (1, 100_000),
    "overload_retry_ms": (0, 60_000),
    "queue_budget_ms": (0.0, 60_000.0),
    "max_pending_calls": (1, 10_000_000),
    "batch_delay_ms": (0.0, 1000.0),
    "batch_max": (1, 100_000),
    "batch_min_ms": (0.0, 60_000.0),
    "max_connection_age_s": (0.0, 30 * 86400.0),
    "max_connection_age_grace_s": (0.0, 3600.0),
    "max_history": (1, 10_000_000),
    "max_ids": (1, 10_000_000),
    "max_message_bytes": (1024, 2**31 - 1),
    "unknown_item_tolerance": (0.0, 1.0),
    "grace_seconds": (0.0, 3600.0),
    "online_history": (1, 1_000_000),
    "online_max_events": (0, 1_000_000_000),
    "kernel_threads": (0, 1024),
    "workers": (1, 256),
    "memory_budget_mb": (0.0, 1e7),
}


# Settings that name files: a URL there is a mistake (e.g. a Redis address given
# to the SQLite path), refused instead of becoming a folder named "redis:".
_PATHS = frozenset({"models", "state_dir", "feedback_db", "tls_cert", "tls_key", "tls_client_ca"})
FEEDBACK_FILE = "feedback.sqlite"


def feedback_target(url: str, path: str, state_dir: str) -> str:
    """Where feedback goes, from the `feedback` URL (or the older `feedback_db`
    path): a SQLite file's path, a redis:// or rediss:// URL (as given), or ""
    for memory. `sqlite:///PATH` takes PATH as written (relative to the working
    directory; `sqlite:////abs` is absolute)."""
    if url and path:
        raise ConfigError("feedback / feedback_db: give one (feedback_db is the older spelling)")
    if path:
        return path
    if not url:
        return str(Path(state_dir) / FEEDBACK_FILE)
    if url == "memory:":
        return ""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url[len("sqlite:///") :]
    if scheme == "sqlite":
        raise ConfigError(
            f"feedback: {url!r}: write sqlite:///relative/path or sqlite:////abs/path"
        )
    if scheme in ("redis", "rediss"):
        if not re.match(r"^rediss?://[^/\s]+(/\d+)?/?$", url):
            raise ConfigError(f"feedback: {url!r}: expected redis://[user:password@]host:port[/db]")
        return url
    raise ConfigError(
        f"feedback: {url!r}: expected sqlite:///PATH, redis://HOST:PORT/DB or memory:"
    )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(//)?")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# RECSERVE_* variables that are not server settings: setup.py's build switch and
# the test suite's own switches. Any other unknown RECSERVE_* stops start-up.
_NOT_SETTINGS = ("RECSERVE_DEBUG",)
_NOT_SETTINGS_PREFIX = "RECSERVE_TEST_"


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def _coerce(key: str, value: Any) -> Any:
    """Convert a TOML/env/flag value to the field's type, naming the key on failure."""
    if key not in _SCALARS:
        known = ", ".join(sorted(_SCALARS))
        where = " (a TOML table, not a single value)" if key in _TABLES else ""
        raise ConfigError(f"{key}: unknown setting{where} (known: {known})")
    default = getattr(ServerConfig(), key)
    try:
        if isinstance(default, tuple):
            if isinstance(value, str):
                items = value.split(",")
            elif isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
                items = list(value)
            else:
                raise ValueError("expected a list of names or a comma-separated string")
            out: Any = tuple(str(x).strip() for x in items if str(x).strip())
        elif isinstance(default, bool):
            out = _boolean(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            out = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError("expected a number")
            out = float(value)
            if not math.isfinite(out):
                raise ValueError("not finite")
        else:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            out = value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {value!r} ({exc})") from None
    if key in _CHECKS:
        lo, hi = _CHECKS[key]
        if not lo <= out <= hi:
            raise ConfigError(f"{key}: must be in [{lo:g}, {hi:g}], got {out}")
    if key == "verify" and out not in ("full", "size"):
        raise ConfigError(f"verify: expected 'full' (sha256) or 'size', got {out!r}")
    if key == "server" and out not in ("threads", "asyncio"):
        raise ConfigError(f"server: expected 'threads' or 'asyncio', got {out!r}")
    if key in _PATHS and _URL.match(out):
        raise ConfigError(f"{key}: {out!r} looks like a URL; {key} takes a file or folder path")
    return out


def _model_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}: {name!r} is not a valid model name")
    return name


def _weights(where: str, table: Any, what: str) -> dict[str, float]:
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{where}: expected a table of model = {what}")
    out = {}
    for name, w in table.items():
        _model_name(where, name)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}.{name}: {what} must be a finite number >= 0, got {w!r}")
        out[name] = float(w)
    if sum(out.values()) <= 0:
        raise ConfigError(f"{where}: {what}s sum to 0")
    return out


# The keys of a [hybrids.<name>] table that are not a component's weight.
HYBRID_PRIOR = "history_prior"
USER_PRIOR = "user_prior"


def _prior(where: str, value: Any) -> float:
    """A hybrid's prior (history_prior, user_prior): a finite number >= 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _hybrid(name: str, table: Any) -> Hybrid:
    """A [hybrids.<name>] table: component = weight, and optionally
    history_prior = c and user_prior = c (so no component can be named so)."""
    where = f"hybrids.{name}"
    priors = {}
    if isinstance(table, Mapping):
        for key in (HYBRID_PRIOR, USER_PRIOR):
            if key in table:
                priors[key] = _prior(f"{where}.{key}", table[key])
        table = {k: v for k, v in table.items() if k not in priors}
    return Hybrid(name, _weights(where, table, "weight"), **priors)


def _chain(name: str, value: Any) -> tuple[str, ...]:
    """A [fallbacks] entry: a list of model names, or one comma-separated string
    (as `fallback` takes); a bare string is not taken letter by letter."""
    where = f"fallbacks.{name}"
    if isinstance(value, str):
        value = [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list of model names, got {value!r}")
    return tuple(_model_name(where, x) for x in value)


def _tables(doc: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fb = doc.get("fallbacks", {})
    if not isinstance(fb, Mapping):
        raise ConfigError("fallbacks: expected a table of model = [models]")
    out["fallbacks"] = {_model_name("fallbacks", k): _chain(k, v) for k, v in fb.items()}
    hy = doc.get("hybrids", {})
    if not isinstance(hy, Mapping):
        raise ConfigError("hybrids: expected [hybrids.<name>] tables")
    out["hybrids"] = {_model_name("hybrids", k): _hybrid(k, v) for k, v in hy.items()}
    ex = doc.get("experiments", {})
    if not isinstance(ex, Mapping):
        raise ConfigError("experiments: expected [experiments.<name>] tables")
    exps = {}
    for k, v in ex.items():
        _model_name("experiments", k)
        if not isinstance(v, Mapping) or set(v) - {"arms", "salt"}:
            raise ConfigError(f"experiments.{k}: expected keys arms and (optional) salt")
        salt = v.get("salt", k)
        if isinstance(salt, bool) or not isinstance(salt, str | int):
            raise ConfigError(f"experiments.{k}.salt: expected a string, got {salt!r}")
        exps[k] = Experiment(
            k, _weights(f"experiments.{k}.arms", v.get("arms"), "fraction"), str(salt)
        )
    out["experiments"] = exps
    return out


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build the config: file (if any), then RECSERVE_* variables, then non-None overrides."""
    values: dict[str, Any] = {}
    doc: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable TOML ({exc})") from None
        extra = sorted(set(doc) - {"server", *_TABLES})
        if extra:
            raise ConfigError(f"{path}: unknown table(s) {', '.join(extra)}")
        server = doc.get("server", {})
        if not isinstance(server, Mapping):
            raise ConfigError(f"{path}: [server] must be a table of settings")
        for key, value in server.items():
            try:
                values[key] = _coerce(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: [server] {exc}") from None
    env = os.environ if env is None else env
    settings = {
        name: value
        for name, value in env.items()
        if name.startswith("RECSERVE_")
        and name not in _NOT_SETTINGS
        and not name.startswith(_NOT_SETTINGS_PREFIX)
    }
    for name, value in settings.items():
        try:
            values[name[9:].lower()] = _coerce(name[9:].lower(), value)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in flags.items():
        values[key] = _coerce(key, value)
    origin = (str(path or ""), tuple(sorted(settings.items())), tuple(flags.items()))
    cfg = replace(ServerConfig(), **values, **_tables(doc), origin=origin)
    cfg = with_learned_hybrids(cfg)
    _check_consistency(cfg)
    return cfg


LEARNED_HYBRIDS = "hybrids.json"  # written by `recserve tune --hybrid` into the models folder


def with_learned_hybrids(cfg: ServerConfig) -> ServerConfig:
    """The config plus the hybrids `recserve tune --hybrid` learned into the models
    folder (`hybrids.json`). A hybrid the config itself defines keeps the
    config's weights: what an operator wrote wins over what was learned."""
    path = Path(cfg.models) / LEARNED_HYBRIDS
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return cfg
    except NotADirectoryError:  # it read "hybrids.json: Not a directory"
        raise ConfigError(f"models: {cfg.models} is not a folder") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable learned hybrids ({exc})") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: expected {{name: {{weights: {{...}}}}}}")
    learned = {}
    for name, entry in doc.items():
        if name in cfg.hybrids:
            log.info("hybrid %s: the config's weights, not the learned ones in %s", name, path)
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{path}: {name}: expected a table with weights")
        _model_name(str(path), name)
        learned[name] = Hybrid(
            name,
            _weights(f"{path}: {name}.weights", entry.get("weights"), "weight"),
            _prior(f"{path}: {name}.{HYBRID_PRIOR}", entry.get(HYBRID_PRIOR, 0.0)),
            _prior(f"{path}: {name}.{USER_PRIOR}", entry.get(USER_PRIOR, 0.0)),
            True,
        )
    if not learned:
        return cfg
    return replace(cfg, hybrids={**learned, **cfg.hybrids})


def relearned_hybrids(cfg: ServerConfig) -> ServerConfig:
    """`cfg` with the models folder's hybrids.json read again: the learned hybrids
    replaced by the file's current ones (a reload after `recserve tune --hybrid`);
    the config's own hybrids stay. ConfigError for a file that is unreadable or
    inconsistent with the config; then nothing changes."""
    own = {name: h for name, h in cfg.hybrids.items() if not h.learned}
    out = with_learned_hybrids(replace(cfg, hybrids=own))
    _check_virtual(out)
    return out


def reread(cfg: ServerConfig) -> tuple[ServerConfig, list[str]]:
    """A reload's config: the sources `cfg` was loaded from read again (the file as
    it is now; the same variables and flags), and the models folder's hybrids.json.
    Returns (cfg with the LIVE settings replaced, the other settings whose value
    changed: they need a restart). ConfigError for a file that no longer loads;
    the caller keeps `cfg` then. A config built in code re-reads hybrids.json only."""
    if cfg.origin is None:
        return relearned_hybrids(cfg), []
    path, env, flags = cfg.origin
    new = load_config(path or None, env=dict(env), overrides=dict(flags))
    pending = [
        f.name
        for f in fields(ServerConfig)
        if f.compare and f.name not in LIVE and getattr(new, f.name) != getattr(cfg, f.name)
    ]
    if new.models != cfg.models:  # served from the old folder until a restart
        new = relearned_hybrids(replace(new, models=cfg.models))
    return replace(cfg, **{key: getattr(new, key) for key in LIVE}), pending


def _check_virtual(cfg: ServerConfig) -> None:
    """Hybrids and experiments: distinct names, components and arms that are models."""
    virtual = set(cfg.hybrids) | set(cfg.experiments)
    both = set(cfg.hybrids) & set(cfg.experiments)
    if both:
        raise ConfigError(f"{', '.join(sorted(both))}: both a hybrid and an experiment")
    for h in cfg.hybrids.values():
        nested = sorted(set(h.weights) & virtual)
        if nested:
            n = nested[0]
            kind = "hybrids" if n in cfg.hybrids else "experiments"
            where = (
                f"{Path(cfg.models) / LEARNED_HYBRIDS}: hybrid {h.name}"
                if h.learned
                else f"hybrids.{h.name}"
            )
            raise ConfigError(
                f"{where}: components must be models, and {n!r} is the name of "
                f"[{kind}.{n}] (a hybrid or experiment hides a model of the same name: "
                "rename one)"
            )
    for e in cfg.experiments.values():
        nested = sorted(set(e.arms) & set(cfg.experiments))
        if nested:
            raise ConfigError(
                f"experiments.{e.name}: arms must not be experiments ({nested}; a hybrid "
                "or experiment hides a model of the same name: rename one)"
            )


def _check_pem(cfg: ServerConfig) -> None:
    """The TLS files load as a certificate chain with its private key (and CA
    certificates): gRPC refuses bad ones only when the port is added, as
    "cannot bind" with nothing about the files."""
    import ssl

    def no_passphrase() -> bytes:
        # gRPC takes no passphrase; without this OpenSSL would prompt for one
        raise ValueError("the key is encrypted; gRPC needs it unencrypted")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key, password=no_passphrase)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ConfigError(
            f"tls_cert / tls_key: {cfg.tls_cert} and {cfg.tls_key} do not load as a PEM "
            f"certificate and its private key ({exc})"
        ) from None
    if cfg.tls_client_ca:
        try:
            ctx.load_verify_locations(cfg.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"tls_client_ca: {cfg.tls_client_ca} holds no PEM CA certificate ({exc})"
            ) from None


def _check_consistency(cfg: ServerConfig) -> None:
    _check_virtual(cfg)
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert / tls_key: give both or neither")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} is not a file")
    if cfg.tls_cert:
        _check_pem(cfg)
    if cfg.token_for_all and not cfg.admin_token:
        raise ConfigError("token_for_all: set admin_token too")
    feedback = cfg.feedback_target()  # also validates feedback / feedback_db
    if feedback and not feedback.startswith(("redis://", "rediss://")):
        models = Path(cfg.models).resolve()
        where = Path(feedback).resolve()
        if where == models or models in where.parents:
            raise ConfigError(
                f"feedback: {feedback} is inside the models folder {cfg.models}, which may be "
                "read-only and is replaced by publishing; keep state in state_dir"
            )
    if cfg.default_model and not NAME_RE.match(cfg.default_model):
        raise ConfigError(f"default_model: {cfg.default_model!r} is not a valid model name")


def bind_failure(host: str, address: str, detail: str) -> str:
    """Why `address` (host:port) could not be bound, naming the setting at fault:
    a bind fails alike for a port in use and for a host that is no address of
    this machine, and gRPC says only "Failed to bind" for either."""
    import socket

    try:
        family, _, _, _, where = socket.getaddrinfo(host.strip("[]"), 0)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(where)  # port 0: only whether the host is this machine's
    except (socket.gaierror, UnicodeError, OSError) as exc:
        return f"host: {host!r} is no address this server can listen on ({exc})"
    return f"port: cannot bind {address}" + (f" ({detail})" if detail else "")
