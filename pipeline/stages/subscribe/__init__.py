"""Following alarm events: ``follow_alarms()`` for integrators, ``efficientad alarms`` for people.

``follow`` holds the iterator and the output helpers (one line per event, files per event);
``commands`` is the ``efficientad alarms`` command.
"""

from pipeline.stages.subscribe.follow import (
    AlarmRecord,
    follow_alarms,
    format_event,
    print_alarms,
    safe_file_name,
    save_event_files,
)

__all__ = [
    "AlarmRecord",
    "follow_alarms",
    "format_event",
    "print_alarms",
    "safe_file_name",
    "save_event_files",
]
