"""TLS 1.3 with a pre-shared key per agency (docs/SECURITY.md): the agency is
the handshake's and nothing else. Python's ssl module cannot do TLS 1.3
external PSKs before 3.13, so these tests talk to the server through
lottery-tls-proxy (the client library's own TLS, one key per proxy) and
check the protocol's bytes with lottery_proto, and run the real client."""
import os
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import BIN_DIR, TP0_DIR, events, read, run_client
import lottery_proto as lp

REFERENCE_WINNERS = {1: 2, 2: 3, 3: 3, 4: 2, 5: 0}
AGENCIES = range(1, 6)
GOOD_BET = ("Ana María", "Núñez", "30111222", "1990-05-17", 1234)


def make_keys(workdir, agencies=5, name="keys"):
    d = os.path.join(workdir, name)
    subprocess.run([os.path.join(BIN_DIR, "lotteryctl"), "keys", "init", "--agencies", str(agencies), "--dir", d],
                   check=True, stdout=subprocess.DEVNULL)
    return d


def key_file(keys_dir, agency):
    return os.path.join(keys_dir, f"agency-{agency}.key")


def write_key(path, agency, hexkey):
    with open(path, "w") as f:
        f.write(f"{agency} {hexkey}\n")
    os.chmod(path, 0o600)
    return path


class Proxy:
    """lottery-tls-proxy: plaintext in, TLS with one key out."""

    def __init__(self, server, key=None):
        args = ["--key", key] if key else ["--no-key"]
        self.proc = subprocess.Popen([os.path.join(BIN_DIR, "lottery-tls-proxy"), "--connect", server.address(), *args],
                                     stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        first = self.proc.stdout.readline().split()
        assert first and first[0] == "port", first
        self.port = int(first[1])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def handshake(self, timeout=10):
        """What the proxy said about the last connection's handshake."""
        return self.lines.get(timeout=timeout)

    def connect(self):
        return lp.Conn(self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def proxies():
    started = []

    def start(server, key=None):
        p = Proxy(server, key)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def tls_failures(server):
    return [f for _, _, r, f in events(server.log(), "tls_handshake") if r == "fail"]


def expect_refused_and_closed(conn, request, request_type, seq):
    reply = conn.request(request)
    assert (reply.type, reply.seq, reply.status) == (0x80 | request_type, seq, "not_your_agency"), reply
    assert conn.is_closed_by_peer(), "the connection stays open after not_your_agency"


def test_without_keys_the_server_warns_that_connections_are_unauthenticated(start_server):
    server = start_server(args=("--agencies", "5"))
    warnings = [(lvl, r, f) for lvl, _, r, f in events(server.log(), "tls")]
    assert len(warnings) == 1
    level, result, fields = warnings[0]
    assert (level, result, fields["mode"]) == ("WARNING", "fail", "plaintext")
    assert "unauthenticated" in fields["warning"]
    # And plaintext works as before.
    c = lp.Conn(server.port)
    assert c.request(lp.hello(1, 1)).status == "ok"


def test_with_keys_plaintext_is_refused_with_a_clear_frame(start_server, workdir):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--tls-keys", os.path.join(keys, "server.keys")))
    assert "unauthenticated" not in server.log()
    c = lp.Conn(server.port)
    reply = c.request(lp.hello(1, 1))
    assert (reply.type, reply.seq, reply.status) == (lp.CONNECTION_ERROR, 0, "tls_required"), reply
    assert c.is_closed_by_peer()
    failures = tls_failures(server)
    assert [f["reason"] for f in failures] == ["plaintext"]
    assert failures[0]["ip"] == "127.0.0.1"


def test_every_pair_of_agencies_is_kept_apart(start_server, workdir, proxies):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--tls-keys", os.path.join(keys, "server.keys"),
                                "--tls-failure-burst", "1000"))
    by_agency = {a: proxies(server, key_file(keys, a)) for a in AGENCIES}
    checked = 0
    for a in AGENCIES:
        p = by_agency[a]
        # Its own agency: served.
        c = p.connect()
        assert c.request(lp.hello(1, a, producer_id=100 + a)).status == "ok"
        assert p.handshake() == "handshake ok"
        c.close()
        for b in AGENCIES:
            if a == b:
                continue
            # Saying hello as another agency.
            c = p.connect()
            expect_refused_and_closed(c, lp.hello(1, b, producer_id=7), lp.HELLO, 1)
            assert p.handshake() == "handshake ok"
            # Sending bets, finishing, reading winners as another agency, after an honest hello.
            for request, rtype in ((lambda s: lp.batch(s, b, [GOOD_BET]), lp.BATCH),
                                   (lambda s: lp.finished(s, b), lp.FINISHED),
                                   (lambda s: lp.winners(s, b), lp.WINNERS)):
                c = p.connect()
                assert c.request(lp.hello(1, a, producer_id=1000 * a + b)).status == "ok"
                expect_refused_and_closed(c, request(2), rtype, 2)
                assert p.handshake() == "handshake ok"
                checked += 1
    assert checked == 60
    refusals = [f for _, _, r, f in events(server.log(), "agencia_ajena")]
    assert len(refusals) == 80
    assert all(f["code"] == "not_your_agency" and f["agencia"] != f["pedida"] for f in refusals)
    # Nothing of theirs was stored, nothing finished.
    for a in AGENCIES:
        c = by_agency[a].connect()
        ack = c.request(lp.hello(1, a, producer_id=5000 + a)).hello_ack()
        assert ack["bets_stored"] == 0 and not ack["finished"]
        by_agency[a].handshake()

    # A wrong key, an unknown agency and no key at all fail the handshake alike.
    wrong = write_key(os.path.join(workdir, "wrong.key"), 3, "ab" * 32)
    unknown = write_key(os.path.join(workdir, "unknown.key"), 99, "cd" * 32)
    before = len(tls_failures(server))
    for key in (wrong, unknown, None):
        p = proxies(server, key)
        c = p.connect()
        with pytest.raises((ConnectionError, ConnectionResetError)):
            c.request(lp.hello(1, 3))
        said = p.handshake()
        assert said.startswith("handshake fail: refused"), said
    failures = tls_failures(server)[before:]
    assert len(failures) == 3
    # Wrong key and unknown agency are the same failure to whoever watches.
    assert failures[0]["reason"] == failures[1]["reason"] == "handshake_failed"
    assert failures[0]["detail"] == failures[1]["detail"] == "binder does not verify"
    assert failures[2]["reason"] == "handshake_failed"


