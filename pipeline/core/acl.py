"""Per-role Redis ACL users: each process of the line gets only the commands and keys it uses.

Why: with one shared password a camera box, a dashboard or a leaked worker credential could
delete streams, rewrite alarms, ``FLUSHALL`` or ``CONFIG SET``. Each role connects as its own ACL
user instead (``redis.username`` + ``redis.password_file``), so a compromised process can only do
what its code path does; a missing permission surfaces as ``NOPERM``, which every command treats
as a configuration error (exit code 2), not as "Redis unavailable".

Roles (``P`` = ``redis.key_prefix``, ``{*}`` = any camera; R = read, W = write):

==========  ====================================================  ===============================
role        commands                                              keys
==========  ====================================================  ===============================
(all)       PING, INFO, CLIENT SETNAME, SELECT (AUTH/HELLO free)  none
capture     XADD, XRANGE, XREVRANGE, XINFO STREAM                 P frames:{*} (RW)
            GET, SET                                              P capture:{*}:seq (RW)
            XADD                                                  P status (W)
worker      XGROUP CREATE, XREADGROUP, XAUTOCLAIM, XCLAIM,       P frames:{*} (RW)
            XPENDING, XACK, XINFO CONSUMERS
            EVALSHA (+ SCRIPT LOAD); the script runs XPENDING,   P frames:{*}, P results:{*},
            XADD, XACK                                            P deadletter:{*} (RW)
            XADD                                                  P results:{*}, P deadletter:{*},
                                                                  P status (W)
            SET (PX), GET, EXISTS, DEL                            P worker:*:alive (RW)
            MULTI, EXEC                                           none
publisher   XGROUP CREATE, XREADGROUP, XPENDING, XCLAIM, XACK    P results:{*} (RW)
            XPENDING (frames a worker still holds; never XRANGE)  P frames:{*} (R)
            XADD                                                  P alarms, P alarms:{*},
                                                                  P deadletter:{*}, P status (W)
            HSET, HGETALL                                         P publisher:{*}:state (RW)
            SET (NX PX), GET, DEL, PEXPIRE, WATCH, EVALSHA       P publisher:{*}:lease (RW)
            (+ SCRIPT LOAD; lease release/renew scripts)
            GET, EXISTS                                           P worker:*:alive (R)
            MULTI, EXEC, UNWATCH                                  none
subscriber  XREAD, XRANGE, XREVRANGE, XLEN, XINFO STREAM         P alarms, P alarms:{*},
                                                                  P status (R)
supervisor  XINFO STREAM, XINFO GROUPS                            P frames:{*}, P results:{*} (R)
            XADD                                                  P status (W)
==========  ====================================================  ===============================

``supervisor`` is ``efficientad run`` itself (drain checks, process events). No role may touch
pub/sub channels. Operators keep the ``default`` user (full access) for ``redis-cli``, benchmarks
and the demo.

Redis >= 7 gets one ACL selector per row, with read/write key permissions (``%R~``/``%W~``), so
a publisher may XADD to ``alarms`` but not to ``frames``. Redis 6.2 has neither; its rules are
flattened (every command of a role on every key of the role), which still keeps each role to its
own keys and commands, but e.g. the worker's DEL (meant for its liveness key) then also reaches
frames: use Redis 7 where that matters.

``efficientad run`` with an embedded Redis creates these users itself (random passwords, handed to
the children as ``EFFICIENTAD__REDIS__USERNAME`` / ``EFFICIENTAD__REDIS__PASSWORD_FILE``). For an
external Redis (compose, bare metal)::

    efficientad redis-acl --config line.yaml --password-dir secrets --out secrets/users.acl
    redis-server --aclfile secrets/users.acl ...   # or: ACL LOAD after copying it in place

which writes one password file per role (kept when it exists, so re-running only re-renders the
rules) plus ``redis_password`` for the ``default`` user, and an ACL file holding only SHA-256
hashes of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "ADMIN",
    "CHILD_ROLES",
    "CONNECTION_COMMANDS",
    "ROLES",
    "ROLE_SPECS",
    "Grant",
    "Role",
    "RoleSpec",
    "acl_file_text",
    "child_env",
    "escape_pattern",
    "load_or_create_passwords",
    "password_file_name",
    "password_hash",
    "random_password",
    "role_rules",
    "setuser_args",
    "user_line",
    "username",
]

Role = Literal["capture", "worker", "publisher", "subscriber", "supervisor"]
ROLES: tuple[Role, ...] = ("capture", "worker", "publisher", "subscriber", "supervisor")
CHILD_ROLES: tuple[Role, ...] = ("capture", "worker", "publisher")  # children of `run`
ADMIN = "default"  # the full-access user operators keep (its password: ``redis_password``)

# Every client: PING (health checks of idle connections, /readyz), INFO (server version check in
# ``connect``), CLIENT SETNAME (the process shows in CLIENT LIST), SELECT (URLs with /N).
# AUTH and HELLO are allowed to every user without a grant.
CONNECTION_COMMANDS: tuple[str, ...] = ("ping", "info", "client|setname", "select")

Access = Literal["R", "W", "RW"]


@dataclass(frozen=True)
class Grant:
    """Commands allowed on a set of key patterns (one ACL selector on Redis >= 7)."""

    commands: tuple[str, ...]
    keys: tuple[tuple[Access, str], ...]  # (access, pattern relative to the key prefix)


@dataclass(frozen=True)
class RoleSpec:
    """What one role may do: keyless commands plus keyed grants."""

    role: Role
    purpose: str
    keyless: tuple[str, ...]
    grants: tuple[Grant, ...]


_STATUS_W = ("W", "status")

ROLE_SPECS: dict[Role, RoleSpec] = {
    "capture": RoleSpec(
        "capture",
        "efficientad capture: XADD frames (pipelined, no MULTI), resume seq, status events",
        (),
        (
            Grant(("xadd", "xrange", "xrevrange", "xinfo|stream"), (("RW", "frames:{*}"),)),
            Grant(("get", "set"), (("RW", "capture:{*}:seq"),)),
            Grant(("xadd",), (_STATUS_W,)),
        ),
    ),
    "worker": RoleSpec(
        "worker",
        "efficientad worker: consumer group on frames, results + acks via one Lua script",
        ("multi", "exec", "script|load"),
        (
            Grant(
                (
                    "xgroup|create",
                    "xreadgroup",
                    "xautoclaim",
                    "xclaim",
                    "xpending",
                    "xack",
                    "xinfo|consumers",
                ),
                (("RW", "frames:{*}"),),
            ),
            # EVALSHA declares frames, results and deadletter of one camera: all in one grant
            Grant(
                ("evalsha",),
                (("RW", "frames:{*}"), ("RW", "results:{*}"), ("RW", "deadletter:{*}")),
            ),
            Grant(("xadd",), (("W", "results:{*}"), ("W", "deadletter:{*}"), _STATUS_W)),
            Grant(("set", "get", "exists", "del"), (("RW", "worker:*:alive"),)),
        ),
    ),
    "publisher": RoleSpec(
        "publisher",
        "efficientad publish: results group, alarm streams, state hash, lease lock",
        ("multi", "exec", "unwatch", "script|load"),
        (
            Grant(
                ("xgroup|create", "xreadgroup", "xpending", "xclaim", "xack"),
                (("RW", "results:{*}"),),
            ),
            # capture order only: which frames a worker still holds; overlays come with the
            # results, so the publisher never reads a frame
            Grant(("xpending",), (("R", "frames:{*}"),)),
            Grant(
                ("xadd",),
                (("W", "alarms"), ("W", "alarms:{*}"), ("W", "deadletter:{*}"), _STATUS_W),
            ),
            Grant(("hset", "hgetall"), (("RW", "publisher:{*}:state"),)),
            # redis-py Lock: SET NX PX, then EVALSHA scripts that GET + DEL / GET + PEXPIRE
            Grant(
                ("set", "get", "del", "pexpire", "watch", "evalsha"),
                (("RW", "publisher:{*}:lease"),),
            ),
            Grant(("get", "exists"), (("R", "worker:*:alive"),)),
        ),
    ),
    "subscriber": RoleSpec(
        "subscriber",
        "efficientad alarms, dashboards: read alarm and status streams",
        (),
        (
            Grant(
                ("xread", "xrange", "xrevrange", "xlen", "xinfo|stream"),
                (("R", "alarms"), ("R", "alarms:{*}"), ("R", "status")),
            ),
        ),
    ),
    "supervisor": RoleSpec(
        "supervisor",
        "efficientad run: drain checks and process events",
        (),
        (
            Grant(("xinfo|stream", "xinfo|groups"), (("R", "frames:{*}"), ("R", "results:{*}"))),
            Grant(("xadd",), (_STATUS_W,)),
        ),
    ),
}

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def escape_pattern(text: str) -> str:
    """``text`` as a literal inside an ACL key pattern (glob metacharacters escaped)."""
    if any(ch.isspace() for ch in text):
        raise ValueError(f"{text!r}: whitespace cannot be expressed in an ACL key pattern")
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def username(role: str, user_prefix: str = "") -> str:
    """The ACL user name of ``role`` (``user_prefix`` separates several lines on one Redis)."""
    name = f"{user_prefix}{role}"
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"{name!r} is not a usable ACL user name")
    return name


def _key_token(access: Access, pattern: str, selectors: bool) -> str:
    if not selectors or access == "RW":
        return f"~{pattern}"
    return f"%{access}~{pattern}"


def role_rules(role: Role, *, key_prefix: str = "", selectors: bool = True) -> list[str]:
    """ACL rules of ``role`` after the password: commands, keys, selectors (no ``reset``/``on``).

    ``selectors=False`` (Redis 6.2) flattens every grant into the root permissions.
    """
    spec = ROLE_SPECS[role]
    prefix = escape_pattern(key_prefix)
    rules = ["resetchannels", "-@all"]
    rules += [f"+{cmd}" for cmd in _unique((*CONNECTION_COMMANDS, *spec.keyless))]
    if selectors:
        for grant in spec.grants:
            inner = [f"+{cmd}" for cmd in grant.commands]
            inner += [_key_token(a, prefix + p, True) for a, p in grant.keys]
            rules.append("(" + " ".join(inner) + ")")
        return rules
    commands = _unique(cmd for grant in spec.grants for cmd in grant.commands)
    patterns = _unique(prefix + p for grant in spec.grants for _, p in grant.keys)
    rules += [f"+{cmd}" for cmd in commands if f"+{cmd}" not in rules]
    rules += [f"~{p}" for p in patterns]
    return rules


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def password_hash(password: str) -> str:
    """SHA-256 hex digest, the ``#<hash>`` form an ACL file may hold instead of the password."""
    return hashlib.sha256(password.encode()).hexdigest()


