"""Hostile input (docs/SECURITY.md): every protocol violation gets its status
and outcome (the table in docs/PROTOCOL.md, read from the document itself),
slow and non-reading peers are cut off by their deadlines, connections over
the caps are refused, and meanwhile a well-behaved agency is served in full,
with exactly the winners its data plants."""
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import SOURCE_DIR, datagen, events, read, run_client
from lottery_proto import (BATCH, CONNECTION_ERROR, FINISHED, HELLO, REPLY_BIT, WINNERS, Conn, batch, batch_body,
                           encode_bet, finished, frame, hello, winners)

GOOD = ("Ana María", "Núñez", "30111222", "1990-05-17", 1234)
WELL_BEHAVED, ABUSER, FINISHER = 1, 2, 3

# Tighter than the defaults so a test can reach each limit with few bytes.
TABLE_SERVER_ARGS = ["--agencies", "3", "--max-frame-bytes", "16384", "--max-batch-bets", "200",
                     "--max-unidentified-bytes", "256"]


# ---------------------------------------------------------------- the table

def violation_table():
    """Rows of docs/PROTOCOL.md "Protocol violations and outcomes":
    {violation: (status name or None, answer, outcome)}."""
    text = read(os.path.join(SOURCE_DIR, "docs", "PROTOCOL.md"))
    section = text.split("## Protocol violations and outcomes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_0-9]+)` \|(.*)\|$", line)
        if not m:
            continue
        cells = [c.strip() for c in m.group(2).split("|")]
        status_cell, answer, outcome = cells[-3], cells[-2], cells[-1]
        status = re.search(r"`([a-z_]+)`", status_cell)
        rows[m.group(1)] = (status.group(1) if status else None, answer, outcome)
    assert len(rows) >= 30, "the violations table was not found in docs/PROTOCOL.md"
    return rows


def raw_bet(number=1, year=1990, month=5, day=17, doc=b"123", first=b"Ana", last=b"Paz", lengths=None):
    lens = lengths or (len(doc), len(first), len(last))
    return struct.pack("<HHBBBBB", number, year, month, day, *lens) + doc + first + last


def batch_raw(seq, agency, bets_bytes, count):
    return frame(BATCH, seq, struct.pack("<HH", agency, count) + bets_bytes)


def bad_bet_batch(seq, agency, bet):
    return frame(BATCH, seq, batch_body(agency, [bet]))


