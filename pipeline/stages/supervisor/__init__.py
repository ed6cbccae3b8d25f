"""``efficientad run``: the whole line on one box as supervised child processes.

``children`` starts, watches, restarts and stops child processes; ``service`` runs the line with
them (``run_line``: the Redis it needs, per-role users, drain detection); ``commands`` holds
``run`` plus the two Redis helpers that go with it, ``redis`` and ``redis-acl``.
"""

from pipeline.stages.supervisor.children import ChildSpec, Supervisor, child_command
from pipeline.stages.supervisor.service import (
    RoleCredentials,
    line_specs,
    run_line,
    stream_drained,
)

__all__ = [
    "ChildSpec",
    "RoleCredentials",
    "Supervisor",
    "child_command",
    "line_specs",
    "run_line",
    "stream_drained",
]
