"""Configuration: parsing, validation naming each variable, redaction, flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sidecar.config import (
    VARIABLES,
    ConfigError,
    Listen,
    Secret,
    Settings,
    add_flags,
    env_with_flags,
    redact_url,
)

KEY = "vk_live_supersecret_123"
BASE = {"VELLUM_API_KEY": KEY, "VELLUM_TENANT_ID": "acme"}


def test_defaults_match_the_interface() -> None:
    s = Settings.from_env(BASE)
    assert s.tenant_id == "acme"
    assert s.base_url == "https://api.vellumcharter.com"
    assert s.webhook_secrets == ()
    assert not s.webhooks_enabled
    assert s.redis_url is None
    assert str(s.listen) == "127.0.0.1:8700"
    assert str(s.webhook_listen) == "0.0.0.0:8701"
    assert str(s.ops_listen) == "0.0.0.0:9700"
    assert s.cache_ttl == 300
    assert s.stale_ttl == 86400
    assert s.negative_ttl == 30
    assert s.memory_max_entries == 100_000
    assert s.allow_remote is False
    assert s.upstream_timeout == 5


def test_every_variable_has_a_flag_and_flags_win() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--redis-url", "redis://h:1/0", "--tenant-id", "flagged"])
    env = env_with_flags(args, {**BASE, "SIDECAR_REDIS_URL": "redis://other:2/0"})
    s = Settings.from_env(env)
    assert s.tenant_id == "flagged"
    assert s.redis_url is not None
    assert s.redis_url.reveal() == "redis://h:1/0"
    flags = {v.flag for v in VARIABLES}
    assert len(flags) == len(VARIABLES)
    assert "--api-key-file" in flags
    assert "--webhook-listen" in flags


def test_missing_required_values_are_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    text = "\n".join(info.value.problems)
    assert "VELLUM_API_KEY" in text
    assert "VELLUM_TENANT_ID" in text
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIDECAR_CACHE_TTL", "soon"),
        ("SIDECAR_CACHE_TTL", "0"),
        ("SIDECAR_STALE_TTL", "-1"),
        ("SIDECAR_NEGATIVE_TTL", "nan"),
        ("SIDECAR_MEMORY_MAX_ENTRIES", "1.5"),
        ("SIDECAR_ALLOW_REMOTE", "maybe"),
        ("SIDECAR_LISTEN", "8700"),
        ("SIDECAR_LISTEN", "127.0.0.1:http"),
        ("SIDECAR_OPS_LISTEN", "0.0.0.0:70000"),
        ("SIDECAR_WEBHOOK_LISTEN", "unix:"),
        ("SIDECAR_REDIS_URL", "http://localhost:6379"),
        ("SIDECAR_REDIS_URL", "redis://"),
        ("VELLUM_BASE_URL", "ftp://example.com"),
        ("VELLUM_BASE_URL", "not a url"),
        ("SIDECAR_UPSTREAM_TIMEOUT", "0"),
        ("SIDECAR_LOG_LEVEL", "loud"),
        ("SIDECAR_REDIS_POOL_SIZE", "0"),
    ],
)
def test_bad_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, name: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{name}:")


def test_several_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "SIDECAR_CACHE_TTL": "x", "SIDECAR_STALE_TTL": "y"})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "SIDECAR_CACHE_TTL",
        "SIDECAR_STALE_TTL",
    ]


def test_remote_listen_needs_allow_remote() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "SIDECAR_LISTEN": "0.0.0.0:8700"})
    assert info.value.problems[0].startswith("SIDECAR_LISTEN:")
    assert "SIDECAR_ALLOW_REMOTE" in info.value.problems[0]
    s = Settings.from_env(
        {**BASE, "SIDECAR_LISTEN": "10.0.0.5:8700", "SIDECAR_ALLOW_REMOTE": "true"}
    )
    assert s.listen == Listen("10.0.0.5", 8700)
    assert "10.0.0.5" in s.allowed_hosts


@pytest.mark.parametrize(
    "value", ["127.0.0.1:8700", "[::1]:8700", "localhost:1", "unix:/tmp/s.sock"]
)
def test_loopback_and_unix_listen_need_nothing(value: str) -> None:
    s = Settings.from_env({**BASE, "SIDECAR_LISTEN": value})
    assert s.listen.is_loopback


def test_unix_listen() -> None:
    s = Settings.from_env({**BASE, "SIDECAR_LISTEN": "unix:/run/vellum/sidecar.sock"})
    assert s.listen.is_unix
    assert s.listen.path == "/run/vellum/sidecar.sock"


def test_key_and_secrets_from_files(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    secrets_file = tmp_path / "secrets"
    secrets_file.write_text("whsec_old,whsec_new\n")
    s = Settings.from_env(
        {
            "VELLUM_API_KEY_FILE": str(key_file),
            "VELLUM_TENANT_ID": "acme",
            "VELLUM_WEBHOOK_SECRETS_FILE": str(secrets_file),
        }
    )
    assert s.api_key.current(0) == KEY
    assert [x.reveal() for x in s.webhook_secrets] == ["whsec_old", "whsec_new"]
    assert s.webhooks_enabled


def test_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("first")
    s = Settings.from_env({"VELLUM_API_KEY_FILE": str(key_file), "VELLUM_TENANT_ID": "t"})
    assert s.api_key.current(100.0) == "first"
    key_file.write_text("second-rotated")
    import os

    os.utime(key_file, ns=(10**18, 10**18))
    assert s.api_key.current(100.5) == "first", "checked at most once a second"
    assert s.api_key.current(102.0) == "second-rotated"
    key_file.write_text("")
    os.utime(key_file, ns=(2 * 10**18, 2 * 10**18))
    assert s.api_key.current(104.0) == "second-rotated", "an emptied file keeps the last key"


def test_file_problems_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {
                "VELLUM_API_KEY_FILE": str(tmp_path / "missing"),
                "VELLUM_TENANT_ID": "t",
                "VELLUM_WEBHOOK_SECRETS_FILE": str(empty),
            }
        )
    names = [p.split(":")[0] for p in info.value.problems]
    assert names == ["VELLUM_API_KEY_FILE", "VELLUM_WEBHOOK_SECRETS_FILE"]


def test_value_and_file_together_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("x")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "VELLUM_API_KEY_FILE": str(f)})
    assert info.value.problems[0].startswith("VELLUM_API_KEY:")


def test_secrets_never_in_repr_or_redacted_output() -> None:
    s = Settings.from_env(
        {
            **BASE,
            "VELLUM_WEBHOOK_SECRETS": "whsec_aaa,whsec_bbb",
            "SIDECAR_REDIS_URL": "redis://user:redispass@cache:6379/2",
        }
    )
    shown = repr(s) + str(s) + "\n".join(f"{k}={v}" for k, v in s.redacted())
    for secret in (KEY, "whsec_aaa", "whsec_bbb", "redispass"):
        assert secret not in shown
    printed = dict(s.redacted())
    assert printed["SIDECAR_REDIS_URL"] == "redis://user:***@cache:6379/2"
    assert printed["VELLUM_API_KEY"] == "***"
    assert list(printed) == [v.name for v in VARIABLES]
    assert repr(Secret("x")) == "Secret('***')"


def test_redact_url_forms() -> None:
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://:pw@h:6380") == "rediss://:***@h:6380"
    assert redact_url("redis://token@h") == "redis://***@h"


def test_fail_open_modules_keep_their_case() -> None:
    s = Settings.from_env({**BASE, "SIDECAR_FAIL_OPEN_MODULES": "Reports, search"})
    assert s.fail_open_modules == frozenset({"Reports", "search"})