# Each case: setup, the bytes (seq, agency, producer) -> bytes, and what the
# reply answers (a request type, or CONNECTION_ERROR). Setups:
#   fresh      a new connection, no hello
#   identified hello as the abusing agency with a producer of its own
#   finished   hello as an agency that has said finished
#   busy       hello for a producer another live connection holds
#   held       identified, with a winners query held (before the draw)
#   after_draw identified, after the draw
CASES = {
    "short_length": ("fresh", lambda s, a, p: frame(BATCH, s, b"", length=3), CONNECTION_ERROR),
    "oversized_frame": ("identified", lambda s, a, p: frame(BATCH, s, b"", length=16385), CONNECTION_ERROR),
    "bad_version": ("fresh", lambda s, a, p: frame(BATCH, s, b"", version=9), CONNECTION_ERROR),
    "bad_flags": ("fresh", lambda s, a, p: frame(BATCH, s, b"", flags=4), CONNECTION_ERROR),
    "unidentified_bulk": ("fresh", lambda s, a, p: frame(BATCH, s, b"", length=300), CONNECTION_ERROR),
    "bad_checksum": ("identified", lambda s, a, p: frame(BATCH, s, batch_body(a, [GOOD]), crc=99), BATCH),
    "unknown_type": ("identified", lambda s, a, p: frame(0x42, s, b"\0\0\0\0"), 0x42),
    "hello_wrong_size": ("fresh", lambda s, a, p: frame(HELLO, s, struct.pack("<HH", a, 0)), HELLO),
    "finished_wrong_size": ("identified", lambda s, a, p: frame(FINISHED, s, struct.pack("<HHI", a, 0, 0)), FINISHED),
    "winners_wrong_size": ("identified", lambda s, a, p: frame(WINNERS, s, struct.pack("<HH", a, 0)), WINNERS),
    "batch_truncated_header": ("identified", lambda s, a, p: frame(BATCH, s, b"\x02\x00\x01"), BATCH),
    "bet_truncated": ("identified", lambda s, a, p: batch_raw(s, a, raw_bet() + b"\x01\x00\xc6", 2), BATCH),
    "field_overflow": ("identified", lambda s, a, p: batch_raw(s, a, raw_bet(lengths=(3, 3, 200)), 1), BATCH),
    "trailing_bytes": ("identified", lambda s, a, p: batch_raw(s, a, raw_bet() + b"\0\0", 1), BATCH),
    "zero_bets": ("identified", lambda s, a, p: batch_raw(s, a, b"", 0), BATCH),
    "too_many_bets": ("identified", lambda s, a, p: batch_raw(s, a, raw_bet() * 201, 201), BATCH),
    "name_too_long": ("identified", lambda s, a, p: bad_bet_batch(s, a, ("A" * 101, "Paz", "1", "1990-01-01", 1)),
                      BATCH),
    "invalid_utf8": ("identified", lambda s, a, p: batch_raw(s, a, raw_bet(first=b"Jos\xc3"), 1), BATCH),
    "name_forbidden_char": ("identified", lambda s, a, p: bad_bet_batch(s, a, ("Ana,Eva", "Paz", "1", "1990-01-01",
                                                                               1)), BATCH),
    "bad_document": ("identified", lambda s, a, p: bad_bet_batch(s, a, ("Ana", "Paz", "12a", "1990-01-01", 1)),
                     BATCH),
    "bad_birthdate": ("identified", lambda s, a, p: bad_bet_batch(s, a, ("Ana", "Paz", "1", "1990-02-30", 1)),
                      BATCH),
    "bad_number": ("identified", lambda s, a, p: bad_bet_batch(s, a, ("Ana", "Paz", "1", "1990-01-01", 10000)),
                   BATCH),
    "hello_unknown_agency": ("fresh", lambda s, a, p: hello(s, 99, p), HELLO),
    "before_hello": ("fresh", lambda s, a, p: batch(s, a, [GOOD]), BATCH),
    "hello_other_agency": ("identified", lambda s, a, p: hello(s, FINISHER, p), HELLO),
    "batch_other_agency": ("identified", lambda s, a, p: batch(s, WELL_BEHAVED, [GOOD]), BATCH),
    "finished_other_agency": ("identified", lambda s, a, p: finished(s, WELL_BEHAVED), FINISHED),
    "winners_other_agency": ("identified", lambda s, a, p: winners(s, WELL_BEHAVED), WINNERS),
    "bets_after_finished": ("finished", lambda s, a, p: batch(s, a, [GOOD]), BATCH),
    "second_finished": ("finished", lambda s, a, p: finished(s, a), FINISHED),
    "second_winners_while_held": ("held", lambda s, a, p: winners(s, a), WINNERS),
    "sequence_gap": ("identified", lambda s, a, p: batch(s + 5, a, [GOOD]), BATCH),
    "producer_busy": ("busy", lambda s, a, p: hello(s, a, p), HELLO),
    "bets_after_draw": ("after_draw", lambda s, a, p: batch(s, a, [GOOD]), BATCH),
    "finished_after_draw": ("after_draw", lambda s, a, p: finished(s, a), FINISHED),
}

# Rows checked by a test of their own (a deadline, a cap, an operator action).
COVERED_ELSEWHERE = {
    "closed_out": "test_workers.py::test_close_with_one_agency_missing",
    "too_many_connections": "test_connection_caps_refuse_with_an_error_frame_and_keep_serving",
    "handshake_timeout": "test_slowloris_is_cut_off_by_the_deadlines",
    "idle_timeout": "test_slowloris_is_cut_off_by_the_deadlines",
    "replies_not_read": "test_a_client_that_never_reads_is_paused_then_dropped",
    "input_overflow": "unit: ReactorLimits.InputOverflowClosesTheConnection",
}

REQUEST_NAMES = {BATCH: "batch", FINISHED: "finished", WINNERS: "winners", HELLO: "hello"}


def test_the_table_and_the_cases_agree():
    table = violation_table()
    assert set(table) == set(CASES) | set(COVERED_ELSEWHERE)
    for name, (status, answer, outcome) in table.items():
        assert answer.split(" (")[0] in ("reply", "connection error", "none"), name
        assert outcome in ("keep", "close", "dropped"), name
        if name in CASES:
            expects = CASES[name][2]
            assert (answer == "connection error") == (expects == CONNECTION_ERROR), name


