"""What Redis says after a chaos run: the checks of issue #8 and one line of figures.

Per camera, from the streams (never from process logs):

(a) every entry of ``frames:{cam}`` has exactly one outcome: one result in ``results:{cam}``
    (``frame_id``) or one dead letter in ``deadletter:{cam}`` (``source_id``), not both, not none;
    and no two frame entries share a ``seq``;
(b) no ``seq`` appears twice among the results;
(c) XPENDING of the workers' group on frames and of the publisher's group on results is 0;
(d) no crash loop: every exit of a process was one the harness caused (SIGKILL, SIGTERM -> 0) or a
    finished replay; crashes and restarts are counted;
(e) the alarm events in ``alarms:{cam}`` equal an in-order replay of all results (sorted by frame
    entry id, duplicates by seq removed, results the publisher dead-lettered left out) through
    ``pipeline.stages.alarms.AlarmStateMachine``, and no alarm id is started twice;
(f) capture's own frames (not those the test XADDed) have strictly increasing ``seq``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from pipeline.core.wire import AlarmEvent, ResultMessage, WireError
from pipeline.stages.alarms import AlarmStateMachine

if TYPE_CHECKING:
    from tests.chaos.harness import ChaosLine

#: fields on which a published event must equal the replayed one
EVENT_FIELDS = (
    "type",
    "alarm_id",
    "frame_id",
    "seq",
    "peak_frame_id",
    "frame_count",
    "anomalous_count",
    "frame_ids",
)
EXAMPLES = 6  # offending entries named per failure


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _int(value: Any) -> int | None:
    try:
        return int(_text(value))
    except (TypeError, ValueError):
        return None


@dataclass
class Verdict:
    scenario: str
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # log tails etc. for the assertion message

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        f = self.figures
        dead = ",".join(f"{k}:{v}" for k, v in sorted(f.get("dead_letters", {}).items())) or "-"
        faults = "; ".join(_collapse(f.get("faults", []))) or "-"
        text = (
            f"{self.scenario}: frames={f.get('frames', 0)} (injected {f.get('injected', 0)}) "
            f"results={f.get('results', 0)} dead=[{dead}] dup={f.get('duplicates', 0)} "
            f"late={f.get('late_results', 'n/a')} gaps={f.get('gaps_given_up', 'n/a')} "
            f"episodes={f.get('episodes', 0)}/replay {f.get('replay_episodes', 0)} "
            f"events={f.get('events', 0)} max_delay={f.get('max_event_delay_ms', 0) / 1000:.1f}s "
            f"faults=[{faults}] restarts={f.get('restarts', 0)} "
            f"crashes={f.get('crashes', 0)} wall={f.get('wall_s', 0):.1f}s "
            f"verdict={'PASS' if self.ok else 'FAIL'}"
        )
        if self.failures:
            text += f" ({len(self.failures)} failed: {self.failures[0]})"
        return text

    def record(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "verdict": "PASS" if self.ok else "FAIL",
            "failures": self.failures,
            **self.figures,
        }

    def message(self) -> str:
        parts = [self.line(), "", "failures:"]
        parts += [f"  - {f}" for f in self.failures]
        if self.details:
            parts += ["", *self.details]
        return "\n".join(parts)


def _collapse(faults: list[str]) -> list[str]:
    """Runs of "inject <kind> ... @t" become one "XADD n frames (kinds) @t" for the one-liner."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            kinds = Counter(r.split()[1] for r in run)
            text = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())
            out.append(f"XADD {len(run)} frames ({text}) {run[0].rsplit(' ', 1)[-1]}")
            run.clear()

    for fault in faults:
        if fault.startswith("inject "):
            run.append(fault)
        else:
            flush()
            out.append(fault)
    flush()
    return out


@dataclass
class _Cam:
    cam: str
    frames: list[tuple[str, dict[bytes, bytes]]]
    results: list[tuple[str, dict[bytes, bytes]]]
    dead: list[tuple[str, dict[bytes, bytes]]]
    alarms: list[tuple[str, dict[bytes, bytes]]]
    frames_pending: dict[str, Any]
    results_pending: dict[str, Any]
    state: dict[bytes, bytes]


def _pending(c: redis.Redis, key: str, group: str) -> dict[str, Any]:
    try:
        info = c.xpending(key, group)
    except redis.ResponseError:
        return {"pending": 0, "consumers": []}
    return {
        "pending": int(info["pending"]),
        "consumers": {_text(r["name"]): int(r["pending"]) for r in info.get("consumers") or []},
    }