def random_password() -> str:
    """A fresh password (256 bits, URL-safe so it also fits into a redis:// URL unquoted)."""
    return secrets.token_urlsafe(32)


def _password_rule(password: str, hashed: bool) -> str:
    if hashed:
        return f"#{password_hash(password)}"
    if any(ch.isspace() for ch in password):
        raise ValueError("a password in an ACL file cannot contain whitespace; use hashes")
    return f">{password}"


def user_line(
    role: Role,
    password: str,
    *,
    key_prefix: str = "",
    user_prefix: str = "",
    selectors: bool = True,
    hashed: bool = True,
) -> str:
    """``<name> reset on <password> <rules>``: a ``user`` line of an ACL file or redis.conf."""
    pw = _password_rule(password, hashed)
    rules = role_rules(role, key_prefix=key_prefix, selectors=selectors)
    return " ".join([username(role, user_prefix), "reset", "on", pw, *rules])


def setuser_args(
    role: Role,
    password: str,
    *,
    key_prefix: str = "",
    user_prefix: str = "",
    selectors: bool = True,
) -> list[str]:
    """Arguments of ``ACL SETUSER`` creating the role's user (one selector per argument)."""
    rules = role_rules(role, key_prefix=key_prefix, selectors=selectors)
    name = username(role, user_prefix)
    return [name, "reset", "on", f"#{password_hash(password)}", *rules]


