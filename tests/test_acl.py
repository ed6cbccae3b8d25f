"""Per-role Redis ACL users (pipeline/core/acl.py) against real redis-servers, and deploy files.

Each role runs its real code path (capture, worker, publisher, subscriber, `run`'s drain check)
as its own ACL user on Redis 7 (selectors, read/write key rules) and on the bundled Redis 6.2
(flattened rules); afterwards ACL LOG must be empty, i.e. nothing was denied, not even a call
whose error the code swallows. Negative checks show the users are really confined.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
import yaml

from pipeline.core import acl
from pipeline.core.config import CameraSettings, LineConfig, RedisSettings
from pipeline.core.embedded_redis import (
    EmbeddedRedis,
    embedded_redis_executable,
    server_binary_version,
)
from pipeline.core.redis_conn import RedisPermissionError, RedisUnavailableError, connect
from pipeline.core.wire import StreamKeys

REPO = Path(__file__).resolve().parents[1]
PREFIX = "acl[t]:"  # glob metacharacters: the patterns must escape them
CAM = "c1"


def _executables() -> dict[str, tuple[Path | None, bool]]:
    """name -> (redis-server binary or None, selectors)."""
    system = shutil.which("redis-server")
    seven = Path(system) if system and server_binary_version(system) >= (7,) else None
    try:
        bundled: Path | None = embedded_redis_executable()
    except FileNotFoundError:
        bundled = None
    return {"redis7": (seven, True), "redis6.2-rules": (bundled, False)}


SERVERS = _executables()


@dataclass
class AclRedis:
    server: EmbeddedRedis
    admin: redis.Redis
    passwords: dict[str, str]
    selectors: bool

    def settings(self, role: str, **extra: object) -> RedisSettings:
        return RedisSettings.model_validate(
            {
                "url": f"redis://127.0.0.1:{self.server.port}/0",
                "username": role,
                "password": self.passwords[role],
                "key_prefix": PREFIX,
                **extra,
            }
        )

    def client(self, role: str) -> redis.Redis:
        return connect(self.settings(role), client_name=f"test-{role}")

    def denials(self) -> list[dict]:
        return self.admin.acl_log()


@pytest.fixture(params=sorted(SERVERS))
def acl_redis(request: pytest.FixtureRequest) -> Iterator[AclRedis]:
    exe, selectors = SERVERS[request.param]
    if exe is None:
        pytest.skip(f"no redis-server for {request.param}")
    passwords = {role: acl.random_password() for role in acl.ROLES}
    with EmbeddedRedis(executable=exe, password=acl.random_password()) as server:
        admin = redis.Redis.from_url(server.url)
        for role in acl.ROLES:
            args = acl.setuser_args(role, passwords[role], key_prefix=PREFIX, selectors=selectors)
            admin.execute_command("ACL", "SETUSER", *args)
        admin.acl_log_reset()
        yield AclRedis(server, admin, passwords, selectors)
        admin.close()


# ------------------------------------------------------------------------------------- rules


def test_rules_per_syntax_and_escaped_prefix() -> None:
    seven = acl.role_rules("publisher", key_prefix=PREFIX, selectors=True)
    assert seven[:2] == ["resetchannels", "-@all"]
    assert "+ping" in seven and "+info" in seven and "+client|setname" in seven
    assert "(+xadd %W~acl\\[t\\]:alarms %W~acl\\[t\\]:alarms:{*} " in " ".join(seven)
    assert not any(r.startswith("~") for r in seven)  # every key rule sits in a selector
    six = acl.role_rules("publisher", key_prefix=PREFIX, selectors=False)
    assert not any(r.startswith(("(", "%")) for r in six)
    assert "~acl\\[t\\]:frames:{*}" in six and "+xadd" in six
    assert "+xrange" not in " ".join(seven + six)  # XPENDING on frames, never a read
    for role in acl.ROLES:  # nobody gets dangerous commands or channels
        text = " ".join(acl.role_rules(role))
        for bad in ("+@all", "+flushall", "+config", "+keys", "+acl", "&*", "allkeys", "~*"):
            assert bad not in text, (role, bad)
    with pytest.raises(ValueError, match="whitespace"):
        acl.role_rules("capture", key_prefix="a b:")


def test_acl_file_always_defines_the_default_user() -> None:
    text = acl.acl_file_text({"default": "adm", "worker": "w"}, user_prefix="l2-")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == f"user default on #{acl.password_hash('adm')} ~* &* +@all"
    assert lines[1].startswith(f"user l2-worker reset on #{acl.password_hash('w')} ")
    assert "adm" not in text.split("#", 3)[-1] and ">w" not in text
    closed = acl.acl_file_text({"capture": "c"}, hashed=False)
    assert "user default off " in closed and "user capture reset on >c " in closed


def test_password_files_are_private_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    first = acl.load_or_create_passwords(folder, ["default", "worker"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    path = folder / "redis_worker_password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (folder / "redis_password").read_text().strip() == first["default"]
    again = acl.load_or_create_passwords(folder, ["default", "worker", "capture"], file_mode=0o644)
    assert again["worker"] == first["worker"]  # re-rendering never rotates a password
    assert stat.S_IMODE((folder / "redis_capture_password").stat().st_mode) == 0o644
    (folder / "redis_capture_password").write_text("\n")
    with pytest.raises(ValueError, match="empty password file"):
        acl.load_or_create_passwords(folder, ["capture"])


# ---------------------------------------------------------------------- real code paths


@pytest.fixture(scope="module")
def engine():
    import torch

    from models.inference import InferenceEngine, ModelInfo
    from models.networks import neutral_model

    torch.set_num_threads(1)
    model = neutral_model("s")
    # threshold 0: every frame is anomalous, so the publisher opens an alarm (overlay included)
    info = ModelInfo("rand", "1", "ab" * 32, (256, 256), 0.0, 0.0, 1.0)
    return InferenceEngine.from_model(model, info, device="cpu")


def test_every_role_runs_its_code_path_without_a_denial(
    acl_redis: AclRedis, engine, tmp_path: Path
) -> None:
    from pipeline.core.stage_settings import PublisherSettings, WorkerSettings
    from pipeline.stages.capture import run_capture
    from pipeline.stages.subscribe import follow_alarms
    from pipeline.stages.supervisor.service import _line_drained
    from worker.service import FrameWorker

    keys = StreamKeys(PREFIX)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 256, (48, 64, 3), np.uint8))

    # capture: resume seq, XADD frames + status (pipelined)
    capture = acl_redis.client("capture")
    camera = CameraSettings(id=CAM, source=str(folder), status_interval_s=0.1)
    stats = run_capture(camera, capture, keys, threading.Event())
    assert stats.error is None and stats.frames_written == 6
    capture.close()

    # worker: group, reads, claims, liveness key, results + acks through the Lua script
    worker_client = acl_redis.client("worker")
    settings = WorkerSettings(batch_size=3, max_wait_ms=50, block_ms=50, claim_interval_s=0.05)
    worker = FrameWorker(worker_client, keys, settings, {CAM: engine}, consumer="w-acl")
    wstats = worker.run(max_results=6, idle_exit_s=20)
    assert wstats.results == 6
    worker_client.close()

    # publisher: lease (SET NX PX + scripts), state hash, alarms in MULTI/EXEC, overlays
    pub_client = acl_redis.client("publisher")
    from pipeline.stages.publisher import AlarmPublisher

    publisher = AlarmPublisher(
        pub_client, keys, PublisherSettings(lease_ttl_s=1.0), [CAM], name="p-acl"
    )
    publisher.run(idle_exit_s=2.0)
    pub_client.close()

    # subscriber: `efficientad alarms` from the start and from "$" (XINFO STREAM)
    sub = acl_redis.client("subscriber")
    events = list(follow_alarms(sub, keys, start="0", block_ms=100, idle_timeout_s=0.3))
    assert events and events[0].type == "alarm.started" and events[0].overlay
    assert list(follow_alarms(sub, keys, cam=CAM, start="$", block_ms=50, idle_timeout_s=0.1)) == []
    assert sub.xlen(keys.status()) > 0
    sub.close()

    # supervisor: drain check + process events
    sup = acl_redis.client("supervisor")
    config = LineConfig.model_validate(
        {"redis": {"key_prefix": PREFIX}, "cameras": [{"id": CAM, "source": str(folder)}]}
    )
    assert _line_drained(sup, config, with_publisher=True)
    from pipeline.core.status import StatusEvent, emit_status

    emit_status(sup, keys, StatusEvent(event="process.started", source="run"))
    sup.close()

    assert acl_redis.denials() == []


def test_users_are_confined(acl_redis: AclRedis) -> None:
    keys = StreamKeys(PREFIX)
    clients = {role: acl_redis.client(role) for role in acl.ROLES}
    denied = redis.exceptions.NoPermissionError
    try:
        with pytest.raises(denied):
            clients["subscriber"].xadd(keys.frames(CAM), {"x": 1})
        with pytest.raises(denied):
            clients["capture"].xrange(keys.results(CAM))
        with pytest.raises(denied):
            clients["capture"].xadd(keys.alarms(), {"x": 1})
        with pytest.raises(denied):
            clients["worker"].xadd(keys.alarms(), {"x": 1})
        with pytest.raises(denied):
            clients["capture"].xadd(f"aclt:frames:{{{CAM}}}", {"x": 1})  # prefix is literal
        with pytest.raises(denied):  # overlays come with the results: frames are never read
            clients["publisher"].xrange(keys.frames(CAM))
        for role, client in clients.items():
            for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("DBSIZE",)):
                with pytest.raises(denied):
                    client.execute_command(*command)
            if acl_redis.selectors or role not in ("worker", "publisher"):
                with pytest.raises(denied):  # 6.2: DEL of liveness/lease keys covers all keys
                    client.delete(keys.frames(CAM))
            with pytest.raises(denied):
                client.publish("ch", "x")
            assert client.ping(), role
        if acl_redis.selectors:  # per-grant selectors and read/write key rules need Redis 7
            with pytest.raises(denied):
                clients["supervisor"].xadd(keys.frames(CAM), {"x": 1})
            with pytest.raises(denied):
                clients["publisher"].xadd(keys.frames(CAM), {"x": 1})
            with pytest.raises(denied):
                clients["publisher"].xrange(keys.alarms())
            with pytest.raises(denied):
                clients["subscriber"].xrange(keys.frames(CAM))
    finally:
        for client in clients.values():
            client.close()


def test_missing_permission_at_connect_is_a_permission_error(acl_redis: AclRedis) -> None:
    acl_redis.admin.execute_command("ACL", "SETUSER", "bare", "on", ">pw", "+ping")
    settings = RedisSettings(url=f"redis://bare:pw@127.0.0.1:{acl_redis.server.port}/0")
    with pytest.raises(RedisPermissionError, match=r"user 'bare'.*info.*redis-acl"):
        connect(settings)


# ------------------------------------------------------------------------------------- CLI


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("EFFICIENTAD")}
    return subprocess.run(
        [sys.executable, "-m", "efficientad.cli", *argv],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_redis_acl_command_writes_a_loadable_acl_file(server: str, tmp_path: Path) -> None:
    exe, selectors = SERVERS[server]
    if exe is None:
        pytest.skip(f"no redis-server for {server}")
    secrets = tmp_path / "secrets"
    out = secrets / "users.acl"
    version = "7" if selectors else "6.2"
    done = _cli(
        "redis-acl",
        "--key-prefix",
        PREFIX,
        "--password-dir",
        str(secrets),
        "--out",
        str(out),
        "--redis-version",
        version,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for role in ("default", *acl.ROLES):
        password = (secrets / acl.password_file_name(role)).read_text().strip()
        assert password not in text  # only hashes in the ACL file
    with EmbeddedRedis(executable=exe, extra_args=["--aclfile", str(out)]) as srv:
        url = f"redis://127.0.0.1:{srv.port}/0"
        with pytest.raises(RedisUnavailableError, match=r"NOAUTH|refused"):
            connect(RedisSettings(url=url))  # no password: default is protected
        admin_pw = (secrets / "redis_password").read_text().strip()
        admin = connect(RedisSettings(url=url, password=admin_pw))
        for role in acl.ROLES:
            settings = RedisSettings(
                url=url, username=role, password_file=secrets / acl.password_file_name(role)
            )
            client = connect(settings, client_name=f"cli-{role}")
            assert client.ping()
            client.close()
        assert admin.acl_log() == []
        admin.close()


PW = "s3cr3t-pw"


def test_permission_errors_exit_with_code_2(tmp_path: Path) -> None:
    """NOPERM at connect (publish) and at runtime (alarms) is a configuration error."""
    with EmbeddedRedis(password="adm") as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "bare", "on", ">s3cr3t-pw", "+ping")
        connected = ["on", ">s3cr3t-pw", "+ping", "+info", "+client|setname"]
        admin.execute_command("ACL", "SETUSER", "noread", *connected)
        config = tmp_path / "line.yaml"
        config.write_text(f"cameras: [{{id: {CAM}, source: {str(tmp_path)!r}}}]\n")
        url = f"redis://127.0.0.1:{server.port}/0"
        publish = _cli(
            "publish", "--config", str(config), "--redis-url", url, "--no-metrics",
            env={"EFFICIENTAD__REDIS__USERNAME": "bare", "EFFICIENTAD__REDIS__PASSWORD": PW},
        )  # fmt: skip
        assert publish.returncode == 2, publish.stderr
        assert "'bare'" in publish.stderr and PW not in publish.stderr
        alarms = _cli(
            "alarms", "--config", str(config), "--redis-url", url, "--timeout", "0.2",
            env={"EFFICIENTAD__REDIS__USERNAME": "noread", "EFFICIENTAD__REDIS__PASSWORD": PW},
        )  # fmt: skip
        assert alarms.returncode == 2, alarms.stderr
        assert "lacks a permission" in alarms.stderr
        admin.close()


# ------------------------------------------------------------------------ `run` (embedded)


def test_embedded_run_gives_each_role_its_own_user(tmp_path: Path) -> None:
    from pipeline.stages.supervisor import line_specs
    from pipeline.stages.supervisor.service import _start_embedded

    config = LineConfig.model_validate(
        {"redis": {"key_prefix": PREFIX}, "cameras": [{"id": CAM, "source": str(tmp_path)}]}
    )
    server, creds = _start_embedded(config, tmp_path / "users")
    try:
        assert server.password and server.password not in Path(
            f"/proc/{server.pid}/cmdline"
        ).read_bytes().decode(errors="replace")
        base = RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", key_prefix=PREFIX)
        for role in (*acl.CHILD_ROLES, "supervisor"):
            path = creds.password_file(role)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            client = connect(creds.settings(base, role), client_name=role)
            assert client.ping()
            client.close()
        with pytest.raises(RedisUnavailableError, match=r"NOAUTH|refused"):
            connect(RedisSettings(url=base.url))  # the default user has a random password
        specs = line_specs(config, tmp_path / "line.yaml", workers=1, credentials=creds)
        for spec in specs:
            assert spec.env["EFFICIENTAD__REDIS__USERNAME"] == spec.role
            assert spec.env["EFFICIENTAD__REDIS__PASSWORD_FILE"] == str(
                creds.password_file(spec.role)  # type: ignore[arg-type]
            )
            assert "EFFICIENTAD__REDIS__PASSWORD" in spec.env_unset
            assert not any(server.password in v for v in spec.env.values())
    finally:
        server.cleanup()


# ------------------------------------------------------------------------------ deploy files


def test_compose_security_settings() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    secrets = compose["secrets"]
    red = services["redis"]
    command = red["command"]

    def arg(name: str) -> str:
        return command[command.index(name) + 1]

    # Redis: users + default password from the secret ACL file, AOF, bounded memory, no eviction
    acl_file = arg("--aclfile")
    assert acl_file == "/run/secrets/redis_users_acl" and "redis_users_acl" in red["secrets"]
    assert secrets["redis_users_acl"]["file"].startswith("./secrets/")
    assert arg("--appendonly") == "yes"
    assert arg("--maxmemory") and arg("--maxmemory") != "0"
    assert arg("--maxmemory-policy") == "noeviction"
    health = " ".join(red["healthcheck"]["test"])
    assert "/run/secrets/redis_password" in health and "redis_password" in red["secrets"]
    assert red["ports"] == ["127.0.0.1:6379:6379"]
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits.get("cpus") and limits.get("memory"), name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        if name == "redis":
            continue
        env = service["environment"]
        role = env["EFFICIENTAD__REDIS__USERNAME"]
        assert role in acl.ROLES, name
        secret = acl.password_file_name(role)
        assert env["EFFICIENTAD__REDIS__PASSWORD_FILE"] == f"/run/secrets/{secret}"
        assert service["secrets"] == [secret] and secrets[secret]["file"] == f"./secrets/{secret}"
        assert "EFFICIENTAD__REDIS__PASSWORD" not in env  # never a password in the file
        assert "@" not in env["EFFICIENTAD_REDIS_URL"]
        if service.get("ports"):  # published ports: the container listens on all interfaces
            assert env["EFFICIENTAD__METRICS__HOST"] == "0.0.0.0"
    for name in ("worker-0", "worker-1"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["driver"]
    roles = {
        s["environment"]["EFFICIENTAD__REDIS__USERNAME"]
        for s in services.values()
        if "environment" in s
    }
    assert roles == {"capture", "worker", "publisher", "subscriber"}


def test_compose_redis_command_runs_with_generated_secrets(tmp_path: Path) -> None:
    """The compose Redis command line on a real server, with secrets from `redis-acl`."""
    exe, _ = SERVERS["redis7"]
    if exe is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server >= 7 and redis-cli")
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    secrets = tmp_path / "secrets"
    passwords = acl.load_or_create_passwords(secrets, ["default", *acl.ROLES])
    (secrets / "users.acl").write_text(acl.acl_file_text(passwords))
    mapping = {
        f"/run/secrets/{name}": str(tmp_path / spec["file"])
        for name, spec in compose["secrets"].items()
    }
    args = [mapping.get(a, a) for a in compose["services"]["redis"]["command"][1:]]
    with EmbeddedRedis(executable=exe, extra_args=args) as server:  # its own args come first
        health = compose["services"]["redis"]["healthcheck"]["test"][1].replace("$$", "$")
        for path_in, path_out in mapping.items():
            health = health.replace(path_in, path_out)
        health = health.replace("redis-cli", f"redis-cli -p {server.port}")
        assert subprocess.run(["sh", "-c", health], timeout=10).returncode == 0
        admin = connect(RedisSettings(url=server.url, password=passwords["default"]))
        assert admin.config_get("appendonly")["appendonly"] == "yes"
        assert int(admin.config_get("maxmemory")["maxmemory"]) == 2 * 1024**3
        role = connect(
            RedisSettings(url=server.url, username="worker", password=passwords["worker"])
        )
        assert role.ping()
        role.close()
        admin.close()


def test_image_and_package_require_a_safe_torch() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = next(line for line in dockerfile.splitlines() if line.startswith("ARG BASE_IMAGE="))
    tag = base.split(":", 1)[1]
    major, minor = (int(p) for p in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (2, 10), base
    assert dockerfile.count('python -c "$TORCH_CHECK"') == 2  # before and after pip install
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.10,' in pyproject and '"torchvision>=0.25,' in pyproject
    config = yaml.safe_load((REPO / "configs" / "line.yaml").read_text())
    assert config["metrics"]["host"] == "127.0.0.1"
    assert LineConfig().metrics.host == "127.0.0.1"


@pytest.mark.slow
def test_run_with_acl_dir_on_an_external_redis(tmp_path: Path) -> None:
    """`efficientad run --acl-dir` against Redis 7 loaded with `redis-acl`'s file: no denial."""
    from pipeline.tools.tiny_model import random_model_dir

    exe, _ = SERVERS["redis7"]
    if exe is None:
        pytest.skip("needs redis-server >= 7")
    random_model_dir(tmp_path / "model", threshold=0.0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 256, (48, 64, 3), np.uint8))
    config = tmp_path / "line.yaml"
    config.write_text(
        f"""
redis: {{key_prefix: {PREFIX!r}}}
cameras: [{{id: {CAM}, source: {str(folder)!r}}}]
models: {{default: {str(tmp_path / "model")!r}}}
worker: {{device: cpu, batch_size: 4, claim_interval_s: 0.5}}
metrics: {{port: 0}}
run: {{workers: 1, stop_timeout_s: 20, drain_timeout_s: 120}}
"""
    )
    secrets = tmp_path / "secrets"
    made = _cli(
        "redis-acl", "--config", str(config), "--password-dir", str(secrets),
        "--out", str(secrets / "users.acl"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    with EmbeddedRedis(executable=exe, extra_args=["--aclfile", str(secrets / "users.acl")]) as srv:
        url = f"redis://127.0.0.1:{srv.port}/0"
        missing = _cli("run", "--config", str(config), "--redis-url", url, "--acl-dir", "/nope")
        assert missing.returncode == 2 and "redis-acl" in missing.stderr
        done = _cli(
            "run", "--config", str(config), "--redis-url", url, "--acl-dir", str(secrets),
            "--until-drained",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "line drained" in done.stderr
        admin_pw = (secrets / "redis_password").read_text().strip()
        admin = connect(RedisSettings(url=url, password=admin_pw))
        assert admin.acl_log() == []
        # the children had no credentials but their role's password file: the default user
        # needs redis_password, so every write below went through a role user
        assert admin.xlen(f"{PREFIX}results:{{{CAM}}}") == 5
        assert admin.xlen(f"{PREFIX}alarms") > 0
        admin.close()