def collect(line: ChaosLine) -> tuple[dict[str, _Cam], list[dict[bytes, bytes]]]:
    from tests.chaos.harness import xrange_all

    c, keys, config = line.client, line.keys, line.config
    cams = {}
    for cam in line.camera_sources:
        cams[cam] = _Cam(
            cam=cam,
            frames=[(_text(i), f) for i, f in xrange_all(c, keys.frames(cam))],
            results=[(_text(i), f) for i, f in xrange_all(c, keys.results(cam))],
            dead=[(_text(i), f) for i, f in xrange_all(c, keys.deadletter(cam))],
            alarms=[(_text(i), f) for i, f in xrange_all(c, keys.camera_alarms(cam))],
            frames_pending=_pending(c, keys.frames(cam), config.worker.group),
            results_pending=_pending(c, keys.results(cam), config.publisher.group),
            state=c.hgetall(keys.publisher_state(cam)),
        )
    status = [f for _, f in xrange_all(c, keys.status())]
    return cams, status


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > EXAMPLES else "")


def verify(line: ChaosLine, *, drained: bool, wall_s: float) -> Verdict:
    verdict = Verdict(line.scenario)
    fail = verdict.failures.append
    fail_all = verdict.failures.extend
    fail_all(line.report.failures)
    if not drained:
        fail("the line did not drain: see the outcome checks for what was left")
    try:
        cams, status = collect(line)
    except redis.RedisError as exc:
        fail(f"could not read the streams from Redis: {exc}")
        verdict.figures = {"faults": line.report.faults, "wall_s": wall_s}
        return verdict
    injected = {i.entry_id for i in line.injected}
    totals: Counter[str] = Counter()
    dead_reasons: Counter[str] = Counter()
    for data in cams.values():
        _check_camera(line, data, injected, verdict, totals, dead_reasons)
    _check_processes(line, verdict)
    status_counts = Counter(_text(s.get(b"event", b"")) for s in status)
    restarts = sum(p.starts - 1 for p in line.procs.values() if p.role != "capture")
    verdict.figures = {
        "frames": totals["frames"],
        "injected": len(line.injected),
        "results": totals["results"],
        "dead_letters": dict(dead_reasons),
        "duplicates": totals["duplicates"],
        "late_results": status_counts.get("publisher.late_result", 0),
        "gaps_given_up": status_counts.get("publisher.gap_given_up", 0),
        "publisher_notices": {k: v for k, v in status_counts.items() if k.startswith("publisher.")},
        "episodes": totals["episodes"],
        "replay_episodes": totals["replay_episodes"],
        "events": totals["events"],
        "max_event_delay_ms": totals["max_event_delay_ms"],
        "faults": line.report.faults,
        "restarts": restarts,
        "auto_restarts": sum(p.auto_restarts for p in line.procs.values()),
        "crashes": sum(1 for e in line.exits() if not e.intended),
        "wall_s": round(wall_s, 1),
        "notes": line.report.notes,
    }
    if verdict.failures:
        verdict.details.append(f"line files: {line.describe()}")
        for proc in line.procs.values():
            verdict.details.append(f"--- last lines of {proc.log_path.name}:\n{proc.log_tail(15)}")
    return verdict


def _check_processes(line: ChaosLine, verdict: Verdict) -> None:
    crashes: dict[str, list[str]] = defaultdict(list)
    for record in line.exits():
        if not record.intended:
            crashes[record.name].append(f"{record.note} @{record.at:.1f}s")
    for name, notes in crashes.items():
        loop = " (crash loop)" if len(notes) > 1 else ""
        verdict.failures.append(
            f"(d) {name} exited unexpectedly {len(notes)}x{loop}: {_examples(notes)}"
        )


