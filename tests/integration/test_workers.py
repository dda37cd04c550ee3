"""The process model: a master, several worker processes on one port, a draw
shared through the control file and its lock."""
import csv
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import BIN_DIR, datagen, events, read, run_client
from lottery_proto import Conn, batch, finished, hello, winners
import segments

BET = ("Luz", "Álvarez", "40111222", "1985-11-15", 42)


def read_bets(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [(r[0], r[1], r[2], r[3], int(r[4])) for r in csv.reader(f)]


def lotteryctl(data_dir, *args):
    return subprocess.run([os.path.join(BIN_DIR, "lotteryctl"), "--data-dir", data_dir, *args],
                          capture_output=True, text=True, timeout=120)


def send_all(port, agency, bets, producer, batch_size=100):
    c = Conn(port)
    assert c.request(hello(1, agency, producer_id=producer)).status == "ok"
    seq = 1
    for i in range(0, len(bets), batch_size):
        r = c.request(batch(seq, agency, bets[i:i + batch_size]))
        assert r.status == "ok", r
        seq += 1
    return c


def all_winners(conn, agency, seq=100):
    docs, start, total = [], 0, None
    while total is None or len(docs) < total:
        r = conn.request(winners(seq, agency, start))
        assert r.status == "ok", r
        total, _, page = r.winners_page()
        docs += page
        start += len(page)
        seq += 1
    return docs


_next_producer = [1000]


def worker_of(conn, agency, producer=None):
    if producer is None:
        _next_producer[0] += 1
        producer = _next_producer[0]
    r = conn.request(hello(0, agency, producer_id=producer))
    assert r.status == "ok"
    return r.hello_ack()["worker"]


def test_twenty_agencies_on_four_workers(start_server, workdir):
    data = os.path.join(workdir, "gen")
    winners_list = [random.Random(a).randint(0, 4) for a in range(20)]
    expected = datagen(data, "--agencies", "20", "--bets", "1500", "--winners-list",
                       ",".join(map(str, winners_list)), "--seed", "20")
    server = start_server(args=["--agencies", "20", "--workers", "4"])
    errors = []

    def agency(a):
        try:
            bets = read_bets(os.path.join(data, f"agency-{a}.csv"))
            parts = [bets[k::3] for k in range(3)]
            conns = [None] * 3

            def part(k):
                conns[k] = send_all(server.port, a, parts[k], producer=a * 10 + k)

            threads = [threading.Thread(target=part, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(conns), "a part failed"
            assert conns[0].request(finished(1000, a)).status == "ok"
            got = all_winners(conns[1], a)
            assert sorted(got) == sorted(expected["agencies"][str(a)]["winner_documents"]), a
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((a, repr(e)))

    threads = [threading.Thread(target=agency, args=(a,)) for a in range(1, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert server.stop() == 0
    log = server.log()
    draws = events(log, "sorteo")
    assert len(draws) == 1, draws
    assert int(draws[0][3]["apuestas"]) == 20 * 1500
    stored = segments.read_store(server.data_dir)
    assert sum(e["count"] for e in stored) == 20 * 1500
    # Every worker stored part of the load (SO_REUSEPORT spread the connections).
    workers = {int(line.split("worker: ")[1].split(" ")[0]) for line in log.splitlines()
               if "action: worker_ready" in line}
    assert workers == {0, 1, 2, 3}
    segment_workers = {os.path.basename(p)[9:12] for p in os.listdir(server.data_dir) if p.endswith(".lseg")}
    assert len(segment_workers) >= 2


def test_finished_on_one_worker_winners_on_another(start_server, workdir):
    server = start_server(args=["--agencies", "2", "--workers", "2"])
    a = Conn(server.port)
    wa = worker_of(a, 1)
    for _ in range(200):
        b = Conn(server.port)
        if worker_of(b, 1) != wa:
            break
        b.close()
    else:
        pytest.fail("SO_REUSEPORT never put a connection on the other worker")
    assert a.request(batch(1, 1, [BET, ("Eva", "Paz", "123", "1990-01-01", 7574)])).status == "ok"
    assert a.request(finished(2, 1)).status == "ok"
    # Held on worker B until the draw, which will run on whichever worker
    # agency 2's finish lands on.
    b.send(winners(3, 1))
    time.sleep(0.3)
    c = Conn(server.port)
    worker_of(c, 2)
    assert c.request(finished(1, 2)).status == "ok"
    t0 = time.time()
    r = b.recv_reply()
    assert time.time() - t0 < 1.0, "the held query was not answered promptly"
    assert r.seq == 3 and r.winners_page() == (1, 0, ["123"])
    assert server.stop() == 0
    assert len(events(server.log(), "sorteo")) == 1


def test_sigkill_workers_during_ingestion(start_server, workdir):
    server = start_server(args=["--agencies", "3", "--workers", "2"])
    master = server.proc.pid
    acked = set()
    cut = []
    stop = threading.Event()
    lock = threading.Lock()

    def agency(a):
        producer = a * 1000
        while not stop.is_set():
            producer += 1
            try:
                c = Conn(server.port, timeout=10)
                if c.request(hello(1, a, producer_id=producer)).status != "ok":
                    continue
                seq = 1
                while not stop.is_set():
                    for k in range(4):
                        c.send(batch(seq + k, a, [BET] * 20))
                    for k in range(4):
                        r = c.recv_reply()
                        assert r.status == "ok", r
                        with lock:
                            acked.add((a, producer, r.seq))
                    seq += 4
            except (ConnectionError, OSError) as e:
                cut.append(repr(e))
                time.sleep(0.01)

    # Daemon threads, stopped in `finally`: a failure here must not leave
    # them retrying forever and the interpreter waiting for them at exit.
    threads = [threading.Thread(target=agency, args=(a,), daemon=True) for a in (1, 2, 3)]
    for t in threads:
        t.start()
    rng = random.Random(1234)
    kills = 0
    deadline = time.time() + 60
    try:
        while kills < 22 and time.time() < deadline:
            time.sleep(rng.uniform(0.05, 0.25))
            children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
            if not children:
                continue
            try:
                os.kill(int(rng.choice(children)), signal.SIGKILL)
            except ProcessLookupError:
                continue  # it exited (and was reaped) between pgrep and kill
            kills += 1
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert kills >= 20
    assert len(acked) > 0
    assert cut, "no client connection was cut by the kills"
    # The port kept accepting: batches were acknowledged after the last kill.
    assert server.stop() == 0
    log = server.log()
    exits = [e for e in events(log, "worker_exit") if e[2] == "fail"]
    assert len(exits) >= 20 and all("killed by" in e[3]["status"] for e in exits)
    assert len(events(log, "worker_start")) >= 2 + 20
    # Every acknowledged batch is in the store, and the independent reader
    # finds only whole, checksummed entries (it asserts each one).
    stored = {(e["agency"], e["producer"], e["seq"]) for e in segments.read_store(server.data_dir)}
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged batches missing"
    for e in segments.read_store(server.data_dir):
        assert e["count"] == 20 and len(e["bets"]) == 20


def test_agency_client_recovers_from_a_cut_connection(start_server, workdir):
    # Every worker is killed under a running agency client: it reports the
    # cut, reconnects once the master has restarted them, resends what was
    # not acknowledged, and every bet ends up stored once.
    data = os.path.join(workdir, "big")
    datagen(data, "--agencies", "1", "--bets", "200000", "--winners-list", "1", "--seed", "3")
    server = start_server(args=["--agencies", "1", "--workers", "1"])
    proc = run_client(1, server.address(), os.path.join(data, "agency-1.csv"), workdir, wait=False,
                      env={"CLI_BATCH_MAXAMOUNT": "10", "CLI_LOOP_PERIOD": "50ms", "CLI_LOOP_AMOUNT": "100"})
    time.sleep(0.3)
    for child in subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(child), signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
    proc.wait(timeout=120)
    proc.log_file.close()
    log = read(proc.log_path)
    assert proc.returncode == 0, log[-2000:]
    cut = [e for e in events(log, "reconectar") if e[2] == "in_progress"]
    assert cut and cut[0][3].get("error"), log[-2000:]
    assert [e for e in events(log, "reconectar") if e[2] == "success"]
    assert int(events(log, "consulta_ganadores")[-1][3]["cant_ganadores"]) == 1
    assert server.stop() == 0
    stored = segments.read_store(server.data_dir)
    assert sum(e["count"] for e in stored) == 200000
    assert len({(e["agency"], e["producer"], e["seq"]) for e in stored}) == len(stored)


def test_restart_after_draw_keeps_results_and_draws_once(start_server, workdir):
    data_dir = os.path.join(workdir, "data")
    server = start_server(data_dir=data_dir, args=["--agencies", "2"])
    c = send_all(server.port, 1, [BET, ("Eva", "Paz", "777", "1990-01-01", 7574)], producer=1)
    assert c.request(finished(10, 1)).status == "ok"
    d = send_all(server.port, 2, [BET], producer=2)
    assert d.request(finished(10, 2)).status == "ok"
    assert all_winners(c, 1) == ["777"]
    assert server.stop() == 0
    assert len(events(server.log(), "sorteo")) == 1

    again = start_server(data_dir=data_dir, args=["--agencies", "2"])
    c = Conn(again.port)
    ack = c.request(hello(1, 1)).hello_ack()
    assert ack["finished"] and ack["draw_done"] and ack["bets_stored"] == 2
    assert all_winners(c, 1) == ["777"]
    assert c.request(batch(5, 1, [BET])).status == "draw_done"
    d = Conn(again.port)
    assert d.request(hello(1, 2)).status == "ok"
    assert all_winners(d, 2) == []
    assert again.stop() == 0
    assert events(again.log(), "sorteo") == []
    # A different agency count on the same directory is refused clearly.
    with pytest.raises(RuntimeError, match="set up for 2 agencies"):
        start_server(data_dir=data_dir, args=["--agencies", "3"])


def test_close_with_one_agency_missing(start_server, workdir):
    data_dir = os.path.join(workdir, "data")
    server = start_server(data_dir=data_dir, args=["--agencies", "3", "--workers", "2"])
    a = send_all(server.port, 1, [BET, ("Eva", "Paz", "111", "1990-01-01", 7574)], producer=1)
    assert a.request(finished(10, 1)).status == "ok"
    b = send_all(server.port, 2, [("Ana", "Gil", "222", "1991-01-01", 7574)] * 2, producer=2)
    assert b.request(finished(10, 2)).status == "ok"
    late = send_all(server.port, 3, [("Leo", "Sol", "333", "1992-01-01", 7574)], producer=3)
    # Agency 3 never finishes: the operator closes the betting.
    status = lotteryctl(data_dir, "status")
    assert status.returncode == 0 and "1 of 3" not in status.stdout and "2 of 3 agencies finished" in status.stdout
    closed = lotteryctl(data_dir, "close")
    assert closed.returncode == 0, closed.stderr
    assert "closed out" in closed.stdout
    assert all_winners(a, 1) == ["111"]
    assert all_winners(b, 2) == ["222", "222"]
    assert late.request(batch(50, 3, [BET])).status == "betting_closed"
    assert late.request(finished(51, 3)).status == "betting_closed"
    assert late.request(winners(52, 3)).status == "betting_closed"
    winners_out = lotteryctl(data_dir, "winners").stdout
    assert "agency 3: closed out" in winners_out and "111" in winners_out
    assert server.stop() == 0
    log = server.log()
    assert len(events(log, "sorteo")) == 1
    closes = [e for e in events(log, "cierre_apuestas") if e[2] == "success"]
    assert closes and closes[0][3]["agencias_excluidas"] == "3"


def test_close_at_deadline(start_server, workdir):
    at = time.strftime("%H:%M:%S", time.localtime(time.time() + 2))
    server = start_server(args=["--agencies", "2", "--close-at", at])
    a = send_all(server.port, 1, [("Eva", "Paz", "111", "1990-01-01", 7574)], producer=1)
    assert a.request(finished(10, 1)).status == "ok"
    a.send(winners(11, 1))  # held until the deadline's draw
    r = a.recv_reply()
    assert r.winners_page() == (1, 0, ["111"])
    assert server.stop() == 0
    closes = [e for e in events(server.log(), "cierre_apuestas") if e[2] == "success"]
    assert closes and closes[0][3]["reason"] == "deadline"


def test_metrics_and_status_during_a_run(start_server, workdir):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    metrics_port = s.getsockname()[1]
    s.close()
    data_dir = os.path.join(workdir, "data")
    server = start_server(data_dir=data_dir,
                          args=["--agencies", "2", "--workers", "2", "--metrics-address", f"127.0.0.1:{metrics_port}"])
    send_all(server.port, 1, [BET] * 250, producer=1)
    send_all(server.port, 2, [BET] * 50, producer=2)
    body = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{metrics_port}/metrics"], capture_output=True,
                          text=True, timeout=30)
    assert body.returncode == 0, body.stderr
    text = body.stdout
    assert "# TYPE lottery_bets_total counter" in text
    bets = sum(int(line.split()[-1]) for line in text.splitlines() if line.startswith("lottery_bets_total{"))
    assert bets == 300
    assert 'lottery_agency_bets_stored{agency="1"} 250' in text
    assert "lottery_draw_state 0" in text
    status = lotteryctl(data_dir, "status")
    assert status.returncode == 0
    assert "server running" in status.stdout
    assert "0 of 2 agencies finished" in status.stdout
    assert "250" in status.stdout
    assert server.stop() == 0
    after = lotteryctl(data_dir, "status")
    assert "server stopped" in after.stdout and "250" in after.stdout
