"""Exactly once under fire: workers and whole servers killed while agencies
send, clients killed and run again. Every bet of every file ends up stored
once, and the winners are exact."""
import collections
import csv
import os
import random
import signal
import socket
import subprocess
import time

from conftest import BIN_DIR, Server, datagen, events, read, run_client
import segments


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def file_bets(path):
    with open(path, encoding="utf-8", newline="") as f:
        return collections.Counter(tuple(r) for r in csv.reader(f))


def stored_bets(data_dir):
    by_agency = collections.defaultdict(collections.Counter)
    ids = collections.Counter()
    for e in segments.read_store(data_dir):
        ids[(e["agency"], e["producer"], e["seq"])] += 1
        for first, last, doc, birth, number in e["bets"]:
            by_agency[e["agency"]][(first, last, doc, birth, str(number))] += 1
    return by_agency, ids


CLIENT_ENV = {"CLI_LOOP_AMOUNT": "200", "CLI_LOOP_PERIOD": "50ms"}


def check_store_and_winners(data_dir, data, agencies, expected, logs):
    by_agency, ids = stored_bets(data_dir)
    assert max(ids.values()) == 1, "a batch was stored twice"
    for a in range(1, agencies + 1):
        want = file_bets(os.path.join(data, f"agency-{a}.csv"))
        assert by_agency[a] == want, f"agency {a}: stored bets differ from its file"
        won = events(logs[a], "consulta_ganadores")
        assert won and int(won[-1][3]["cant_ganadores"]) == expected["agencies"][str(a)]["winners"], a


def test_crash_loop_workers_and_whole_server(workdir, request):
    agencies = 4
    data = os.path.join(workdir, "gen")
    expected = datagen(data, "--agencies", str(agencies), "--bets", "250000", "--winners-list", "3,1,0,2",
                       "--seed", "77")
    data_dir = os.path.join(workdir, "data")
    port = free_port()
    args = ["--agencies", str(agencies), "--workers", "2", "--shutdown-grace-ms", "500"]

    live = {}

    def start():
        live["server"] = Server(workdir, data_dir, args, port=port)
        return live["server"]

    def cleanup():
        # A failure in the middle of the loop must not leave a server (or
        # clients) running after the test.
        procs = list(live.get("clients", {}).values())
        if "server" in live:
            procs += [live["server"].proc]
        for proc in procs:
            if proc.poll() is None:
                for child in children(proc.pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.kill()
                proc.wait()

    request.addfinalizer(cleanup)
    server = start()
    assert server.port == port
    clients = {a: run_client(a, f"127.0.0.1:{port}", os.path.join(data, f"agency-{a}.csv"), workdir,
                             env={**CLIENT_ENV, "CLI_BATCH_MAXAMOUNT": "4"}, wait=False)
               for a in range(1, agencies + 1)}
    live["clients"] = clients
    rng = random.Random(2026)
    kills = whole = 0
    deadline = time.time() + 240
    while time.time() < deadline and any(p.poll() is None for p in clients.values()):
        time.sleep(rng.uniform(0.03, 0.15))
        if kills >= 40:
            continue
        if rng.random() < 0.2:
            # The whole server dies at once, as in a machine crash of its
            # processes, and comes back on the same port and data.
            for child in children(server.proc.pid):
                os.kill(child, signal.SIGKILL)
            server.proc.kill()
            server.proc.wait()
            server.log_file.close()
            server = start()
            whole += 1
        else:
            workers = children(server.proc.pid)
            if not workers:
                continue
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
            except ProcessLookupError:
                # pgrep lists a worker killed a moment ago until the master
                # reaps it; reaped in between, it is gone: not a kill.
                continue
        kills += 1
    logs = {}
    for a, p in clients.items():
        p.wait(timeout=120)
        p.log_file.close()
        logs[a] = read(p.log_path)
        assert p.returncode == 0, f"client {a} exited {p.returncode}:\n{logs[a][-3000:]}"
    assert kills >= 30, f"only {kills} kills happened before the clients finished"
    assert whole >= 3
    assert any(events(log, "reconectar") for log in logs.values())
    assert server.stop() == 0
    check_store_and_winners(data_dir, data, agencies, expected, logs)


def test_client_killed_and_run_again_resumes(start_server, workdir):
    data = os.path.join(workdir, "gen")
    # Big enough that a client killed after 0.15-0.35 s is still sending: with
    # group commit off the event loop, 60,000 bets in 5-bet batches were all
    # stored and finished within that time.
    expected = datagen(data, "--agencies", "2", "--bets-list", "400000,3000", "--winners-list", "2,1",
                       "--seed", "8")
    server = start_server(args=["--agencies", "2"])
    path1 = os.path.join(data, "agency-1.csv")
    logs = {}
    for attempt in range(3):
        p = run_client(1, server.address(), path1, workdir, env={**CLIENT_ENV, "CLI_BATCH_MAXAMOUNT": "5"},
                       wait=False)
        time.sleep(0.15 + 0.1 * attempt)
        assert p.poll() is None, "the client finished before it could be killed; use a bigger file"
        p.kill()
        p.wait()
        p.log_file.close()
        assert not events(read(p.log_path), "fin_apuestas"), "the client sent everything before it was killed; use a bigger file"
    # Run to completion; it resumes where the store says its stream ends.
    p = run_client(1, server.address(), path1, workdir, env={**CLIENT_ENV, "CLI_BATCH_MAXAMOUNT": "5"},
                   wait=False)
    q = run_client(2, server.address(), os.path.join(data, "agency-2.csv"), workdir, env=CLIENT_ENV)
    p.wait(timeout=300)
    p.log_file.close()
    logs[1] = read(p.log_path)
    logs[2] = read(q.log_path)
    assert p.returncode == 0, logs[1][-3000:]
    assert q.returncode == 0, logs[2][-3000:]
    resumed = events(logs[1], "reanudar")
    assert resumed and int(resumed[0][3]["apuestas_almacenadas"]) > 0, "\n".join(l for l in logs[1].splitlines() if "batch_enviado" not in l)[:3000]
    # Run again after the draw: it only fetches its winners.
    again = run_client(1, server.address(), path1, workdir, env=CLIENT_ENV)
    log = read(again.log_path)
    assert again.returncode == 0, log
    assert int(events(log, "consulta_ganadores")[-1][3]["cant_ganadores"]) == 2
    assert server.stop() == 0
    check_store_and_winners(server.data_dir, data, 2, expected, logs)
    assert len(events(server.log(), "sorteo")) == 1