class Producers:
    def __init__(self):
        self.next = 1000

    def new(self):
        self.next += 1
        return self.next


def run_case(server, name, row, producers, held_ids):
    setup, build, answers = CASES[name]
    status, answer, outcome = row
    producer = producers.new()
    seq = 1
    holder = None
    c = Conn(server.port)
    agency = FINISHER if setup == "finished" else ABUSER
    if setup in ("identified", "finished", "held", "after_draw"):
        ack = c.request(hello(1, agency, producer))
        assert ack.status == "ok", (name, ack)
        seq = 2 if setup != "identified" else 1
    if setup == "held":
        c.send(winners(2, agency))
        seq = 3
    if setup == "busy":
        holder = Conn(server.port)
        assert holder.request(hello(1, agency, producer)).status == "ok"
    data = build(seq, agency, producer)
    reply = c.request(data)
    assert reply.status == status, (name, reply)
    if answers == CONNECTION_ERROR:
        assert reply.type == CONNECTION_ERROR and reply.seq == 0, (name, reply)
    else:
        assert reply.type == answers | REPLY_BIT and reply.seq == struct.unpack_from("<I", data, 8)[0], (name, reply)
    assert reply.reason, name
    if outcome == "close":
        assert c.is_closed_by_peer(timeout=5), f"{name}: the connection should be closed"
    else:
        # Kept: the connection still answers (a hello, which any state takes).
        probe_agency = agency
        probe_producer = producers.new() if setup == "fresh" or setup == "busy" else producer
        if name == "hello_other_agency":
            probe_agency = ABUSER
        again = c.request(hello(90, probe_agency, probe_producer))
        assert again.status == "ok" and again.seq == 90, (name, again)
    if setup == "held":
        held_ids.append(c)  # answered at the draw; closed then
    else:
        c.close()
    if holder:
        holder.close()


def test_every_violation_gets_its_status_and_outcome_while_an_agency_runs(start_server, workdir):
    table = violation_table()
    data = os.path.join(workdir, "gen")
    expected = datagen(data, "--agencies", "1", "--bets-list", "20000", "--winners-list", "6", "--seed", "8")
    server = start_server(args=TABLE_SERVER_ARGS)
    # The well-behaved agency runs the whole time: its bets, finished, its
    # winners query (held until the draw), its winners.
    client = run_client(WELL_BEHAVED, server.address(), os.path.join(data, "agency-1.csv"), workdir,
                        extra_args=["--log-level", "DEBUG"], wait=False)
    producers = Producers()
    finisher = Conn(server.port)
    assert finisher.request(hello(1, FINISHER, producers.new())).status == "ok"
    assert finisher.request(finished(2, FINISHER)).status == "ok"
    held = []
    before = [n for n, case in CASES.items() if case[0] != "after_draw"]
    for name in before:
        run_case(server, name, table[name], producers, held)
    # Nothing of the bad requests was stored; the abuser now finishes, which
    # completes the draw (the well-behaved agency finishes on its own).
    abuser = Conn(server.port)
    assert abuser.request(hello(1, ABUSER, producers.new())).status == "ok"
    assert abuser.request(finished(2, ABUSER)).status == "ok"
    client.wait(timeout=300)
    client.log_file.close()
    log = read(client.log_path)
    assert client.returncode == 0, log[-3000:]
    want = expected["agencies"]["1"]
    got = sorted(f["dni"] for _, action, _, f in events(log) if action == "ganador")
    assert got == sorted(want["winner_documents"]) and len(got) == want["winners"] == 6
    for c in held:
        assert c.recv_reply().status == "ok"  # the held query, answered by the draw
        c.close()
    for name in [n for n, case in CASES.items() if case[0] == "after_draw"]:
        run_case(server, name, table[name], producers, held)
    assert server.stop() == 0
    slog = server.log()
    assert len(events(slog, "sorteo")) == 1
    fin = [f for _, _, r, f in events(slog, "fin_apuestas") if r == "success"]
    stored = {int(f["agencia"]): int(f["cantidad"]) for f in fin}
    assert stored == {FINISHER: 0, ABUSER: 0, WELL_BEHAVED: 20000}


# ---------------------------------------------------------------- helpers