def acl_file_text(
    passwords: Mapping[str, str],
    *,
    key_prefix: str = "",
    user_prefix: str = "",
    selectors: bool = True,
    hashed: bool = True,
) -> str:
    """A users.acl file: the ``default`` user (full access, or off without a password) + roles.

    The ``default`` line is always written: an ACL file without it would leave ``default`` open
    without a password when Redis loads the file. Redis rejects comment lines in ACL files, so
    the file says nothing about where it came from (see ``efficientad redis-acl --help``).
    """
    lines: list[str] = []  # ACL files have no comment syntax: users only
    admin = passwords.get(ADMIN)
    if admin:
        lines.append(f"user {ADMIN} on {_password_rule(admin, hashed)} ~* &* +@all")
    else:
        lines.append(f"user {ADMIN} off resetpass resetkeys resetchannels -@all")
    for role in ROLES:
        if role in passwords:
            lines.append(
                "user "
                + user_line(
                    role,
                    passwords[role],
                    key_prefix=key_prefix,
                    user_prefix=user_prefix,
                    selectors=selectors,
                    hashed=hashed,
                )
            )
    return "\n".join(lines) + "\n"


def password_file_name(role: str) -> str:
    """``redis_password`` for the default user, ``redis_<role>_password`` (Docker secret names)."""
    return "redis_password" if role == ADMIN else f"redis_{role}_password"


def load_or_create_passwords(
    directory: Path, roles: Sequence[str], *, file_mode: int = 0o600
) -> dict[str, str]:
    """Role -> password, read from ``directory`` or generated and written there.

    Existing files are kept (re-rendering rules must not rotate the passwords of running
    services). The directory is created owner-only; ``file_mode`` 0o644 lets containers that
    run as another uid read bind-mounted secrets (the 0700 directory still hides them).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for role in roles:
        path = directory / password_file_name(role)
        if path.exists():
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
            if not text:
                raise ValueError(f"{path}: empty password file (delete it to generate one)")
            out[role] = text
            continue
        out[role] = random_password()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(out[role] + "\n")
        os.chmod(path, file_mode)  # the umask may have narrowed it
    return out


def child_env(role: Role, password_file: Path, *, user_prefix: str = "") -> dict[str, str]:
    """Environment that makes a CLI process connect as ``role`` (config env overrides)."""
    return {
        "EFFICIENTAD__REDIS__USERNAME": username(role, user_prefix),
        "EFFICIENTAD__REDIS__PASSWORD_FILE": str(password_file),
    }
