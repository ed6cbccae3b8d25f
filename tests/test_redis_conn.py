"""Redis connection helper and the embedded redis-server, against real servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from pipeline.core.config import RedisSettings
from pipeline.core.embedded_redis import EmbeddedRedis, embedded_redis_executable
from pipeline.core.redis_conn import (
    RedisPermissionError,
    RedisUnavailableError,
    RedisVersionError,
    check_server_version,
    connect,
    is_permission_error,
    redact_url,
    stall_limit_s,
)


def test_bundled_binary_is_found() -> None:
    exe = embedded_redis_executable()
    assert exe.name == "redis-server" and exe.is_file()


def test_embedded_start_stop() -> None:
    server = EmbeddedRedis()
    with server:
        assert server.running
        client = connect(RedisSettings(url=server.url))
        assert client.ping()
        version = check_server_version(client)
        assert version >= (6, 2)
        client.set("k", "v")
        assert client.get("k") == b"v"
        # no persistence by default: nothing configured to save
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
        pid = server.pid
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # type: ignore[arg-type]


def test_embedded_kill_and_restart_keeps_data_with_dir(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    try:
        server.start()
        port = server.port
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"a": 1})
        client.close()
        server.stop()  # SIGTERM flushes the append-only file
        assert not server.running
        server.start()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.xlen("s") == 1
        server.kill()  # a crash
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.ping()  # the same client reconnects by itself
        client.close()
    finally:
        server.cleanup()
    assert (tmp_path / "redis").is_dir()  # a configured data dir is kept


def test_two_servers_get_different_ports() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        assert redis.Redis.from_url(a.url).ping() and redis.Redis.from_url(b.url).ping()


def test_acl_user_and_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    acl = ["--user", "capture", "on", ">s3cret", "~frames:*", "+@all", "--user", "default", "off"]
    with EmbeddedRedis(extra_args=acl, unix_socket=sock) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        # credentials in the URL
        client = connect(RedisSettings(url=f"redis://capture:s3cret@127.0.0.1:{server.port}/0"))
        assert client.acl_whoami() in (b"capture", "capture")
        client.xadd("frames:{c}", {"x": 1})
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("other", 1)  # the ACL really applies
        client.close()
        # credentials from settings (password as SecretStr) over a unix socket
        settings = RedisSettings.model_validate(
            {"url": f"unix://{sock}", "username": "capture", "password": "s3cret"}
        )
        client = connect(settings)
        assert client.acl_whoami() in (b"capture", "capture")
        client.close()
        # wrong or missing credentials: a clear error without the password in it
        with pytest.raises(RedisUnavailableError, match="refused the credentials") as info:
            connect(RedisSettings(url=f"redis://capture:wrong@127.0.0.1:{server.port}/0"))
        assert "wrong" not in str(info.value) and "capture:***@" in str(info.value)
        with pytest.raises(RedisUnavailableError):
            connect(RedisSettings(url=url))


def test_password_protected_embedded() -> None:
    with EmbeddedRedis(password="pw/with:odd@chars") as server:
        assert connect(RedisSettings(url=server.url)).ping()
        with pytest.raises(RedisUnavailableError):
            connect(RedisSettings(url=f"redis://127.0.0.1:{server.port}/0"))


def test_unreachable_server_is_a_clear_error() -> None:
    with EmbeddedRedis() as server:
        port = server.port
    settings = RedisSettings(url=f"redis://u:topsecret@127.0.0.1:{port}/0", retries=1)
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis") as info:
        connect(settings)
    assert "topsecret" not in str(info.value)
    # check=False never touches the network (capture starts while Redis is down)
    client = connect(settings, check=False)
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_no_url_explains_the_options() -> None:
    with pytest.raises(RedisUnavailableError, match="EFFICIENTAD_REDIS_URL"):
        connect(RedisSettings())


def test_old_servers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedRedis() as server:
        real_info = redis.Redis.info

        def old_info(self: redis.Redis, section: str | None = None, *args: object) -> dict:
            info = real_info(self, section)
            return {**info, "redis_version": "6.0.16"}

        monkeypatch.setattr(redis.Redis, "info", old_info)
        with pytest.raises(RedisVersionError, match=r"version 6\.0\.16.*needs Redis >= 6\.2"):
            connect(RedisSettings(url=server.url))


def test_client_options_follow_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = RedisSettings(
        url="rediss://user:pw@redis.example:6380/2",
        ssl_ca_certs=ca,
        ssl_cert_reqs="required",
        socket_timeout_s=7.5,
        health_check_interval_s=3,
    )
    client = connect(settings, check=False)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(ca)
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["socket_timeout"] == 7.5
    assert kwargs["health_check_interval"] == 3
    assert kwargs["username"] == "user" and kwargs["password"] == "pw"
    assert kwargs["db"] == 2
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_redact_url() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("rediss://:pw@h/0") == "rediss://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_settings_credentials_win_over_the_urls() -> None:
    """redis-py lets URL credentials beat keyword arguments; the config promises the opposite."""
    acl = ["--user", "svc", "on", ">right", "+@all", "~*"]
    with EmbeddedRedis(extra_args=acl) as server:
        url = f"redis://other:wrong@127.0.0.1:{server.port}/0"
        client = connect(RedisSettings(url=url, username="svc", password="right"))
        assert client.acl_whoami() in (b"svc", "svc")
        client.close()
        with pytest.raises(RedisUnavailableError, match="other:\\*\\*\\*@") as info:
            connect(RedisSettings(url=url))  # URL credentials still apply without settings
        assert "wrong" not in str(info.value)
        encoded = f"redis://svc:r%69ght@127.0.0.1:{server.port}/0"  # percent-encoded password
        assert connect(RedisSettings(url=encoded, username="svc")).ping()


def test_embedded_password_stays_off_the_command_line() -> None:
    with EmbeddedRedis(password="not-in-ps-output") as server:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"not-in-ps-output" not in cmdline
        assert connect(RedisSettings(url=server.url)).ping()


def test_permission_errors_are_recognised() -> None:
    assert is_permission_error(redis.exceptions.NoPermissionError("no permissions"))
    assert is_permission_error(RedisPermissionError("x"))
    # Redis 7.0 reports denials inside Lua scripts as ERR, and pcall replies carry the text
    script = "ERR The user executing the script can't access at least one of the keys"
    assert is_permission_error(redis.ResponseError(script))
    assert is_permission_error(b"!NOPERM this user has no permissions to run the 'xadd' command")
    assert not is_permission_error(redis.ResponseError("NOGROUP No such key"))
    assert not is_permission_error(redis.ConnectionError("NOPERM lookalike"))


def test_noperm_at_connect_is_not_an_outage() -> None:
    with EmbeddedRedis(password="adm") as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "pinger", "on", ">pw", "+ping", "+info")
        url = f"redis://pinger:pw@127.0.0.1:{server.port}/0"
        assert connect(RedisSettings(url=url)).ping()  # PING + INFO are all connect needs
        with pytest.raises(RedisPermissionError, match=r"'pinger'.*client") as info:
            connect(RedisSettings(url=url), client_name="needs-setname")
        assert not isinstance(info.value, RedisUnavailableError) and "pw@" not in str(info.value)
        assert [e["object"] for e in admin.acl_log()] == ["client"]  # nothing else was denied
        admin.close()


def test_stall_limit_covers_every_retry() -> None:
    settings = RedisSettings(
        socket_timeout_s=10, socket_connect_timeout_s=5, retries=3, retry_backoff_cap_s=2
    )
    assert stall_limit_s(settings) == 4 * 15 + 3 * 2