def worker_pids(server):
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def rss_kib(pid, field="RssAnon"):
    """Anonymous memory: the heap and buffers. The store's segment mappings
    (RssFile, at most the current and the prepared next segment) are left
    out: they are file pages, bounded by --segment-bytes, not by traffic."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def timed_client_run(start_server, workdir, data, extra_server_args=(), during=None):
    server = start_server(args=["--agencies", "1", *extra_server_args])
    attack = during(server) if during else None
    t0 = time.monotonic()
    client = run_client(1, server.address(), os.path.join(data, "agency-1.csv"), workdir)
    elapsed = time.monotonic() - t0
    log = read(client.log_path)
    assert client.returncode == 0, log[-3000:]
    return server, elapsed, log, attack


def server_unread_bytes(server_port):
    """{client port: receive queue} of the server's ends of its loopback
    connections (/proc/net/tcp): what each client sent that the server has
    not read."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if int(local.split(":")[1], 16) == server_port:
                out[int(remote.split(":")[1], 16)] = int(queues.split(":")[1], 16)
    return out


def sample_unread(readers):
    unread = server_unread_bytes(readers[0].server_port)
    for r in readers:
        if not r.dropped:
            r.unread_max = max(r.unread_max, unread.get(r.client_port, 0))


def drop_counts(log, action, reason):
    return sum(int(f["conexiones"]) for _, _, _, f in events(log, action) if f.get("motivo") == reason)


# ---------------------------------------------------------------- slowloris

