"""Server configuration: TOML, then RECSERVE_* variables, then flags; errors name the key."""

from __future__ import annotations

import pytest

from recserve.config import ConfigError, load_config

TOML = """
[server]
models = "/srv/models"
port = 6000
max_k = 50
fallback = ["popularity"]
default_model = "blend"

[fallbacks]
blend = ["als", "itemknn"]

[hybrids.blend]
als = 0.7
itemknn = 0.3

[experiments.homepage]
arms = { als = 0.25, blend = 0.75 }
"""


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "recserve.toml"
    path.write_text(TOML)
    cfg = load_config(path, env={})
    assert (cfg.models, cfg.port, cfg.max_k, cfg.default_model) == (
        "/srv/models",
        6000,
        50,
        "blend",
    )
    assert cfg.hybrids["blend"].weights == {"als": 0.7, "itemknn": 0.3}
    assert cfg.experiments["homepage"].arms == {"als": 0.25, "blend": 0.75}
    assert cfg.experiments["homepage"].salt == "homepage"
    assert cfg.chain("blend") == ["blend", "als", "itemknn", "popularity"]
    assert cfg.chain("popularity") == ["popularity"]
    env = {"RECSERVE_PORT": "7000", "RECSERVE_FALLBACK": "a,b", "OTHER_PORT": "1"}
    cfg = load_config(path, env=env)
    assert cfg.port == 7000 and cfg.fallback == ("a", "b")
    cfg = load_config(path, env=env, overrides={"port": 8000, "models": None})
    assert cfg.port == 8000 and cfg.models == "/srv/models"  # None = flag not given


