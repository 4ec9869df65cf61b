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
        ("[server]\nprot = 1\n", {}, "prot: unknown setting"),
        ("[servr]\n", {}, "unknown table(s) servr"),
        ("[server]\nverify = 'maybe'\n", {}, "verify: expected"),
        ("[hybrids.h]\nals = -1\n", {}, "hybrids.h.als: weight must be"),
        ("[hybrids.h]\nals = 0\n", {}, "hybrids.h: weights sum to 0"),
        ("[hybrids.h]\n'bad/name' = 1\n", {}, "is not a valid model name"),
        ("[experiments.e]\narms = 3\n", {}, "experiments.e.arms: expected a table"),
        ("[experiments.e]\nsplit = 3\n", {}, "experiments.e: expected keys"),
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


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})
