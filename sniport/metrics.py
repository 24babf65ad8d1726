"""Metrics: counters in shared memory, summed by the master, rendered as Prometheus text.

Job: count what the workers do without costing them anything measurable, and let the master
serve the totals of every worker, past and present, at ``[server] metrics_listen``.

Rules:
- No prometheus_client multiprocess mode: it leaves a file per process forever, and every
  reload replaces the workers. Instead the master maps one anonymous shared mapping
  (``SharedMetrics``) before it forks; each worker writes only its own slot, one signed
  64-bit cell per series (one writer per cell, so no locks).
- The hot path is one indexed add on a memoryview (``view[cell] += n``); cell indices are
  computed at setup with ``Layout.cell`` (which raises ``KeyError`` for a label value the
  config does not name), never per event.
- Labels come only from config names (listeners, blocks, sites, routes, upstream labels)
  and fixed enums below, never from the network (a raw SNI would make cardinality unbounded).
- Counters never go down: when a worker has exited, the master folds its slot's counters
  (not its gauges: an exited worker holds nothing open) into a private accumulator keyed by
  (family, labels) and only then zeroes the slot for reuse. Only the master retires slots,
  and it collects in the same thread, so a scrape never sees a slot half folded.
- A histogram series is its bucket cells (the last one catches what is above every bound)
  and a sum in integer microseconds; the count is the sum of the buckets, so ``+Inf`` and
  ``_count`` always agree even when a scrape lands between two cell writes.
- Rendering is the text exposition format 0.0.4, written here (see ``render``).
"""

from __future__ import annotations

import contextlib
import math
import mmap
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["counter", "gauge", "histogram"]
Key = tuple[str, tuple[str, ...]]  # (family name, label values in the family's label order)
# A series' numbers: one for a counter or gauge; for a histogram, its bucket counts (not
# cumulative; the last is the count above every bound) followed by the sum in seconds.
Values = dict[Key, list[float]]

CELL_FORMAT: Final = "q"  # signed: a gauge decremented by mistake goes negative, it never raises
CELL_BYTES = 8

# Fixed enums ---------------------------------------------------------------------------------

# What the worker did with a connection after reading its first bytes.
DECISIONS = ("passthrough", "terminate", "acme_challenge", "http", "reject", "non_tls")
DIRECTIONS = ("up", "down")  # up: client -> upstream; down: upstream -> client
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
PROTOCOLS = ("HTTP/1.1", "HTTP/2.0")
HELLO_REASONS = ("timeout", "closed", "too_large", "bad_record", "truncated",
                 "bad_server_name", "other")
DENIAL_KINDS = ("acl", "per_ip_limit", "per_ip_rate", "max_connections")
RELOAD_RESULTS = ("ok", "failed")
NO_BLOCK = ""  # the block label of a connection that reached no block (reject, non_tls...)

# Request durations in seconds, Prometheus' default buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)
# A histogram series: one cell per bucket, one for what is above every bound, then the sum.
SUM_OFFSET = len(DURATION_BUCKETS) + 1


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    # Where each label's values come from (see Layout); "site_route" covers two labels.
    domains: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    master: bool = False  # set by the master itself, not kept in worker slots