@pytest.mark.skipif(not os.path.isdir(TP0_DIR), reason=f"reference data set not found at {TP0_DIR}")
def test_reference_data_set_over_tls_gives_known_winners(start_server, workdir):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--tls-keys", os.path.join(keys, "server.keys")))
    procs = {a: run_client(a, server.address(), os.path.join(TP0_DIR, f"agency-{a}.csv"), workdir,
                           ("--tls-key", key_file(keys, a)), wait=False) for a in AGENCIES}
    for a, proc in procs.items():
        proc.wait(timeout=300)
        proc.log_file.close()
        log = read(proc.log_path)
        assert proc.returncode == 0, log[-3000:]
        found = events(log, "consulta_ganadores")
        assert len(found) == 1 and found[0][2] == "success"
        assert int(found[0][3]["cant_ganadores"]) == REFERENCE_WINNERS[a], f"agency {a}"
    # After the draw, each agency reads its own winners (agency 0: "mine"),
    # and asking for any other agency's is refused and cut off.
    for a in AGENCIES:
        p = Proxy(server, key_file(keys, a))
        try:
            c = p.connect()
            assert c.request(lp.hello(1, a, producer_id=900 + a)).status == "ok"
            reply = c.request(lp.winners(2, 0))
            assert reply.status == "ok"
            assert reply.winners_page()[0] == REFERENCE_WINNERS[a]
            for b in AGENCIES:
                if b != a:
                    c = p.connect()
                    assert c.request(lp.hello(1, a, producer_id=900 + a)).status == "ok"
                    expect_refused_and_closed(c, lp.winners(2, b), lp.WINNERS, 2)
        finally:
            p.stop()
    assert server.stop() == 0
    log = server.log()
    draws = events(log, "sorteo")
    assert len(draws) == 1 and int(draws[0][3]["apuestas"]) == 78697
    assert tls_failures(server) == []
    assert len(events(log, "agencia_ajena")) == 20


def test_a_client_with_another_agencys_key_or_none_is_refused(start_server, workdir):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--tls-keys", os.path.join(keys, "server.keys")))
    data = os.path.join(TP0_DIR, "agency-5.csv")
    # Agency 5's data with agency 4's key: the key says 4, so hello as 5 is refused.
    proc = run_client(5, server.address(), data, workdir, ("--tls-key", key_file(keys, 4), "--loop-amount", "1"))
    log = read(proc.log_path)
    assert proc.returncode == 3, log
    assert [f["code"] for _, _, _, f in events(log, "hello")] == ["not_your_agency"]
    # No key: the server says tls_required in clear.
    proc = run_client(5, server.address(), data, workdir, ("--loop-amount", "1"))
    log = read(proc.log_path)
    assert proc.returncode == 3, log
    assert "tls_required" in log
    # A rotated-away key: the handshake is refused, exit 4.
    wrong = write_key(os.path.join(workdir, "old-5.key"), 5, "ef" * 32)
    proc = run_client(5, server.address(), data, workdir, ("--tls-key", wrong, "--loop-amount", "1"))
    log = read(proc.log_path)
    assert proc.returncode == 4, log
    assert [r for _, _, r, _ in events(log, "tls_handshake")] == ["fail"]


