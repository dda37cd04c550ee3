"""Bad input gets a clear error and loses nothing already accepted."""
import os

from conftest import events
from lottery_proto import (BATCH, Conn, batch, batch_body, finished, frame, hello, winners)
import segments

GOOD = ("Ana María", "Núñez", "30111222", "1990-05-17", 1234)


def test_invalid_bet_rejects_whole_batch_and_server_keeps_serving(start_server, workdir):
    server = start_server(args=["--agencies", "2"])
    other = Conn(server.port)
    assert other.request(hello(1, 2)).status == "ok"
    assert other.request(batch(1, 2, [GOOD] * 10)).status == "ok"

    c = Conn(server.port)
    assert c.request(hello(1, 1, producer_id=77)).status == "ok"
    assert c.request(batch(1, 1, [GOOD] * 3)).status == "ok"
    bad = ("Juan", "Pérez", "12A45", "1990-01-01", 10)
    reply = c.request(batch(2, 1, [GOOD, GOOD, bad, GOOD]))
    assert reply.answers == BATCH and reply.seq == 2
    assert reply.status == "invalid_document"
    assert reply.bet_index == 2
    assert "digit" in reply.reason
    # Another kind of bad bet, same connection, still answered. A rejected
    # batch does not use up its seq: the next batch reuses it.
    reply = c.request(batch(2, 1, [("Eva", "Paz", "1", "2999-01-01", 1)]))
    assert reply.status == "invalid_birthdate" and reply.bet_index == 0
    reply = c.request(batch(2, 1, [("Eva", "Paz", "1", "1990-01-01", 10000)]))
    assert reply.status == "invalid_number"
    # Seqs must follow on: a gap is refused, a resend is a duplicate.
    assert c.request(batch(3, 1, [GOOD])).status == "sequence_gap"
    assert c.request(batch(2, 1, [GOOD] * 2)).status == "ok"
    resent = c.request(batch(1, 1, [GOOD] * 3))
    assert resent.status == "ok" and resent.seq == 1

    # The other agency finishes its run meanwhile.
    assert other.request(batch(2, 2, [GOOD] * 5)).status == "ok"
    assert other.request(finished(3, 2)).status == "ok"
    assert c.request(finished(6, 1)).status == "ok"
    page = c.request(winners(7, 1)).winners_page()
    assert page == (0, 0, [])
    assert server.stop() == 0

    log = server.log()
    fails = [e for e in events(log, "apuesta_recibida") if e[2] == "fail"]
    assert len(fails) == 4
    assert fails[0][3]["cantidad"] == "4" and fails[0][3]["code"] == "invalid_document"
    assert fails[0][3]["bet_index"] == "2"
    stored = segments.read_store(server.data_dir)
    assert sorted((e["agency"], e["seq"], e["count"]) for e in stored) == [(1, 1, 3), (1, 2, 2), (2, 1, 10), (2, 2, 5)]
    assert len(events(log, "apuesta_duplicada")) == 1


def test_session_rules(start_server, workdir):
    server = start_server(args=["--agencies", "2"])
    c = Conn(server.port)
    # Bets before hello.
    assert c.request(batch(1, 1, [GOOD])).status == "not_identified"
    assert c.request(hello(2, 9)).status == "invalid_agency"
    assert c.request(hello(3, 1)).status == "ok"
    # Bets or queries for another agency.
    assert c.request(batch(4, 2, [GOOD])).status == "agency_mismatch"
    assert c.request(winners(5, 2)).status == "agency_mismatch"
    assert c.request(finished(6, 2)).status == "agency_mismatch"
    assert c.request(finished(7, 1)).status == "ok"
    # Bets after finished, a second finished.
    assert c.request(batch(8, 1, [GOOD])).status == "agency_finished"
    assert c.request(finished(9, 1)).status == "agency_finished"
    # A winners query before the draw is held, not answered with partial data.
    c.send(winners(10, 1))
    assert not c.is_closed_by_peer(timeout=0.5)
    d = Conn(server.port)
    assert d.request(hello(1, 2)).status == "ok"
    assert d.request(batch(1, 2, [("Eva", "Paz", "5", "1990-01-01", 7574)])).status == "ok"
    assert d.request(finished(3, 2)).status == "ok"
    reply = c.recv_reply()
    assert reply.seq == 10 and reply.winners_page() == (0, 0, [])
    assert d.request(winners(4, 2)).winners_page() == (1, 0, ["5"])
    # After the draw: no more bets.
    assert d.request(batch(5, 2, [GOOD])).status == "draw_done"
    assert server.stop() == 0
    assert len(events(server.log(), "sorteo")) == 1


def test_framing_errors_close_only_that_connection(start_server, workdir):
    server = start_server(args=["--agencies", "1"])
    keeper = Conn(server.port)
    assert keeper.request(hello(1, 1)).status == "ok"
    cases = [
        (frame(BATCH, 1, b"x" * 10, crc=123), "bad_checksum"),
        (frame(BATCH, 1, b"", length=70000), "frame_too_large"),
        (frame(BATCH, 1, b"", version=9), "bad_frame"),
        (frame(BATCH, 1, b"", flags=1), "bad_frame"),
        (frame(0x42, 1, b""), "unknown_type"),
        (frame(BATCH, 1, b"", length=3), "bad_frame"),
    ]
    for data, status in cases:
        c = Conn(server.port)
        reply = c.request(data)
        assert reply.status == status, (data[:16], reply)
        assert c.is_closed_by_peer()
    # Truncated batch body: rejected, connection kept.
    c = Conn(server.port)
    assert c.request(hello(1, 1, producer_id=2)).status == "ok"
    body = batch_body(1, [GOOD])
    assert c.request(frame(BATCH, 1, body[:-3])).status == "malformed_body"
    assert c.request(frame(BATCH, 1, batch_body(1, [GOOD], count=2))).status == "malformed_body"
    assert c.request(batch(1, 1, [GOOD])).status == "ok"
    assert keeper.request(batch(1, 1, [GOOD])).status == "ok"
    assert server.stop() == 0
    assert sum(e["count"] for e in segments.read_store(server.data_dir)) == 2


def test_frames_split_at_every_byte(start_server, workdir):
    server = start_server(args=["--agencies", "1"])
    c = Conn(server.port)
    data = hello(0, 1) + batch(1, 1, [GOOD] * 3) + batch(2, 1, [GOOD])
    for i in range(len(data)):
        c.send(data[i:i + 1])
    replies = [c.recv_reply() for _ in range(3)]
    assert [(r.seq, r.status) for r in replies] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert server.stop() == 0
    assert sum(e["count"] for e in segments.read_store(server.data_dir)) == 4
