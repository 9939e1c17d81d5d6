"""Configuration: the public keys, precedence (flags > env > file > defaults) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoagent.config import load_config
from geoagent.errors import ConfigError

PUBLIC_EXAMPLE = """
[backends.local]
kind = "ollama"
model = "llava:7b"
base_url = "http://127.0.0.1:11434"
api_key_env = ""
max_concurrency = 4
timeout_s = 120
max_retries = 4
temperature = 0.0
seed = 0

[backends.hosted]
kind = "openai"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"

[tasks]
default = "local"
prior = "hosted"

[cache]
dir = "cache"
enabled = true
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_documented_keys_load(tmp_path):
    settings = load_config(write(tmp_path / "g.toml", PUBLIC_EXAMPLE))
    assert settings.profile("prior") == ("hosted", settings.backends["hosted"])
    assert settings.profile("pairwise")[0] == "local"
    assert settings.backends["local"].max_concurrency == 4


def test_defaults_need_no_file():
    settings = load_config()
    assert settings.profile("pairwise")[1].kind == "ollama"
    assert settings.cache.dir == Path("cache")


def test_geoagent_toml_in_the_working_folder_is_picked_up(tmp_path):
    write(tmp_path / "geoagent.toml", '[backends.local]\nmodel = "llava:13b"\n')
    assert load_config().backends["local"].model == "llava:13b"


def test_environment_beats_file_and_flags_beat_environment(tmp_path, monkeypatch):
    config = write(tmp_path / "g.toml", PUBLIC_EXAMPLE)
    monkeypatch.setenv("GEOAGENT_BACKENDS__LOCAL__MODEL", "llava:34b")
    monkeypatch.setenv("GEOAGENT_CACHE__ENABLED", "false")
    settings = load_config(config)
    assert settings.backends["local"].model == "llava:34b"
    assert settings.backends["local"].max_concurrency == 4  # the rest of the profile still comes from the file
    assert settings.cache.enabled is False
    flagged = load_config(config, {"backends": {"local": {"model": "from-flag"}}, "cache": {"enabled": True}})
    assert flagged.backends["local"].model == "from-flag" and flagged.cache.enabled is True
    assert flagged.backends["hosted"].model == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[backends.local]\nmodle = "x"\n', "unknown key 'backends.local.modle'"),
        ('[cache]\ndir = "c"\nsize = 3\n', "unknown key 'cache.size'"),
        ('colour = "blue"\n', "unknown key 'colour'"),
        ('[tasks]\npairwise = "nowhere"\n', "tasks.pairwise routes to backend profile 'nowhere', which is not defined"),
        ('[backends.local]\nkind = "grpc"\n', "unknown backend kind 'grpc'"),
        ('[backends.local]\nmax_concurrency = 0\n', "backends.local.max_concurrency"),
        ("[backends.local\n", "not valid TOML"),
    ],
)
def test_bad_files_give_one_line_naming_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_missing_key_variable_names_the_variable_only_when_used(tmp_path, monkeypatch):
    settings = load_config(write(tmp_path / "g.toml", PUBLIC_EXAMPLE))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable OPENAI_API_KEY is not set"):
        settings.backends["hosted"].api_key("hosted")
    assert settings.backends["local"].api_key("local") is None