FAMILIES: tuple[Family, ...] = (
    Family("sniport_connections_total", "counter",
           "Connections accepted, by listener, what was decided and the block that took them.",
           ("listener", "decision", "block"), ("listener", "decision", "block")),
    Family("sniport_open_connections", "gauge", "Connections open now, by listener.",
           ("listener",), ("listener",)),
    Family("sniport_clienthello_failures_total", "counter",
           "Connections closed because their TLS ClientHello could not be read, by reason.",
           ("reason",), ("hello_reason",)),
    Family("sniport_passthrough_bytes_total", "counter",
           "Bytes relayed by passthrough blocks, by block and direction (up: to the upstream).",
           ("block", "direction"), ("passthrough_block", "direction")),
    Family("sniport_upstream_connect_errors_total", "counter",
           "Failed connection attempts to an upstream, by upstream.",
           ("upstream",), ("upstream",)),
    Family("sniport_upstream_healthy_workers", "gauge",
           "Workers that consider the upstream healthy now, by upstream.",
           ("upstream",), ("upstream",)),
    Family("sniport_denied_connections_total", "counter",
           "Connections refused by an allow/deny list or a connection limit, by block and kind.",
           ("block", "kind"), ("block", "denial_kind")),
    Family("sniport_tls_handshakes_total", "counter",
           "TLS handshakes completed by terminated sites, by site.", ("site",), ("site",)),
    Family("sniport_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed or timed out, by site.", ("site",), ("site",)),
    Family("sniport_http_requests_total", "counter",
           "HTTP requests answered, by site, route, status class and protocol.",
           ("site", "route", "status", "protocol"), ("site_route", "status", "protocol")),
    Family("sniport_http_request_duration_seconds", "histogram",
           "Time from a request's head to the end of its response, by site and route.",
           ("site", "route"), ("site_route",), DURATION_BUCKETS),
    Family("sniport_certificate_not_after_seconds", "gauge",
           "Expiry of the certificate a site serves, in seconds since the epoch.",
           ("site",), master=True),
    Family("sniport_config_reloads_total", "counter", "Config reloads, by result.",
           ("result",), master=True),
)
FAMILY_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def hello_reason(message: str) -> str:
    """Map a ``MalformedHello`` reason (free text) onto ``HELLO_REASONS``."""
    if "larger than" in message or "exceeds" in message:
        return "too_large"
    if message.startswith(("record", "first handshake", "empty handshake")):
        return "bad_record"
    if "host_name" in message or "server_name" in message:
        return "bad_server_name"
    if "truncated" in message or "overruns" in message or "mismatch" in message:
        return "truncated"
    return "other"


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


class Layout:
    """Every series a generation's config allows, each mapped to its first cell in a slot.

    Indices depend only on the values given and their order, so the same config always
    gives the same layout. Each generation has its own; a slot is read with the layout of
    the generation whose worker wrote it.
    """

    def __init__(self, *, listeners: Iterable[str] = (), passthrough_blocks: Iterable[str] = (),
                 sites: Iterable[str] = (), routes: Iterable[tuple[str, str]] = (),
                 upstreams: Iterable[str] = ()) -> None:
        passthrough = _unique(passthrough_blocks)
        site_names = _unique(sites)
        self.domains: dict[str, tuple[tuple[str, ...], ...]] = {
            "listener": tuple((v,) for v in _unique(listeners)),
            "decision": tuple((v,) for v in DECISIONS),
            "block": tuple((v,) for v in _unique((NO_BLOCK, *passthrough, *site_names))),
            "passthrough_block": tuple((v,) for v in passthrough),
            "site": tuple((v,) for v in site_names),
            "site_route": tuple(dict.fromkeys((s, r) for s, r in routes)),
            "upstream": tuple((v,) for v in _unique(upstreams)),
            "direction": tuple((v,) for v in DIRECTIONS),
            "status": tuple((v,) for v in STATUS_CLASSES),
            "protocol": tuple((v,) for v in PROTOCOLS),
            "hello_reason": tuple((v,) for v in HELLO_REASONS),
            "denial_kind": tuple((v,) for v in DENIAL_KINDS),
        }
        # (family, label values, first cell); in family order, then label order.
        self.series: list[tuple[Family, tuple[str, ...], int]] = []
        self._index: dict[Key, int] = {}
        size = 0
        for family in FAMILIES:
            if family.master:
                continue
            width = len(family.buckets) + 2 if family.kind == "histogram" else 1
            for labels in self._combinations(family.domains):
                self.series.append((family, labels, size))
                self._index[(family.name, labels)] = size
                size += width
        self.size = size  # cells a slot needs for this layout

    def _combinations(self, domains: Sequence[str]) -> list[tuple[str, ...]]:
        combos: list[tuple[str, ...]] = [()]
        for domain in domains:
            combos = [c + v for c in combos for v in self.domains[domain]]
        return combos

    def cell(self, family: str, **labels: str) -> int:
        """The (first) cell of a series. KeyError for an unknown family, a missing or extra
        label, or a value the config does not name: call this at setup, not per event."""
        fam = FAMILY_BY_NAME[family]
        if set(labels) != set(fam.labels):
            raise KeyError(f"{family} has labels {fam.labels}, not {tuple(labels)}")
        return self._index[(family, tuple(labels[name] for name in fam.labels))]


