"""Shared-memory metrics: layout, real forked writers, retirement, rendering."""

from __future__ import annotations

import os
import select

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sniport.metrics import (
    DURATION_BUCKETS,
    FAMILIES,
    Layout,
    SharedMetrics,
    Values,
    WorkerMetrics,
    hello_reason,
    render,
)

CONN = "sniport_connections_total"
OPEN = "sniport_open_connections"
BYTES = "sniport_passthrough_bytes_total"
DURATION = "sniport_http_request_duration_seconds"


def layout(sites: tuple[str, ...] = ("blog", "shop")) -> Layout:
    return Layout(listeners=["0.0.0.0:443", "[::]:443"], passthrough_blocks=["mail", "git"],
                  sites=sites, routes=[(s, r) for s in sites for r in ("/", "/api/")],
                  upstreams=["10.0.0.1:443", "10.0.0.2:443"])


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition back with prometheus_client's own parser."""
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def conn_value(values: Values, block: str, listener: str = "0.0.0.0:443",
               decision: str = "terminate") -> float:
    return values.get((CONN, (listener, decision, block)), [0.0])[0]


# -- layout -----------------------------------------------------------------------------------

def test_layout_cells_unique_stable_and_strict() -> None:
    a, b = layout(), layout()
    assert [(f.name, lb, i) for f, lb, i in a.series] == [(f.name, lb, i) for f, lb, i in b.series]
    used: set[int] = set()
    for family, _labels, base in a.series:
        width = len(family.buckets) + 2 if family.kind == "histogram" else 1
        cells = set(range(base, base + width))
        assert not cells & used
        used |= cells
    assert used == set(range(a.size))
    assert a.cell(CONN, listener="[::]:443", decision="passthrough", block="mail") >= 0
    with pytest.raises(KeyError):
        a.cell(CONN, listener="[::]:443", decision="passthrough", block="www.evil.example")
    with pytest.raises(KeyError):
        a.cell(CONN, listener="[::]:443", decision="passthrough")  # a label missing
    with pytest.raises(KeyError):
        a.cell(DURATION, site="blog", route="/nope/")
    with pytest.raises(KeyError):
        a.cell("sniport_config_reloads_total", result="ok")  # kept by the master
    # Another config is another layout (each generation reads its slots with its own).
    assert layout(("blog", "shop", "wiki")).size > a.size


def test_hello_reasons() -> None:
    assert hello_reason("ClientHello larger than 16384 bytes") == "too_large"
    assert hello_reason("record version 3.9 is not TLS") == "bad_record"
    assert hello_reason("empty host_name") == "bad_server_name"
    assert hello_reason("extensions truncated") == "truncated"
    assert hello_reason("something new") == "other"


# -- forked writers ---------------------------------------------------------------------------