def _check_camera(
    line: ChaosLine,
    data: _Cam,
    injected: set[str],
    verdict: Verdict,
    totals: Counter[str],
    dead_reasons: Counter[str],
) -> None:
    fail = verdict.failures.append
    cam = data.cam
    frames_key, results_key = line.keys.frames(cam), line.keys.results(cam)
    totals["frames"] += len(data.frames)
    totals["results"] += len(data.results)

    # ---- outcomes per frame entry
    frame_seq: dict[str, int | None] = {i: _int(f.get(b"seq")) for i, f in data.frames}
    results_of: dict[str, list[str]] = defaultdict(list)
    parsed: list[tuple[str, ResultMessage]] = []
    for rid, fields in data.results:
        try:
            result = ResultMessage.from_fields(fields)
        except WireError as exc:
            results_of[_text(fields.get(b"frame_id", b"?"))].append(rid)
            parsed.append((rid, None))  # type: ignore[arg-type]
            verdict.details.append(f"{cam}: result {rid} does not parse: {exc}")
            continue
        results_of[result.frame_id].append(rid)
        parsed.append((rid, result))
    dead_of: dict[str, list[str]] = defaultdict(list)
    publisher_dead: set[str] = set()
    for did, fields in data.dead:
        source_key = _text(fields.get(b"source_key", b""))
        source_id = _text(fields.get(b"source_id", b""))
        reason = _text(fields.get(b"reason", b"?"))
        if source_key == frames_key:
            dead_of[source_id].append(reason)
            dead_reasons[reason] += 1
        elif source_key == results_key:
            publisher_dead.add(source_id)
            dead_reasons[f"publisher:{reason}"] += 1
        else:
            fail(f"(a) {cam}: dead letter {did} names an unknown source {source_key!r}")
    missing, many, both = [], [], []
    for fid, seq in frame_seq.items():
        n_res, n_dead = len(results_of.get(fid, [])), len(dead_of.get(fid, []))
        label = f"{fid} (seq {seq})"
        if n_res + n_dead == 0:
            missing.append(label)
        elif n_res and n_dead:
            both.append(f"{label}: {n_res} result(s) + dead letter {dead_of[fid]}")
        elif n_res > 1 or n_dead > 1:
            many.append(f"{label}: {n_res} results, {n_dead} dead letters")
            totals["duplicates"] += n_res + n_dead - 1
    if missing:
        fail(
            f"(a) {cam}: {len(missing)} frame(s) without result or dead letter: "
            f"{_examples(missing)}"
        )
    if both:
        fail(f"(a) {cam}: {len(both)} frame(s) with a result AND a dead letter: {_examples(both)}")
    if many:
        fail(f"(a) {cam}: {len(many)} frame(s) with more than one outcome: {_examples(many)}")
    orphans = sorted(set(results_of) - set(frame_seq))
    if orphans:
        fail(f"(a) {cam}: results for frame ids not in {frames_key}: {_examples(orphans)}")
    orphan_dead = sorted(set(dead_of) - set(frame_seq))
    if orphan_dead:
        fail(f"(a) {cam}: dead letters for frame ids not in {frames_key}: {_examples(orphan_dead)}")
    by_seq: dict[int, list[str]] = defaultdict(list)
    for fid, seq in frame_seq.items():
        if seq is not None:
            by_seq[seq].append(fid)
    dup_frames = [f"seq {s}: {ids}" for s, ids in sorted(by_seq.items()) if len(ids) > 1]
    if dup_frames:
        fail(
            f"(a) {cam}: {len(dup_frames)} seq(s) in more than one frame entry: "
            f"{_examples(dup_frames)}"
        )

    # ---- (b) no seq twice among results
    result_seqs: dict[int, list[str]] = defaultdict(list)
    for _rid, result in parsed:
        if result is not None:
            result_seqs[result.seq].append(result.frame_id)
    dup_results = [
        f"seq {s} -> frames {fids}" for s, fids in sorted(result_seqs.items()) if len(fids) > 1
    ]
    if dup_results:
        totals["duplicates"] += sum(len(f) - 1 for f in result_seqs.values() if len(f) > 1)
        fail(
            f"(b) {cam}: {len(dup_results)} seq(s) with more than one result: "
            f"{_examples(dup_results)}"
        )

    # ---- (c) nothing pending
    for what, pending, group in (
        (frames_key, data.frames_pending, line.config.worker.group),
        (results_key, data.results_pending, line.config.publisher.group),
    ):
        if pending["pending"]:
            fail(
                f"(c) {what}: XPENDING of group {group!r} is {pending['pending']} "
                f"(by consumer: {pending['consumers']})"
            )

    # ---- (e) alarm episodes == in-order replay
    _check_alarms(line, data, parsed, publisher_dead, verdict, totals)

    # ---- (f) capture's own seqs strictly increasing
    previous: tuple[str, int] | None = None
    for fid, seq in frame_seq.items():
        if fid in injected:
            continue
        if seq is None:
            fail(f"(f) {cam}: capture wrote frame {fid} without a seq")
            continue
        if previous is not None and seq <= previous[1]:
            fail(
                f"(f) {cam}: capture seq not increasing: frame {fid} has seq {seq} after frame "
                f"{previous[0]} with seq {previous[1]} (a restarted capture reused numbers?)"
            )
            break
        previous = (fid, seq)