class RouteCells:
    """The cells one route's requests are counted in, found once at setup: the request
    counters by status class and protocol, and the duration histogram's first cell."""

    __slots__ = ("duration", "requests")

    def __init__(self, layout: Layout, site: str, route: str) -> None:
        self.requests = tuple(
            layout.cell("sniport_http_requests_total", site=site, route=route, status=sc,
                        protocol=proto)
            for sc in STATUS_CLASSES for proto in PROTOCOLS)
        self.duration = layout.cell("sniport_http_request_duration_seconds", site=site,
                                    route=route)

    def request_cell(self, status: int, http2: bool) -> int:
        """The counter of a response's status class (an out-of-range status is clamped)."""
        klass = min(max(status // 100, 1), 5) - 1
        return self.requests[klass * 2 + http2]


class WorkerMetrics:
    """A worker's handle on its slot. Hot path: ``m.view[cell] += n`` or ``m.add(cell, n)``.

    ``disabled(layout)`` has the same API over a private buffer, so the code path with
    metrics off is the same and nobody reads it.
    """

    __slots__ = ("view", "layout", "enabled", "_bounds")

    def __init__(self, view: memoryview, layout: Layout, enabled: bool = True) -> None:
        if view.format != CELL_FORMAT or len(view) < layout.size:
            raise ValueError(f"slot of {len(view)} cells for a layout of {layout.size}")
        self.view = view
        self.layout = layout
        self.enabled = enabled
        self._bounds = DURATION_BUCKETS

    @classmethod
    def disabled(cls, layout: Layout) -> WorkerMetrics:
        buf = memoryview(bytearray(max(layout.size, 1) * CELL_BYTES)).cast(CELL_FORMAT)
        return cls(buf, layout, enabled=False)

    def cell(self, family: str, **labels: str) -> int:
        return self.layout.cell(family, **labels)

    def add(self, cell: int, n: int = 1) -> None:
        self.view[cell] += n

    def set(self, cell: int, value: int) -> None:
        """Gauges only (a worker's own share, e.g. 1/0 for an upstream it finds healthy)."""
        self.view[cell] = value

    def observe(self, base: int, seconds: float) -> None:
        """One duration into the histogram series whose first cell is ``base``."""
        view = self.view
        # le is "less than or equal": the first bound >= seconds (bisect_left).
        view[base + bisect_left(self._bounds, seconds)] += 1
        view[base + SUM_OFFSET] += int(seconds * 1_000_000)


class SharedMetrics:
    """The master's anonymous shared mapping: ``slots`` slots of ``cells_per_slot`` cells.

    Create it before forking any worker (a mapping made later is not shared with workers
    forked earlier); size it for the largest layout a reload may bring, since a slot cannot
    grow (untouched pages of an anonymous mapping cost no memory).
    """

    def __init__(self, slots: int, cells_per_slot: int) -> None:
        if slots < 1 or cells_per_slot < 1:
            raise ValueError("slots and cells_per_slot must be positive")
        self.slots = slots
        self.cells_per_slot = cells_per_slot
        self._map = mmap.mmap(-1, slots * cells_per_slot * CELL_BYTES,
                              flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._all = memoryview(self._map).cast(CELL_FORMAT)
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._retired: dict[Key, list[float]] = {}

    def fits(self, layout: Layout) -> bool:
        return layout.size <= self.cells_per_slot

    def slot_view(self, i: int) -> memoryview:
        start = i * self.cells_per_slot
        return self._all[start:start + self.cells_per_slot]

    def worker_metrics(self, i: int, layout: Layout) -> WorkerMetrics:
        return WorkerMetrics(self.slot_view(i), layout)

    def acquire_slot(self) -> int | None:
        """A zeroed slot for a worker about to be forked; None when all are in use (that
        worker then runs with ``WorkerMetrics.disabled``)."""
        return self._free.pop() if self._free else None

    def retire_slot(self, i: int, layout: Layout) -> None:
        """Fold a slot's counters into the totals, then zero it for reuse. Master only, and
        only once its worker has exited (was reaped): a write after the fold would be lost."""
        if i in self._free:
            raise ValueError(f"slot {i} is not in use")
        cells = self.slot_view(i).tolist()
        for family, labels, base in layout.series:
            if family.kind == "gauge":
                continue
            numbers = _series_numbers(family, cells, base)
            if not any(numbers):
                continue
            acc = self._retired.setdefault((family.name, labels), [0.0] * len(numbers))
            for k, v in enumerate(numbers):
                acc[k] += v
        size = self.cells_per_slot * CELL_BYTES
        self._map[i * size:(i + 1) * size] = bytes(size)
        self._free.append(i)

    def collect(self, active: Sequence[tuple[int, Layout]],
                master_values: Mapping[Key, float] | None = None) -> Values:
        """The totals: the active slots (each read with its own generation's layout), the
        retired totals, and the values the master keeps itself (reloads, certificates).

        A labelled counter or histogram series shows once it is non-zero (as a labelled
        child of prometheus_client appears once used); gauges always show.
        """
        totals: Values = {key: list(numbers) for key, numbers in self._retired.items()}
        shown: set[Key] = set()
        for i, layout in active:
            cells = self.slot_view(i)[:layout.size].tolist()  # only what it uses
            for family, labels, base in layout.series:
                numbers = _series_numbers(family, cells, base)
                key = (family.name, labels)
                acc = totals.get(key)
                if acc is None:
                    totals[key] = numbers
                else:
                    for k, v in enumerate(numbers):
                        acc[k] += v
                if family.kind == "gauge" or not family.labels:
                    shown.add(key)
        for key, value in (master_values or {}).items():
            totals[key] = [float(value)]
            shown.add(key)
        return {key: numbers for key, numbers in totals.items()
                if key in shown or any(numbers)}

    def close(self) -> None:
        """Unmap, unless slot views handed out are still alive (then the mapping goes with
        the last of them)."""
        with contextlib.suppress(BufferError):
            self._all.release()
            self._map.close()


def _series_numbers(family: Family, cells: list[int], base: int) -> list[float]:
    if family.kind != "histogram":
        return [float(cells[base])]
    n = len(family.buckets) + 1
    return [float(c) for c in cells[base:base + n]] + [cells[base + n] / 1_000_000]


# Rendering -----------------------------------------------------------------------------------
# Written here rather than with prometheus_client: its custom collectors could render these
# values, but that is a runtime dependency and a registry for ~50 lines of a stable format
# (https://prometheus.io/docs/instrumenting/exposition_formats/, text format 0.0.4).

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def render(values: Mapping[Key, Sequence[float]],
           families: Sequence[Family] = FAMILIES) -> bytes:
    """Prometheus text exposition format 0.0.4, families in the order given, series sorted
    by label values. Values of a family not listed are ignored."""
    by_family: dict[str, list[tuple[tuple[str, ...], Sequence[float]]]] = {}
    for (name, labels), numbers in values.items():
        by_family.setdefault(name, []).append((labels, numbers))
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, numbers in sorted(by_family.get(fam.name, ()), key=lambda s: s[0]):
            if fam.kind != "histogram":
                out.append(f"{fam.name}{_labels(fam.labels, labels)} {_number(numbers[0])}")
                continue
            cumulative = 0.0
            bounds = [*(repr(float(b)) for b in fam.buckets), "+Inf"]
            for bound, count in zip(bounds, numbers[:-1], strict=True):
                cumulative += count
                le = _labels((*fam.labels, "le"), (*labels, bound))
                out.append(f"{fam.name}_bucket{le} {_number(cumulative)}")
            plain = _labels(fam.labels, labels)
            out.append(f"{fam.name}_sum{plain} {_number(numbers[-1])}")
            out.append(f"{fam.name}_count{plain} {_number(cumulative)}")
    out.append("")
    return "\n".join(out).encode()


# The process's own handle, for the rare events counted far from the worker (upstream
# connect errors, health changes): a worker sets it at start; elsewhere nothing is counted.
_current: WorkerMetrics | None = None


def use(m: WorkerMetrics | None) -> None:
    global _current
    _current = m


def _count(family: str, **labels: str) -> int | None:
    m = _current
    if m is None:
        return None
    try:
        return m.layout.cell(family, **labels)
    except KeyError:  # a label the config does not name: not counted
        return None


def upstream_error(label: str) -> None:
    """A connection attempt to the upstream ``label`` failed (refused, timeout...)."""
    cell = _count("sniport_upstream_connect_errors_total", upstream=label)
    if cell is not None and _current is not None:
        _current.view[cell] += 1


def upstream_health(label: str, healthy: bool) -> None:
    """This worker's view of the upstream ``label`` (active health checks)."""
    cell = _count("sniport_upstream_healthy_workers", upstream=label)
    if cell is not None and _current is not None:
        _current.view[cell] = int(healthy)