def fork_writer(shared: SharedMetrics, slot: int, lay: Layout, block: str, n: int,
                open_now: int = 0) -> tuple[int, int, int]:
    """A real worker process: counts ``n`` connections to ``block``, then waits for a byte
    on its pipe and exits. Returns (pid, go pipe write end, done pipe read end)."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            m = shared.worker_metrics(slot, lay)
            cell = m.cell(CONN, listener="0.0.0.0:443", decision="terminate", block=block)
            bytes_up = m.cell(BYTES, block="mail", direction="up")
            hist = m.cell(DURATION, site="blog", route="/")
            view = m.view
            for k in range(n):
                view[cell] += 1
                m.add(bytes_up, 10)
                if k % 100 == 0:
                    m.observe(hist, 0.02)
            m.set(m.cell(OPEN, listener="0.0.0.0:443"), open_now)
            os.write(done_w, b"d")
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r


def wait_done(done_r: int) -> None:
    ready, _, _ = select.select([done_r], [], [], 10)
    assert ready and os.read(done_r, 1) == b"d"
    os.close(done_r)


def finish(pid: int, go_w: int) -> None:
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_forked_workers_sum_exactly_and_never_go_down() -> None:
    lay = layout()
    shared = SharedMetrics(8, lay.size + 100)
    n = 30000
    workers = []
    for block in ("blog", "blog", "shop", "blog"):
        slot = shared.acquire_slot()
        assert slot is not None
        workers.append((slot, block, *fork_writer(shared, slot, lay, block, n, open_now=2)))
    active = [(slot, lay) for slot, *_ in workers]
    # While they write concurrently, every scrape is >= the previous one.
    last = 0.0
    for _ in range(200):
        now = conn_value(shared.collect(active), "blog")
        assert now >= last
        last = now
    for *_, done_r in workers:
        wait_done(done_r)
    values = shared.collect(active)
    assert conn_value(values, "blog") == 3 * n
    assert conn_value(values, "shop") == n
    assert values[(BYTES, ("mail", "up"))] == [4 * n * 10]
    assert values[(OPEN, ("0.0.0.0:443",))] == [8]
    hist = values[(DURATION, ("blog", "/"))]
    assert sum(hist[:-1]) == 4 * (n // 100)
    assert hist[DURATION_BUCKETS.index(0.025)] == 4 * (n // 100)
    assert hist[-1] == pytest.approx(4 * (n // 100) * 0.02)

    # Retire the first worker once it has exited: counters keep it, gauges drop it.
    slot0, _b, pid0, go0, _d = workers[0]
    finish(pid0, go0)
    shared.retire_slot(slot0, lay)
    active = [(slot, lay) for slot, *_ in workers[1:]]
    after = shared.collect(active)
    assert conn_value(after, "blog") == 3 * n
    assert after[(BYTES, ("mail", "up"))] == [4 * n * 10]
    assert after[(OPEN, ("0.0.0.0:443",))] == [6]
    assert sum(after[(DURATION, ("blog", "/"))][:-1]) == 4 * (n // 100)

    # The slot is reused from zero by a worker of a new generation with another layout.
    new_lay = layout(("blog", "wiki"))
    again = shared.acquire_slot()
    assert again == slot0
    assert not any(shared.slot_view(again).tolist())
    pid, go, done = fork_writer(shared, again, new_lay, "wiki", 500)
    wait_done(done)
    active.append((again, new_lay))
    values = shared.collect(active)
    assert conn_value(values, "blog") == 3 * n
    assert conn_value(values, "wiki") == 500
    assert conn_value(values, "shop") == n  # "shop" is only in old slots: still counted
    for slot, _b, p, g, _d in workers[1:]:
        finish(p, g)
        shared.retire_slot(slot, lay)
    finish(pid, go)
    shared.retire_slot(again, new_lay)
    final = shared.collect([])
    assert conn_value(final, "blog") == 3 * n
    assert conn_value(final, "shop") == n
    assert conn_value(final, "wiki") == 500
    assert (OPEN, ("0.0.0.0:443",)) not in final
    shared.close()


def test_slots_run_out_and_retire_checks() -> None:
    lay = layout()
    shared = SharedMetrics(2, lay.size)
    assert shared.fits(lay) and not shared.fits(layout(("a", "b", "c", "d")))
    a, b = shared.acquire_slot(), shared.acquire_slot()
    assert (a, b) == (0, 1)
    assert shared.acquire_slot() is None
    shared.retire_slot(a, lay)
    with pytest.raises(ValueError):
        shared.retire_slot(a, lay)
    assert shared.acquire_slot() == a
    shared.close()


def test_disabled_handle_has_the_same_api_and_writes_nothing_shared() -> None:
    lay = layout()
    shared = SharedMetrics(1, lay.size)
    slot = shared.acquire_slot()
    assert slot is not None
    off = WorkerMetrics.disabled(lay)
    assert not off.enabled
    cell = off.cell(CONN, listener="0.0.0.0:443", decision="reject", block="")
    off.view[cell] += 1
    off.add(cell, 5)
    off.observe(off.cell(DURATION, site="shop", route="/api/"), 99.0)
    assert off.view[cell] == 6
    assert not any(shared.slot_view(slot).tolist())
    with pytest.raises(ValueError):
        WorkerMetrics(memoryview(bytearray(8)).cast("q"), lay)  # too small for the layout
    shared.close()


# -- rendering --------------------------------------------------------------------------------

def test_render_parses_back_with_escaping_and_cumulative_buckets() -> None:
    odd = 'we"ird\\site\nname'
    lay = Layout(listeners=["l1"], sites=[odd], routes=[(odd, "/")])
    shared = SharedMetrics(2, lay.size)
    slot = shared.acquire_slot()
    assert slot is not None
    m = shared.worker_metrics(slot, lay)
    m.add(m.cell(CONN, listener="l1", decision="terminate", block=odd), 7)
    hist = m.cell(DURATION, site=odd, route="/")
    for seconds in (0.001, 0.005, 0.006, 0.3, 11.0, 0.3):
        m.observe(hist, seconds)
    master = {("sniport_config_reloads_total", ("ok",)): 2.0,
              ("sniport_certificate_not_after_seconds", (odd,)): 1767225600.0}
    text = render(shared.collect([(slot, lay)], master))
    assert text.endswith(b"\n")
    assert b'block="we\\"ird\\\\site\\nname"' in text
    for fam in FAMILIES:
        assert f"# TYPE {fam.name} {fam.kind}\n".encode() in text
    got = samples(text)
    assert got[(CONN, (("block", odd), ("decision", "terminate"), ("listener", "l1")))] == 7
    assert got[("sniport_config_reloads_total", (("result", "ok"),))] == 2
    assert got[("sniport_certificate_not_after_seconds", (("site", odd),))] == 1767225600
    assert got[(OPEN, (("listener", "l1"),))] == 0  # a gauge shows even at zero
    # Zero labelled counters are left out.
    assert not any(name == "sniport_tls_handshakes_total" for name, _ in got)

    def bucket(le: str) -> float:
        return got[(DURATION + "_bucket", (("le", le), ("route", "/"), ("site", odd)))]

    les = [repr(b) for b in DURATION_BUCKETS] + ["+Inf"]
    counts = [bucket(le) for le in les]
    assert counts == sorted(counts)  # cumulative
    assert bucket("0.005") == 2 and bucket("0.01") == 3 and bucket("0.5") == 5
    assert bucket("10.0") == 5 and bucket("+Inf") == 6
    assert got[(DURATION + "_count", (("route", "/"), ("site", odd)))] == 6
    assert got[(DURATION + "_sum", (("route", "/"), ("site", odd)))] == pytest.approx(11.612)
    shared.close()


def test_render_numbers_and_help_escaping() -> None:
    from sniport.metrics import Family

    fam = Family("x_total", "counter", "a \\ and\nnewline", ("k",))
    text = render({("x_total", ("a",)): [1.5], ("x_total", ("b",)): [float("inf")],
                   ("other", ()): [1.0]}, [fam]).decode()
    assert text == ('# HELP x_total a \\\\ and\\nnewline\n# TYPE x_total counter\n'
                    'x_total{k="a"} 1.5\nx_total{k="b"} +Inf\n')
