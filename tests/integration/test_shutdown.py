"""SIGTERM during ingestion: exit 0, and a restart loses no acknowledged bet."""
import os
import signal
import threading
import time

from conftest import events
from lottery_proto import Conn, batch, hello
import segments

BET = ("Luz", "Álvarez", "40111222", "1985-11-15", 42)


def test_sigterm_during_ingestion_loses_no_acknowledged_bet(start_server, workdir):
    data_dir = os.path.join(workdir, "data")
    server = start_server(data_dir=data_dir, args=["--agencies", "3"])
    acked = {1: [], 2: [], 3: []}
    errors = []

    def agency(a):
        try:
            c = Conn(server.port)
            assert c.request(hello(1, a, producer_id=a)).status == "ok"
            seq = 1
            while True:
                # Pipelined: several batches in flight, acks recorded as they come.
                for k in range(4):
                    c.send(batch(seq + k, a, [BET] * 50))
                for k in range(4):
                    r = c.recv_reply()
                    if r.status != "ok":
                        return
                    acked[a].append(r.seq)
                seq += 4
        except (ConnectionError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=agency, args=(a,)) for a in acked]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert server.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(timeout=30)
    assert not errors
    log = server.log()
    for step in ("shutdown", "listener_closed", "connections_closed", "store_closed", "exit"):
        assert events(log, step), f"missing {step} in log"
    assert sum(len(v) for v in acked.values()) > 0

    stored = {(e["agency"], e["seq"]) for e in segments.read_store(data_dir)}
    for a, seqs in acked.items():
        for s in seqs:
            assert (a, s) in stored, f"acknowledged batch {a}/{s} missing"

    # Restart on the same directory: everything is still there, and new bets
    # append after it.
    again = start_server(data_dir=data_dir, args=["--agencies", "3"])
    opened = events(again.log(), "store_open")
    assert sum(int(e[3]["bets"]) for e in opened) == 50 * len(stored)
    c = Conn(again.port)
    assert c.request(hello(1, 1, producer_id=99)).status == "ok"
    assert c.request(batch(1, 1, [BET])).status == "ok"
    assert again.stop() == 0
    assert len(segments.read_store(data_dir)) == len(stored) + 1
