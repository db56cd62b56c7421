"""Configuration: parsing, validation naming each variable, redaction, flags."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from sidecar.config import (
    SETTINGS,
    VARIABLES,
    ConfigError,
    Settings,
    add_flags,
    env_with_flags,
)
from sidecar.logs import JsonFormatter
from sidecar.values import Listen, Secret, redact_url

ROOT = Path(__file__).resolve().parent.parent

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
        ("SIDECAR_REDIS_POOL_SIZE", "1"),  # the fan-out subscription would hold it
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


# -- one declaration per variable ----------------------------------------------------------


def test_every_field_is_declared_once_and_defaults_agree() -> None:
    declared = [f.name for f in fields(Settings) if f.name != "files"]
    assert len(SETTINGS) == len(declared), "every Settings field has a declaration"
    names = [v.name for v in VARIABLES]
    assert len(set(names)) == len(names)
    s = Settings.from_env(BASE)
    for f in fields(Settings):
        if f.default is not MISSING:
            # The field's default is the parsed README default, so both agree.
            assert getattr(s, f.name) == f.default, f.name
    shown = dict(s.redacted())
    for decl in SETTINGS:
        if decl.default not in (None, "") and not decl.secret:
            same = Settings.from_env({**BASE, decl.name: decl.default})
            assert same.redacted() == s.redacted(), decl.name
        assert decl.doc and decl.help, decl.name
        assert decl.name in shown


def test_readme_table_is_generated_from_the_declarations(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gen_config_docs.py"
    current = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert current.returncode == 0, current.stderr
    readme = (ROOT / "README.md").read_text()
    for decl in SETTINGS:
        assert f"`{decl.name}`" in readme
    # A stale copy fails --check, and a plain run rewrites only the table.
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("`SIDECAR_CACHE_TTL` | `--cache-ttl` | `300`", "x | y | z"))
    check = [sys.executable, str(script), "--readme", str(stale), "--check"]
    failed = subprocess.run(check, capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert "stale" in failed.stderr
    subprocess.run([*check[:-1]], check=True, capture_output=True)
    assert stale.read_text() == readme
    assert subprocess.run(check, capture_output=True, check=False).returncode == 0


def test_flags_cover_the_file_forms() -> None:
    flags = {v.name: v.flag for v in VARIABLES}
    assert flags["SIDECAR_REDIS_URL_FILE"] == "--redis-url-file"
    assert flags["VELLUM_WEBHOOK_SECRETS_FILE"] == "--webhook-secrets-file"
    secret = {v.name for v in VARIABLES if v.secret}
    assert secret == {"VELLUM_API_KEY", "VELLUM_WEBHOOK_SECRETS", "SIDECAR_REDIS_URL"}


# -- SIDECAR_REDIS_URL_FILE ----------------------------------------------------------------


def test_redis_url_from_a_file(tmp_path: Path) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://app:filepass@cache:6379/3\n")
    s = Settings.from_env({**BASE, "SIDECAR_REDIS_URL_FILE": str(url_file)})
    assert s.redis_url is not None
    assert s.redis_url.reveal() == "redis://app:filepass@cache:6379/3", "newline stripped"
    printed = dict(s.redacted())
    assert printed["SIDECAR_REDIS_URL"] == "redis://app:***@cache:6379/3"
    assert printed["SIDECAR_REDIS_URL_FILE"] == str(url_file)
    assert "filepass" not in repr(s) + str(printed)
    # A blank SIDECAR_REDIS_URL (a ConfigMap overlay emptying the base's value) is unset.
    blank = Settings.from_env(
        {**BASE, "SIDECAR_REDIS_URL": "", "SIDECAR_REDIS_URL_FILE": str(url_file)}
    )
    assert blank.redis_url == s.redis_url
    # Read at start: a later change of the file does not change these settings.
    url_file.write_text("redis://other:6379/0\n")
    assert s.redis_url.reveal() == "redis://app:filepass@cache:6379/3"


def test_redis_url_file_counts_as_redis_for_cluster_and_workers(tmp_path: Path) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:pw@n1:7000,n2:7001\n")
    s = Settings.from_env(
        {
            **BASE,
            "SIDECAR_REDIS_URL_FILE": str(url_file),
            "SIDECAR_REDIS_CLUSTER": "true",
            "SIDECAR_WORKERS": "2",
        }
    )
    assert s.redis_cluster and s.workers == 2
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "SIDECAR_REDIS_URL_FILE": str(url_file)})
    [problem] = info.value.problems
    assert problem.startswith("SIDECAR_REDIS_URL: several hosts")


def test_redis_url_file_problems_are_named_and_redacted(tmp_path: Path) -> None:
    both = tmp_path / "both"
    both.write_text("redis://cache:6379/0")
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {**BASE, "SIDECAR_REDIS_URL": "redis://h/0", "SIDECAR_REDIS_URL_FILE": str(both)}
        )
    assert info.value.problems == [
        "SIDECAR_REDIS_URL: set either SIDECAR_REDIS_URL or SIDECAR_REDIS_URL_FILE, not both"
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad = tmp_path / "bad"
    bad.write_text("http://user:badpass@cache:6379\n")
    for path, expected in (
        (tmp_path / "missing", "cannot read"),
        (empty, "is empty"),
        (bad, "scheme must be"),
    ):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({**BASE, "SIDECAR_REDIS_URL_FILE": str(path)})
        [problem] = info.value.problems
        assert problem.startswith("SIDECAR_REDIS_URL_FILE:"), problem
        assert expected in problem
        assert "badpass" not in problem


# -- credentials in URL settings -----------------------------------------------------------


def test_base_url_credentials_are_redacted() -> None:
    s = Settings.from_env({**BASE, "VELLUM_BASE_URL": "https://svc:basepass@vellum.internal/api/"})
    assert s.base_url == "https://svc:basepass@vellum.internal/api", "kept for the upstream"
    printed = dict(s.redacted())
    assert printed["VELLUM_BASE_URL"] == "https://svc:***@vellum.internal/api"
    assert "basepass" not in repr(s)
    token = Settings.from_env({**BASE, "VELLUM_BASE_URL": "https://tok_abc123@vellum.internal"})
    assert dict(token.redacted())["VELLUM_BASE_URL"] == "https://***@vellum.internal"


@pytest.mark.parametrize(
    "value",
    [
        "ftp://svc:basepass@vellum.internal",
        "svc:basepass@vellum.internal",
        "https://svc:basepass@vellum.internal/?token=basepass",
        "gopher://vellum.internal/?api_key=basepass",
    ],
)
def test_base_url_errors_never_show_credentials(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "VELLUM_BASE_URL": value})
    [problem] = info.value.problems
    assert problem.startswith("VELLUM_BASE_URL:")
    assert "basepass" not in problem and "basepass" not in str(info.value)


def test_sentinel_url_redacted_in_check_config_output() -> None:
    url = "rediss+sentinel://app:masterpw@s1:26379,[::1]:26380/mymaster/2?sentinel_password=sentpw"
    s = Settings.from_env({**BASE, "SIDECAR_REDIS_URL": url})
    printed = dict(s.redacted())["SIDECAR_REDIS_URL"]
    assert printed == (
        "rediss+sentinel://app:***@s1:26379,[::1]:26380/mymaster/2?sentinel_password=***"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://api.example.com/v1?api_key=k1&region=eu", "https://api.example.com/v1?api_key=***&region=eu"),
        ("https://h/?access_token=t1#id_token=t2", "https://h/?access_token=***#id_token=***"),
        ("https://h/?X-Amz-Signature=abc&X-Amz-Credential=def", "https://h/?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("rediss://h:6380/0?ssl_keyfile=/k.pem&ssl_certfile=/c.pem", "rediss://h:6380/0?ssl_keyfile=/k.pem&ssl_certfile=/c.pem"),
        ("unix://:sockpw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://[::1:pw@broken", "redis://[:***@broken"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_redact_url_more_forms(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_log_lines_never_show_url_credentials() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("cannot reach redis://:logpass@cache:6379/0")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "sidecar.test", logging.ERROR, __file__, 1,
        'push to "https://hooks.example/in?token=logpass" failed', None, exc_info,
    )  # fmt: skip
    record.fields = {"url": "https://svc:logpass@vellum.internal/x", "n": 3}
    line = formatter.format(record)
    parsed = json.loads(line)
    assert "logpass" not in line
    assert parsed["event"] == 'push to "https://hooks.example/in?token=***" failed'
    assert parsed["url"] == "https://svc:***@vellum.internal/x"
    assert parsed["error"] == "ValueError: cannot reach redis://:***@cache:6379/0"
    assert parsed["n"] == 3