def wait_for(predicate, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_key_rotation_by_sighup(start_server, workdir, proxies):
    keys = make_keys(workdir)
    server_keys = os.path.join(keys, "server.keys")
    server = start_server(args=("--agencies", "5", "--workers", "2", "--tls-keys", server_keys,
                                "--tls-failure-burst", "1000"))
    old_key = os.path.join(workdir, "agency-2.old.key")
    with open(key_file(keys, 2)) as src, open(old_key, "w") as dst:
        dst.write(src.read())
    # A session in flight with the old key.
    old = proxies(server, old_key)
    in_flight = old.connect()
    assert in_flight.request(lp.hello(1, 2, producer_id=42)).status == "ok"
    assert old.handshake() == "handshake ok"
    assert in_flight.request(lp.batch(1, 2, [GOOD_BET])).status == "ok"

    subprocess.run([os.path.join(BIN_DIR, "lotteryctl"), "keys", "rotate", "--agency", "2", "--dir", keys],
                   check=True, stdout=subprocess.DEVNULL)
    os.kill(server.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: len([e for e in events(server.log(), "tls_keys") if e[2] == "success"]) == 2), \
        server.log()[-2000:]

    # New connections: the old key fails, the new one works.
    c = old.connect()
    with pytest.raises((ConnectionError, ConnectionResetError)):
        c.request(lp.hello(1, 2))
    assert old.handshake().startswith("handshake fail: refused")
    new = proxies(server, key_file(keys, 2))
    c = new.connect()
    assert c.request(lp.hello(1, 2, producer_id=43)).status == "ok"
    assert new.handshake() == "handshake ok"
    # The session that was in flight finishes its work.
    assert in_flight.request(lp.batch(2, 2, [GOOD_BET])).status == "ok"
    assert in_flight.request(lp.finished(3, 2)).status == "ok"

    # A broken file on reload keeps the keys in use: the master refuses it
    # (one line) and the workers are not asked to reload.
    with open(server_keys, "w") as f:
        f.write("2 not-a-key\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: len([e for e in events(server.log(), "tls_keys") if e[2] == "fail"]) == 1)
    c = new.connect()
    assert c.request(lp.hello(1, 2, producer_id=44)).status == "ok"
    assert new.handshake() == "handshake ok"
    # A worker restarted after a crash, with the broken file still in place,
    # serves with the keys in use (the master's copy of the last good file).
    workers = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)
    assert wait_for(lambda: len(events(server.log(), "worker_start")) >= 3), server.log()[-2000:]
    assert wait_for(lambda: len(subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                               text=True).stdout.split()) == 2)
    time.sleep(0.5)  # the restarted worker's listener is up
    # SO_REUSEPORT spreads connections over both workers: several of each
    # kind reach the restarted one.
    for i in range(8):
        c = new.connect()
        assert c.request(lp.hello(1, 2, producer_id=100 + i)).status == "ok", i
        assert new.handshake() == "handshake ok"
        c = old.connect()
        with pytest.raises((ConnectionError, ConnectionResetError)):
            c.request(lp.hello(1, 2))
        assert old.handshake().startswith("handshake fail: refused")
    assert not [e for e in events(server.log(), "worker_exit") if "killed" not in e[3].get("status", "")]
    assert server.stop() == 0


def test_failed_handshakes_are_rate_limited_per_address(start_server, workdir, proxies):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--workers", "1", "--tls-keys", os.path.join(keys, "server.keys"),
                                "--tls-failure-burst", "3", "--tls-failure-refill-ms", "60000"))
    wrong = proxies(server, write_key(os.path.join(workdir, "wrong.key"), 1, "12" * 32))
    for _ in range(3):
        c = wrong.connect()
        with pytest.raises((ConnectionError, ConnectionResetError)):
            c.request(lp.hello(1, 1))
        assert wrong.handshake().startswith("handshake fail: refused")
    # Over the limit: closed before any handshake, even with the right key.
    good = proxies(server, key_file(keys, 1))
    c = good.connect()
    with pytest.raises((ConnectionError, ConnectionResetError)):
        c.request(lp.hello(1, 1))
    assert good.handshake().startswith("handshake fail: dropped")
    reasons = [f["reason"] for f in tls_failures(server)]
    assert reasons == ["handshake_failed"] * 3 + ["rate_limited"], reasons


def test_a_silent_tls_connection_meets_the_handshake_deadline(start_server, workdir):
    keys = make_keys(workdir)
    server = start_server(args=("--agencies", "5", "--tls-keys", os.path.join(keys, "server.keys"),
                                "--handshake-timeout-ms", "300"))
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
    s.settimeout(5)
    start = time.time()
    assert s.recv(100) == b""
    assert 0.25 < time.time() - start < 3