def _check_alarms(
    line: ChaosLine,
    data: _Cam,
    parsed: list[tuple[str, ResultMessage | None]],
    publisher_dead: set[str],
    verdict: Verdict,
    totals: Counter[str],
) -> None:
    fail = verdict.failures.append
    cam = data.cam
    usable = [r for rid, r in parsed if r is not None and rid not in publisher_dead]
    unparsed = [rid for rid, r in parsed if r is None and rid not in publisher_dead]
    if unparsed:
        fail(
            f"(e) {cam}: unreadable results the publisher did not dead-letter: "
            f"{_examples(unparsed)}"
        )
    ordered = []
    for result in usable:
        try:
            ordered.append((_id(result.frame_id), result))
        except ValueError:
            fail(f"(e) {cam}: result with a frame_id that is no stream id: {result.frame_id!r}")
    ordered.sort(key=lambda item: item[0])
    seen: set[int] = set()
    replay_input = []
    for _, result in ordered:
        if result.seq in seen:
            continue
        seen.add(result.seq)
        replay_input.append(result)
    machine = AlarmStateMachine(cam, line.config.publisher.alarm_for(cam))
    replay: list[AlarmEvent] = []
    for result in replay_input:
        try:
            replay.extend(t.event for t in machine.observe(result))
        except Exception as exc:  # the machine itself failing is worth a precise report too
            fail(
                f"(e) {cam}: replay raised on frame {result.frame_id} (seq {result.seq}): "
                f"{type(exc).__name__}: {exc}"
            )
            break
    published: list[AlarmEvent] = []
    for eid, fields in data.alarms:
        try:
            published.append(AlarmEvent.from_fields(fields))
        except WireError as exc:
            fail(f"(e) {cam}: alarm event {eid} does not parse: {exc}")
    totals["events"] += len(published)
    # what ordering costs: the event frame's result written -> its event written (worst case)
    done_ns = {r.frame_id: r.done_ns for _, r in parsed if r is not None}
    for event in published:
        if event.frame_id in done_ns:
            delay_ms = (event.emitted_ns - done_ns[event.frame_id]) // 1_000_000
            totals["max_event_delay_ms"] = max(totals["max_event_delay_ms"], delay_ms)
    totals["episodes"] += sum(1 for e in published if e.type == "alarm.started")
    totals["replay_episodes"] += sum(1 for e in replay if e.type == "alarm.started")
    started = Counter(e.alarm_id for e in published if e.type == "alarm.started")
    twice = [f"{a} x{n}" for a, n in started.items() if n > 1]
    if twice:
        fail(f"(e) {cam}: alarm.started more than once for one alarm id: {_examples(twice)}")
    difference = _first_difference(published, replay)
    if difference:
        fail(
            f"(e) {cam}: alarm events differ from the in-order replay of "
            f"{len(replay_input)} results: {difference}"
        )


def _event_key(event: AlarmEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in EVENT_FIELDS}


def _describe(event: AlarmEvent) -> str:
    return json.dumps(
        {k: (v if k != "frame_ids" else f"[{len(v)} ids]") for k, v in _event_key(event).items()}
    )


def _first_difference(published: list[AlarmEvent], replay: list[AlarmEvent]) -> str | None:
    for index, (got, want) in enumerate(zip(published, replay, strict=False)):
        a, b = _event_key(got), _event_key(want)
        if a != b:
            fields = [
                f"{k}: published {a[k]!r} != replay {b[k]!r}"
                if k != "frame_ids"
                else "frame_ids: published "
                f"{sorted(set(a[k]) - set(b[k]))[:4]} extra / {sorted(set(b[k]) - set(a[k]))[:4]} "
                "missing"
                for k in EVENT_FIELDS
                if a[k] != b[k]
            ]
            return (
                f"first difference at event #{index + 1} (published {len(published)}, replay "
                f"{len(replay)}): {'; '.join(fields)}; published={_describe(got)} "
                f"replay={_describe(want)}"
            )
    if len(published) > len(replay):
        extra = published[len(replay)]
        return (
            f"the publisher emitted {len(published)} events, the replay {len(replay)}; first "
            f"extra published event #{len(replay) + 1}: {_describe(extra)}"
        )
    if len(replay) > len(published):
        missing = replay[len(published)]
        return (
            f"the publisher emitted {len(published)} events, the replay {len(replay)}; first "
            f"missing event #{len(published) + 1}: {_describe(missing)}"
        )
    return None