def test_defaults_without_a_file():
    cfg = load_config(None, env={})
    assert cfg.port == 50051 and cfg.max_k == 1000 and cfg.fallback == ("popularity",)


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[server]\nport = 70000\n", {}, "port: must be in"),
        ("[server]\nmax_k = 0\n", {}, "max_k: must be in"),
        ("[server]\nmax_k = 1.5\n", {}, "max_k: cannot use"),
        ("[server]\nmax_pending_calls = 0\n", {}, "max_pending_calls: must be in"),
        ("[server]\nprot = 1\n", {}, "prot: unknown setting"),
        ("[servr]\n", {}, "unknown table(s) servr"),
        ("[server]\nverify = 'maybe'\n", {}, "verify: expected"),
        ("[hybrids.h]\nals = -1\n", {}, "hybrids.h.als: weight must be"),
        ("[hybrids.h]\nals = 0\n", {}, "hybrids.h: weights sum to 0"),
        ("[hybrids.h]\n'bad/name' = 1\n", {}, "is not a valid model name"),
        ("[hybrids.h]\nals = 1\nhistory_prior = -1\n", {}, "hybrids.h.history_prior: must be"),
        ("[hybrids.h]\nals = 1\nhistory_prior = 'a'\n", {}, "hybrids.h.history_prior: must be"),
        ("[hybrids.h]\nals = 1\nuser_prior = inf\n", {}, "hybrids.h.user_prior: must be"),
        ("[hybrids.h]\nhistory_prior = 1\n", {}, "hybrids.h: expected a table of model"),
        ("[experiments.e]\narms = 3\n", {}, "experiments.e.arms: expected a table"),
        ("[experiments.e]\nsplit = 3\n", {}, "experiments.e: expected keys"),
        ("[experiments.e]\narms = {a = 1}\nsalt = {x = 1}\n", {}, "experiments.e.salt: expected"),
        ("[fallbacks]\nals = 3\n", {}, "fallbacks.als: expected a list of model names"),
        ("[fallbacks]\nals = ['ok', 'bad/name']\n", {}, "fallbacks.als: 'bad/name' is not"),
        ("[hybrids.h]\ne = 1\n[experiments.e]\narms = {a = 1}\n", {}, "components must be"),
        ("port = [\n", {}, "unreadable TOML"),
        ("", {"RECSERVE_PORT": "http"}, "port: cannot use 'http'"),
        ("", {"RECSERVE_UNKNOWN_ITEM_TOLERANCE": "2"}, "unknown_item_tolerance: must be in"),
    ],
)
def test_errors_name_the_key(tmp_path, text, env, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert needle in str(info.value)


def test_a_fallback_chain_may_be_one_string_never_its_letters(tmp_path):
    # `als = "itemknn"` was taken as the chain i, t, e, m, k, n, n: every letter a
    # model name, so nothing was refused and the fallback never reached itemknn.
    path = tmp_path / "c.toml"
    path.write_text('[fallbacks]\nals = "itemknn"\nbpr = "svd, popularity"\n')
    cfg = load_config(path, env={})
    assert cfg.fallbacks == {"als": ("itemknn",), "bpr": ("svd", "popularity")}
    assert cfg.chain("als") == ["als", "itemknn", "popularity"]


def test_max_pending_calls_sets_grpc_cores_pending_call_limits():
    """gRPC core cancels new calls at random past its pending-call limit (and
    all past the hard limit): the limit is a setting, 10,000 by default (core's
    own 1,000 cancelled calls that a closed loop of 1,024 clients waited for)."""
    from recserve.service.grpc_common import server_options

    opts = dict(server_options(load_config(None, env={})))
    assert opts["grpc.server.max_pending_requests"] == 10_000
    assert opts["grpc.server.max_pending_requests_hard_limit"] == 20_000
    opts = dict(server_options(load_config(None, env={"RECSERVE_MAX_PENDING_CALLS": "300"})))
    assert opts["grpc.server.max_pending_requests"] == 300
    assert opts["grpc.server.max_pending_requests_hard_limit"] == 600


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RECSERVE_MODLES": "/srv"}, r"RECSERVE_MODLES: modles: unknown setting"),
        ({"RECSERVE_HYBRIDS": "x"}, r"RECSERVE_HYBRIDS: hybrids: unknown setting \(a TOML table"),
        ({"RECSERVE_TOKEN_FOR_ALL": "ture"}, r"RECSERVE_TOKEN_FOR_ALL: .*'ture'"),
        ({"RECSERVE_TOKEN_FOR_ALL": ""}, r"RECSERVE_TOKEN_FOR_ALL: .*expected true/false"),
        ({"RECSERVE_PORT": "true"}, r"RECSERVE_PORT: port: cannot use 'true'"),
        ({"RECSERVE_GRACE_SECONDS": "nan"}, r"grace_seconds: cannot use 'nan' \(not finite\)"),
        ({"RECSERVE_FEEDBACK_DB": "redis://h:6379/0"}, r"feedback_db: .* looks like a URL"),
        ({"RECSERVE_MODELS": "s3://bucket/models"}, r"models: .* looks like a URL"),
    ],
)
def test_unknown_and_malformed_variables_stop_start_up(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, env=env)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nmodles = 'x'\n", r"\[server\] modles: unknown setting"),
        ("[server]\nport = true\n", r"\[server\] port: cannot use True"),
        ("[server]\nmax_k = '50'\nverify = 5\n", r"verify: cannot use 5 \(expected a string\)"),
        ("[server]\ntoken_for_all = 'maybe'\n", r"token_for_all: cannot use 'maybe'"),
        ("[server]\nfallback = [1, 2]\n", r"fallback: cannot use \[1, 2\]"),
        ("[server]\nfeedback_db = 'memory:'\n", r"feedback_db: 'memory:' looks like a URL"),
        ("server = 5\n", r"\[server\] must be a table"),
    ],
)
def test_unknown_and_malformed_file_settings_name_file_and_key(tmp_path, text, needle):
    path = tmp_path / "recserve.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("given", "want"),
    [
        *(("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("on", True)),
        *(("off", False), ("false", False), ("0", False), ("no", False), (" False ", False)),
    ],
)
def test_booleans_take_only_the_documented_spellings(given, want):
    cfg = load_config(None, env={"RECSERVE_ADMIN_TOKEN": "t", "RECSERVE_TOKEN_FOR_ALL": given})
    assert cfg.token_for_all is want


def test_variables_that_are_not_settings_are_left_alone():
    env = {"RECSERVE_DEBUG": "1", "RECSERVE_TEST_SERVER": "asyncio", "RECSERVE_WORKERS": "2"}
    assert load_config(None, env=env).workers == 2


def test_paths_that_are_paths_are_taken():
    cfg = load_config(
        None, env={"RECSERVE_FEEDBACK_DB": "var/fb:1.sqlite", "RECSERVE_MODELS": "./m"}
    )
    assert (cfg.feedback_db, cfg.models) == ("var/fb:1.sqlite", "./m")


def walk_parsers(parser):
    """The parser and every sub-command parser below it."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk_parsers(sub)


def test_no_parser_takes_abbreviated_flags(tmp_path, capsys, monkeypatch):
    from recserve.cli import build_parser, main

    parsers = list(walk_parsers(build_parser()))
    assert len(parsers) > 10 and all(p.allow_abbrev is False for p in parsers)
    # An abbreviation is an unknown flag (`--feedback` used to be taken as
    # `--feedback-db` and made a folder "redis:").
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--models", str(tmp_path), "--metrics", "9100"])
    assert info.value.code == 2
    assert "unrecognized arguments: --metrics" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path), "--feedback", "pg://h:1/0"]) == 2
    assert "feedback: 'pg://h:1/0'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["serve", "--models", str(tmp_path), "--feedback-db", "redis://h:1/0"]) == 2
    assert "feedback_db: 'redis://h:1/0' looks like a URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("env", "path"),
    [
        ({}, "var/feedback.sqlite"),  # durable by default
        ({"RECSERVE_STATE_DIR": "/srv/state"}, "/srv/state/feedback.sqlite"),
        ({"RECSERVE_FEEDBACK": "memory:"}, ""),
        ({"RECSERVE_FEEDBACK": "sqlite:///data/fb.sqlite"}, "data/fb.sqlite"),
        ({"RECSERVE_FEEDBACK": "sqlite:////abs/fb.sqlite"}, "/abs/fb.sqlite"),
        ({"RECSERVE_FEEDBACK_DB": "old/fb.sqlite"}, "old/fb.sqlite"),  # the older spelling
        ({"RECSERVE_FEEDBACK": "redis://127.0.0.1:6379/0"}, "redis://127.0.0.1:6379/0"),
        ({"RECSERVE_FEEDBACK": "rediss://u:p@cache:6380"}, "rediss://u:p@cache:6380"),
    ],
)
def test_where_feedback_goes(env, path):
    assert load_config(None, env=env).feedback_target() == path


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"RECSERVE_FEEDBACK": "redis://h:6379/zero"},
            r"feedback: .*redis://\[user:password@\]host",
        ),
        ({"RECSERVE_FEEDBACK": "pg://h/db"}, r"feedback: .*expected sqlite:///PATH, redis://"),
        ({"RECSERVE_FEEDBACK": "sqlite:fb.sqlite"}, r"feedback: .*sqlite:///relative/path"),
        ({"RECSERVE_FEEDBACK": "memory:", "RECSERVE_FEEDBACK_DB": "x"}, r"give one"),
        ({"RECSERVE_STATE_DIR": "s3://bucket"}, r"state_dir: .* looks like a URL"),
        (
            {"RECSERVE_MODELS": "/srv/models", "RECSERVE_STATE_DIR": "/srv/models/state"},
            r"feedback: .* is inside the models folder /srv/models",
        ),
    ],
)
def test_feedback_settings_are_checked(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, env=env)


def test_a_reread_applies_routing_and_names_what_needs_a_restart(tmp_path, monkeypatch):
    """reread (a reload): the same file, variables and flags read again. Routing
    and request limits are applied; anything bound at start is named, and stays."""
    from recserve.config import LIVE, reread

    folder, other = tmp_path / "models", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    (folder / "hybrids.json").write_text('{"learned": {"weights": {"als": 1}}}')
    (other / "hybrids.json").write_text('{"elsewhere": {"weights": {"als": 1}}}')
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nmodels = "{folder}"\nmax_k = 50\nport = 6000\n')
    cfg = load_config(path, env={"RECSERVE_MAX_IDS": "77"}, overrides={"port": 7000})
    assert reread(cfg) == (cfg, [])
    monkeypatch.setenv("RECSERVE_MAX_IDS", "5")  # the variables read at start are kept
    path.write_text(
        f'[server]\nmodels = "{other}"\nmax_k = 60\nport = 6001\nworkers = 3\n'
        '[fallbacks]\nals = ["popularity"]\n'
    )
    new, pending = reread(cfg)
    assert pending == ["models", "workers"]  # the port is the flag's, as at start
    assert (new.max_k, new.max_ids, new.port, new.workers) == (60, 77, 7000, 1)
    assert new.models == str(folder) and list(new.hybrids) == ["learned"]  # the served folder's
    assert new.fallbacks == {"als": ("popularity",)} and new.origin == cfg.origin
    path.write_text("[server]\nmax_k = 0\n")
    with pytest.raises(ConfigError, match="max_k: must be in"):
        reread(cfg)
    assert {"default_model", "hybrids", "experiments", "max_k"} <= LIVE
    assert not {"port", "workers", "admin_token", "max_concurrency", "models"} & LIVE


def test_a_hybrid_takes_a_history_prior_from_the_config_or_hybrids_json(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "hybrids.json").write_text(
        '{"learned": {"weights": {"als": 1, "knn": 1}, "history_prior": 2, "user_prior": 3},'
        ' "plain": {"weights": {"als": 1}}, "mine": {"weights": {"als": 1}, "history_prior": 4}}'
    )
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nmodels = "{models}"\n'
        "[hybrids.mine]\nals = 0.5\nknn = 0.5\nhistory_prior = 1.5\nuser_prior = 0.5\n"
    )
    cfg = load_config(path, env={})
    assert cfg.hybrids["mine"].weights == {"als": 0.5, "knn": 0.5}  # not a component
    assert cfg.hybrids["mine"].history_prior == 1.5  # the config's, not the learned 4
    assert cfg.hybrids["mine"].user_prior == 0.5
    assert (cfg.hybrids["learned"].history_prior, cfg.hybrids["learned"].user_prior) == (2, 3)
    assert (cfg.hybrids["plain"].history_prior, cfg.hybrids["plain"].user_prior) == (0, 0)
    (models / "hybrids.json").write_text('{"bad": {"weights": {"als": 1}, "history_prior": -2}}')
    with pytest.raises(ConfigError, match=r"hybrids.json: bad.history_prior: must be"):
        load_config(path, env={})


def test_a_config_built_in_code_rereads_only_the_learned_hybrids(tmp_path):
    from recserve.config import Hybrid, ServerConfig, reread

    mine = {"mine": Hybrid("mine", {"als": 1.0})}
    cfg = ServerConfig(models=str(tmp_path), max_k=5, hybrids=mine)
    (tmp_path / "hybrids.json").write_text('{"learned": {"weights": {"als": 1}}}')
    new, pending = reread(cfg)
    assert pending == [] and new.max_k == 5 and sorted(new.hybrids) == ["learned", "mine"]


def test_an_experiment_named_as_a_learned_hybrids_component_names_the_clash(tmp_path):
    # `recserve tune --hybrid` learned a blend of als; the config then names an
    # experiment "als", which would hide the model: the error says where and why.
    models = tmp_path / "models"
    models.mkdir()
    (models / "hybrids.json").write_text('{"hybrid": {"weights": {"als": 0.6, "knn": 0.4}}}')
    path = tmp_path / "recserve.toml"
    path.write_text(
        f"[server]\nmodels = '{models}'\n[experiments.als]\narms = {{knn = 1}}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{models / 'hybrids.json'}: hybrid hybrid: components must be models")
    assert "'als' is the name of [experiments.als]" in msg and "rename one" in msg