class Slowloris:
    """Connections that send one byte every `period` seconds: some never
    finish their hello, others finish it and then never finish a batch."""

    def __init__(self, port, unidentified, identified, period=1.0):
        self.socks = []
        self.closed_at = {}
        self.replies = {}
        self.streams = {}
        self.opened_at = time.monotonic()
        for i in range(unidentified + identified):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            if i < unidentified:
                self.streams[s] = hello(1, 1, 5000 + i)
            else:
                # Identified with a hello (a producer of its own), then a batch crawls in.
                s.setblocking(True)
                s.sendall(hello(1, 1, 5000 + i))
                got = b""
                while len(got) < 48:
                    got += s.recv(48 - len(got))
                s.setblocking(False)
                self.streams[s] = batch(1, 1, [GOOD] * 20)
            self.socks.append(s)
        self.unidentified = set(self.socks[:unidentified])
        self.period = period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sent = 0
        while not self.stop.is_set() and len(self.closed_at) < len(self.socks):
            for s in self.socks:
                if s in self.closed_at:
                    continue
                stream = self.streams[s]
                try:
                    if sent < len(stream):
                        s.send(stream[sent:sent + 1])
                except OSError:
                    pass
                self._poll(s)
            sent += 1
            deadline = time.monotonic() + self.period
            while time.monotonic() < deadline and not self.stop.is_set():
                for s in self.socks:
                    if s not in self.closed_at:
                        self._poll(s)
                time.sleep(0.05)

    def _poll(self, s):
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    self.closed_at[s] = time.monotonic() - self.opened_at
                    return
                self.replies[s] = self.replies.get(s, b"") + chunk
        except BlockingIOError:
            return
        except OSError:
            self.closed_at[s] = time.monotonic() - self.opened_at

    def finish(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def reply_status(data):
    from lottery_proto import HEADER, STATUS
    if len(data) < HEADER.size + 2:
        return None
    msg_type = data[5]
    return msg_type, STATUS.get(struct.unpack_from("<H", data, 16)[0])


def test_slowloris_is_cut_off_by_the_deadlines(start_server, workdir):
    data = os.path.join(workdir, "gen")
    datagen(data, "--agencies", "1", "--bets-list", "30000", "--winners-list", "3", "--seed", "4")
    # Full speed: the same run on a quiet server.
    quiet, baseline, _, _ = timed_client_run(start_server, workdir, data)
    assert quiet.stop() == 0
    deadlines = ["--handshake-timeout-ms", "2000", "--idle-timeout-ms", "3000", "--workers", "2"]
    server, elapsed, _, attack = timed_client_run(
        start_server, workdir, data, deadlines, during=lambda srv: Slowloris(srv.port, 200, 100))
    # The agency's run is not slowed down by 300 crawling connections.
    assert elapsed < 2 * baseline + 3, (elapsed, baseline)
    give_up = time.monotonic() + 20
    while len(attack.closed_at) < len(attack.socks) and time.monotonic() < give_up:
        time.sleep(0.2)
    attack.finish()
    assert len(attack.closed_at) == len(attack.socks), "every crawling connection is closed"
    for s in attack.socks:
        handshake = s in attack.unidentified
        # Deadline plus the sweep period, and slack for a loaded machine.
        limit = 2.0 if handshake else 3.0 + 1.5
        assert attack.closed_at[s] < limit + 3.0, attack.closed_at[s]
        assert attack.closed_at[s] >= (2.0 if handshake else 0.5), attack.closed_at[s]
        got = attack.replies.get(s, b"")
        assert reply_status(got) == (CONNECTION_ERROR, "handshake_timeout" if handshake else "idle_timeout")
    assert server.stop() == 0
    log = server.log()
    # Reported per interval with a count, not once per connection.
    lines = [e for e in events(log, "conexion_cerrada")]
    assert len(lines) <= 2 * 2 * 2, lines  # (first + summary) x reasons x workers
    assert drop_counts(log, "conexion_cerrada", "handshake_timeout") == 200
    assert drop_counts(log, "conexion_cerrada", "idle_timeout") == 100


# ---------------------------------------------------------------- a client that never reads

class NonReader:
    """A client that asks and asks and never reads a reply: a small receive
    window, so the kernel's buffers fill fast and the server's own queue is
    what grows. It keeps sending whenever the socket takes more."""

    def __init__(self, port, producer):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.server_port = port
        self.client_port = self.sock.getsockname()[1]
        self.unread_max = 0  # the most bytes seen waiting, unread, in the server's socket
        # The first winners query is held until the draw; every later one is
        # refused with not_ready, a 56-byte reply for a 24-byte request.
        self.sock.sendall(hello(1, 1, producer) + winners(2, 1))
        self.sock.setblocking(False)
        self.flood = winners(3, 1) * 64
        self.sent = 0
        self.dropped_at = None

    @property
    def dropped(self):
        return self.dropped_at is not None

    def push(self):
        if self.dropped:
            return
        now = time.monotonic()
        try:
            self.sent += self.sock.send(self.flood)
        except BlockingIOError:
            pass
        except OSError:
            self.dropped_at = now  # reset by the server

    def ended(self):
        """Reads what reached it; true when the stream ends (EOF or reset)."""
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def test_a_client_that_never_reads_is_paused_then_dropped(start_server, workdir):
    server = start_server(args=["--agencies", "2", "--workers", "1", "--max-pending-reply-bytes", "8192",
                                "--reply-stall-timeout-ms", "2000"])
    worker = worker_pids(server)[0]
    rss_before = rss_kib(worker)
    reader = NonReader(server.port, 77)
    other = None
    t0 = time.monotonic()
    sampled = 0
    while not reader.dropped and time.monotonic() - t0 < 30:
        reader.push()
        if time.monotonic() - sampled > 0.05:
            sample_unread([reader])
            sampled = time.monotonic()
        if time.monotonic() - t0 > 1 and other is None:
            # Meanwhile another agency is served as usual.
            other = Conn(server.port)
            assert other.request(hello(1, 2, 78)).status == "ok"
            assert other.request(batch(1, 2, [GOOD] * 10)).status == "ok"
        time.sleep(0.005)
    assert reader.dropped, server.log()[-2000:]
    # Paused first: the server stopped reading it, so its requests piled up
    # unread in the server's socket (a server that reads keeps that near 0).
    assert reader.unread_max > 64 * 1024, reader.unread_max
    assert reader.ended()
    reader.sock.close()
    # Bounded: the pending replies it left behind are at most the cap plus a
    # reply, and the buffers go back to the pool.
    assert rss_kib(worker) - rss_before < 4096, (rss_before, rss_kib(worker))
    assert other is not None and other.request(batch(2, 2, [GOOD])).status == "ok"
    assert server.stop() == 0
    assert drop_counts(server.log(), "conexion_cerrada", "replies_not_read") == 1


def test_many_clients_that_never_read_keep_memory_bounded(start_server, workdir):
    server = start_server(args=["--agencies", "1", "--workers", "1", "--reply-stall-timeout-ms", "1500"])
    worker = worker_pids(server)[0]
    rss_before = rss_kib(worker)
    readers = [NonReader(server.port, 900 + i) for i in range(40)]
    peak = rss_before
    t0 = time.monotonic()
    sampled = 0
    while not all(r.dropped for r in readers) and time.monotonic() - t0 < 60:
        for r in readers:
            r.push()
        if time.monotonic() - sampled > 0.05:
            sample_unread(readers)
            peak = max(peak, rss_kib(worker))
            sampled = time.monotonic()
        time.sleep(0.002)
    assert all(r.dropped for r in readers), sum(r.dropped for r in readers)
    assert min(r.unread_max for r in readers) > 16 * 1024
    # Per connection at most its read buffer and its output buffer (128 KiB
    # each), far less in practice.
    assert peak - rss_before < 40 * 256 + 2048, (rss_before, peak)
    for r in readers:
        assert r.ended()
        r.sock.close()
    assert server.stop() == 0
    assert drop_counts(server.log(), "conexion_cerrada", "replies_not_read") == 40


# ---------------------------------------------------------------- connection caps

def open_identified(port, agency, producer):
    """A connection with a successful hello, or the refusal it got."""
    c = Conn(port, timeout=5)
    reply = c.request(hello(1, agency, producer))
    return c, reply


@pytest.mark.parametrize("workers,per_worker,total,expect", [(1, 30, 1000, 30), (2, 1000, 60, 60)])
def test_connection_caps_refuse_with_an_error_frame_and_keep_serving(start_server, workdir, workers, per_worker,
                                                                      total, expect):
    server = start_server(args=["--agencies", "1", "--workers", str(workers), "--max-connections",
                                str(per_worker), "--max-connections-total", str(total)])
    held, refused = [], 0
    for i in range(expect + 40):
        c, reply = open_identified(server.port, 1, 3000 + i)
        if reply.status == "ok":
            held.append(c)
            continue
        assert reply.type == CONNECTION_ERROR and reply.status == "too_many_connections", reply
        assert "connection limit" in reply.reason
        assert c.is_closed_by_peer(timeout=5)
        c.close()
        refused += 1
    assert len(held) == expect and refused == 40
    # Those it holds are served as usual.
    for i, c in enumerate(held):
        assert c.request(batch(1, 1, [GOOD])).status == "ok", i
    # Room again once some leave.
    for c in held[:5]:
        c.close()
    time.sleep(0.3)
    c, reply = open_identified(server.port, 1, 9999)
    assert reply.status == "ok"
    c.close()
    for c in held[5:]:
        c.close()
    assert server.stop() == 0
    log = server.log()
    lines = events(log, "conexion_rechazada")
    assert 1 <= len(lines) <= 2 * workers, lines
    assert drop_counts(log, "conexion_rechazada", "too_many_connections") == 40


def test_an_agency_refused_by_the_cap_backs_off_and_completes(start_server, workdir):
    """too_many_connections says "not now": the client retries with its
    back-off, and once a slot frees up it sends every bet and gets its winners."""
    data = os.path.join(workdir, "data")
    expected = datagen(data, "--agencies", "1", "--bets-list", "3000", "--winners-list", "2", "--seed", "11")
    server = start_server(args=["--agencies", "1", "--workers", "1", "--max-connections", "1"])
    blocker, reply = open_identified(server.port, 1, 4242)
    assert reply.status == "ok"
    client = run_client(1, server.address(), os.path.join(data, "agency-1.csv"), workdir,
                        extra_args=["--log-level", "DEBUG"], env={"CLI_LOOP_AMOUNT": "50", "CLI_LOOP_PERIOD": "200ms"},
                        wait=False)
    deadline = time.monotonic() + 30
    while "too_many_connections" not in read(client.log_path):
        assert client.poll() is None, read(client.log_path)[-3000:]
        assert time.monotonic() < deadline, read(client.log_path)[-3000:]
        time.sleep(0.05)
    blocker.close()
    client.wait(timeout=120)
    client.log_file.close()
    log = read(client.log_path)
    assert client.returncode == 0, log[-3000:]
    assert events(log, "reconectar"), log[-3000:]
    want = expected["agencies"]["1"]
    got = sorted(f["dni"] for _, action, _, f in events(log, "ganador"))
    assert got == sorted(want["winner_documents"]) and len(got) == 2
    assert server.stop() == 0
    fin = [f for _, _, r, f in events(server.log(), "fin_apuestas") if r == "success"]
    assert [int(f["cantidad"]) for f in fin] == [3000]
