"""Durability policies, and a full disk."""
import os
import subprocess
import tempfile

import pytest

from conftest import BIN_DIR, events
from lottery_proto import Conn, batch, hello
import segments

BET = ("Luz", "Álvarez", "40111222", "1985-11-15", 42)


def worker_counters(data_dir):
    out = subprocess.run([os.path.join(BIN_DIR, "lotteryctl"), "--data-dir", data_dir, "status"],
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("WORKER"))
    cols = lines[head].split()
    rows = []
    for line in lines[head + 1:]:
        if not line.strip():
            break
        values = line.split()
        # "CONNS OPEN" and "CONNS TOTAL" are two-word headers.
        names = ["WORKER", "PID", "UP", "RESTARTS", "CONNS_OPEN", "CONNS_TOTAL", "BATCHES", "BETS", "ERRORS",
                 "SYNCS", "DUPLICATES"]
        assert len(cols) == len(names) + 2
        rows.append({n: v.replace(",", "") for n, v in zip(names, values)})
    return rows


@pytest.mark.parametrize("mode", ["none", "group", "always"])
def test_syncs_per_policy(start_server, workdir, mode):
    data_dir = os.path.join(workdir, "data")
    server = start_server(data_dir=data_dir,
                          args=["--agencies", "1", "--workers", "1", "--durability", mode, "--group-batches", "16",
                                "--group-window-ms", "50"])
    c = Conn(server.port)
    assert c.request(hello(0, 1)).status == "ok"
    # 64 batches pipelined in one send: group commit gathers them, always
    # syncs once per event-loop iteration for all the batches it received.
    c.send(b"".join(batch(seq, 1, [BET] * 10) for seq in range(1, 65)))
    replies = [c.recv_reply() for _ in range(64)]
    assert [r.seq for r in replies] == list(range(1, 65)) and all(r.status == "ok" for r in replies)
    row = worker_counters(data_dir)[0]
    syncs = int(row["SYNCS"])
    assert int(row["BATCHES"]) == 64
    if mode == "none":
        assert syncs == 0
    elif mode == "always":
        # They arrive in one or a few reads, so in far fewer iterations than 64.
        assert 1 <= syncs <= 16, syncs
    else:
        # One sync per group of at most 16 batches (or per 50 ms window).
        assert 4 <= syncs <= 16, syncs
    assert server.stop() == 0
    assert sum(e["count"] for e in segments.read_store(data_dir)) == 640


def can_mount_tmpfs():
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs is not allowed here: {r.stderr.strip()}"
        subprocess.run(["umount", d])
    return None


@pytest.fixture
def small_fs(workdir):
    why = can_mount_tmpfs()
    if why:
        pytest.skip(why)
    mnt = os.path.join(workdir, "small")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], check=True)
    yield mnt
    subprocess.run(["umount", "-l", mnt])


def test_disk_full_refuses_clearly_loses_nothing_and_recovers(start_server, small_fs):
    data_dir = os.path.join(small_fs, "data")
    server = start_server(data_dir=data_dir,
                          args=["--agencies", "1", "--workers", "1", "--segment-bytes", str(1 << 20)])
    # Leave about 1.5 MiB free: the first segment fills, the second cannot be
    # allocated.
    st = os.statvfs(small_fs)
    free = st.f_bavail * st.f_frsize
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\xff" * max(0, free - (1 << 20) - (512 << 10)))
    c = Conn(server.port)
    assert c.request(hello(0, 1)).status == "ok"
    acked, seq, full = 0, 1, None
    for _ in range(2000):
        r = c.request(batch(seq, 1, [BET] * 100))
        if r.status != "ok":
            full = r
            break
        acked += 100
        seq += 1
    assert full is not None and full.status == "storage_full", full
    assert "storage full" in full.reason
    # The server keeps answering, and the same batch is refused again while the disk is full.
    assert c.request(batch(seq, 1, [BET] * 100)).status == "storage_full"
    assert sum(e["count"] for e in segments.read_store(data_dir)) == acked
    os.unlink(filler)
    # Space is back: the same seq is stored now, and more after it.
    assert c.request(batch(seq, 1, [BET] * 100)).status == "ok"
    assert c.request(batch(seq + 1, 1, [BET] * 100)).status == "ok"
    assert server.stop() == 0
    assert sum(e["count"] for e in segments.read_store(data_dir)) == acked + 200
    log = server.log()
    fails = [e for e in events(log, "apuesta_recibida") if e[2] == "fail"]
    assert fails and fails[0][3]["code"] == "storage_full"
