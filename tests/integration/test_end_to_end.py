"""The whole flow with real processes: server, agency clients, data files."""
import os
import shutil

import pytest

from conftest import TP0_DIR, datagen, events, read, run_client
import segments

REFERENCE_WINNERS = {1: 2, 2: 3, 3: 3, 4: 2, 5: 0}
REFERENCE_BETS = {1: 26936, 2: 25518, 3: 16014, 4: 9238, 5: 991}


def run_agencies(server, workdir, files, extra_args=(), env=None):
    procs = {a: run_client(a, server.address(), f, workdir, extra_args, env, wait=False) for a, f in files.items()}
    logs = {}
    for agency, proc in procs.items():
        proc.wait(timeout=300)
        proc.log_file.close()
        logs[agency] = read(proc.log_path)
        assert proc.returncode == 0, f"client {agency} exited {proc.returncode}:\n{logs[agency][-3000:]}"
    return logs


def winners_in(log):
    found = events(log, "consulta_ganadores")
    assert len(found) == 1, log[-2000:]
    _, _, result, fields = found[0]
    assert result == "success"
    return int(fields["cant_ganadores"])


@pytest.mark.skipif(not os.path.isdir(TP0_DIR), reason=f"reference data set not found at {TP0_DIR}")
def test_reference_data_set_gives_known_winners(start_server, workdir):
    server = start_server()
    files = {a: os.path.join(TP0_DIR, f"agency-{a}.csv") for a in range(1, 6)}
    logs = run_agencies(server, workdir, files)
    for agency, want in REFERENCE_WINNERS.items():
        assert winners_in(logs[agency]) == want, f"agency {agency}"
    assert server.stop() == 0
    log = server.log()
    draws = events(log, "sorteo")
    assert len(draws) == 1 and draws[0][2] == "success"
    assert int(draws[0][3]["apuestas"]) == 78697
    # One apuesta_recibida per accepted batch, adding up to every bet.
    received = events(log, "apuesta_recibida")
    assert all(r[2] == "success" for r in received)
    assert sum(int(r[3]["cantidad"]) for r in received) == 78697
    # The store itself, read back by an independent reader.
    stored = segments.read_store(server.data_dir)
    per_agency = {}
    for e in stored:
        per_agency[e["agency"]] = per_agency.get(e["agency"], 0) + e["count"]
    assert per_agency == REFERENCE_BETS
    # Every line the server wrote follows the heritage format.
    for line in log.splitlines():
        assert events(line), f"not a heritage log line: {line!r}"


def test_generated_data_with_known_winners(start_server, workdir):
    data = os.path.join(workdir, "gen")
    expected = datagen(data, "--agencies", "3", "--bets-list", "5000,1200,333", "--winners-list", "4,0,7",
                       "--seed", "11")
    server = start_server(args=["--agencies", "3"])
    files = {a: os.path.join(data, f"agency-{a}.csv") for a in range(1, 4)}
    logs = run_agencies(server, workdir, files, extra_args=["--log-level", "DEBUG"])
    for agency in range(1, 4):
        want = expected["agencies"][str(agency)]
        assert winners_in(logs[agency]) == want["winners"]
        # At DEBUG the client names each winner: exactly this agency's.
        docs = sorted(f["dni"] for _, action, _, f in events(logs[agency]) if action == "ganador")
        assert docs == sorted(want["winner_documents"])
    assert server.stop() == 0
    assert len(events(server.log(), "sorteo")) == 1


def test_batches_have_max_amount_except_the_last(start_server, workdir):
    data = os.path.join(workdir, "gen")
    datagen(data, "--agencies", "2", "--bets-list", "1000,77", "--winners-list", "1,1", "--seed", "5")
    server = start_server(args=["--agencies", "2"])
    files = {a: os.path.join(data, f"agency-{a}.csv") for a in (1, 2)}
    run_agencies(server, workdir, files, env={"CLI_BATCH_MAXAMOUNT": "64"})
    assert server.stop() == 0
    by_agency = {1: [], 2: []}
    for _, _, result, fields in events(server.log(), "apuesta_recibida"):
        assert result == "success"
        by_agency[int(fields["agencia"])].append(int(fields["cantidad"]))
    for agency, total in ((1, 1000), (2, 77)):
        sizes = by_agency[agency]
        assert sum(sizes) == total
        assert all(s == 64 for s in sizes[:-1]), sizes
        assert 0 < sizes[-1] <= 64


def test_frame_byte_budget_caps_batches(start_server, workdir):
    # Long names: 128 bets would not fit in 8 KiB, so the byte budget binds.
    data = os.path.join(workdir, "long")
    os.makedirs(data)
    path = os.path.join(data, "agency-1.csv")
    with open(path, "w") as f:
        for i in range(500):
            f.write(f"{'Á' * 40},{'Ñ' * 40},{20000000 + i},1990-01-01,{i}\n")
    server = start_server(args=["--agencies", "1"])
    run_agencies(server, workdir, {1: path})
    assert server.stop() == 0
    for e in segments.read_store(server.data_dir):
        wire = 16 + 4 + sum(9 + len(b[0].encode()) + len(b[1].encode()) + len(b[2]) for b in e["bets"])
        assert wire <= 8192
    assert sum(e["count"] for e in segments.read_store(server.data_dir)) == 500


def test_single_bet_mode_logs_both_sides(start_server, workdir):
    server = start_server(args=["--agencies", "1"])
    env = {"NOMBRE": "Santiago Lionel", "APELLIDO": "Lorca", "DOCUMENTO": "30904465", "NACIMIENTO": "1999-03-17",
           "NUMERO": "7574"}
    proc = run_client(1, server.address(), "/nonexistent.csv", workdir, env=env)
    log = read(proc.log_path)
    assert proc.returncode == 0, log
    sent = events(log, "apuesta_enviada")
    assert len(sent) == 1 and sent[0][3] == {"dni": "30904465", "numero": "7574"} | sent[0][3]
    assert sent[0][3]["dni"] == "30904465" and sent[0][3]["numero"] == "7574"
    assert server.stop() == 0
    stored = events(server.log(), "apuesta_almacenada")
    assert len(stored) == 1
    assert stored[0][3]["dni"] == "30904465" and stored[0][3]["numero"] == "7574"


def test_malformed_csv_line_is_refused_before_sending(start_server, workdir):
    server = start_server(args=["--agencies", "1"])
    path = os.path.join(workdir, "agency-1.csv")
    shutil.copy(os.path.join(TP0_DIR, "agency-5.csv"), path) if os.path.isdir(TP0_DIR) else open(path, "w").write(
        "Ana,Lopez,123,1990-01-01,1\n" * 10)
    with open(path, "a") as f:
        f.write("Juan,Perez,12x45,1990-01-01,10\n")
    lines = sum(1 for _ in open(path, encoding="utf-8"))
    proc = run_client(1, server.address(), path, workdir)
    log = read(proc.log_path)
    assert proc.returncode != 0
    assert f"line: {lines}" in log, log
    assert server.stop() == 0
    assert events(server.log(), "apuesta_recibida") == []
    assert segments.read_store(server.data_dir) == []
