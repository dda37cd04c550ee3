"""A second, independent implementation of protocol v1 (docs/PROTOCOL.md) for
tests: raw clients that send exactly the bytes a test wants, good or bad."""
import socket
import struct

HEADER = struct.Struct("<IBBHII")  # length, version, type, flags, seq, crc32c
VERSION = 1
BATCH, FINISHED, WINNERS, HELLO = 1, 2, 3, 4
REPLY_BIT = 0x80
CONNECTION_ERROR = 0xFF

STATUS = {
    0: "ok", 1: "bad_frame", 2: "frame_too_large", 3: "bad_checksum", 4: "unknown_type", 5: "malformed_body",
    10: "invalid_agency", 11: "invalid_name", 12: "invalid_document", 13: "invalid_birthdate",
    14: "invalid_number", 15: "too_many_bets", 20: "not_identified", 21: "agency_mismatch",
    22: "agency_finished", 23: "draw_done", 24: "not_ready", 25: "betting_closed", 30: "storage_error",
    31: "storage_full", 32: "shutting_down", 33: "too_many_connections", 26: "sequence_gap", 27: "producer_busy",
    34: "handshake_timeout", 35: "idle_timeout", 28: "not_your_agency", 29: "tls_required",
}


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def frame(msg_type: int, seq: int, body: bytes, *, version=VERSION, flags=0, crc=None, length=None) -> bytes:
    if crc is None:
        crc = crc32c(body)
    if length is None:
        length = HEADER.size + len(body)
    return HEADER.pack(length, version, msg_type, flags, seq, crc) + body


def encode_bet(first, last, document, birthdate, number) -> bytes:
    y, m, d = (int(x) for x in birthdate.split("-"))
    fb, lb, db = first.encode(), last.encode(), document.encode()
    return struct.pack("<HHBBBBB", number, y, m, d, len(db), len(fb), len(lb)) + db + fb + lb


def batch_body(agency: int, bets, count=None) -> bytes:
    encoded = b"".join(encode_bet(*b) if isinstance(b, tuple) else b for b in bets)
    return struct.pack("<HH", agency, len(bets) if count is None else count) + encoded


def hello(seq, agency, producer_id=1):
    return frame(HELLO, seq, struct.pack("<HHQ", agency, 0, producer_id))


def batch(seq, agency, bets):
    return frame(BATCH, seq, batch_body(agency, bets))


def finished(seq, agency):
    return frame(FINISHED, seq, struct.pack("<HH", agency, 0))


def winners(seq, agency, start=0):
    return frame(WINNERS, seq, struct.pack("<HHI", agency, 0, start))


class Reply:
    def __init__(self, msg_type, seq, body):
        self.type = msg_type
        self.seq = seq
        self.answers = msg_type if msg_type == CONNECTION_ERROR else msg_type & ~REPLY_BIT
        self.status_code = struct.unpack_from("<H", body)[0]
        self.status = STATUS.get(self.status_code, str(self.status_code))
        self.body = body
        self.bet_index = None
        self.reason = None
        if self.status_code != 0:
            self.bet_index, n = struct.unpack_from("<HH", body, 2)
            self.reason = body[6:6 + n].decode()

    def winners_page(self):
        total, start, count = struct.unpack_from("<III", self.body, 2)
        docs, p = [], 14
        for _ in range(count):
            n = self.body[p]
            docs.append(self.body[p + 1:p + 1 + n].decode())
            p += 1 + n
        return total, start, docs

    def hello_ack(self):
        agency, flags, worker, stored_seq, producer_bets, bets = struct.unpack_from("<HHHQQQ", self.body, 2)
        return {"agency": agency, "finished": bool(flags & 1), "draw_done": bool(flags & 2),
                "stored_seq": stored_seq, "producer_bets": producer_bets, "bets_stored": bets, "worker": worker}

    def __repr__(self):
        return f"Reply(type={self.type:#x}, seq={self.seq}, status={self.status}, reason={self.reason})"


class Conn:
    def __init__(self, port, host="127.0.0.1", timeout=20.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv_reply(self) -> Reply:
        while True:
            if len(self.buf) >= HEADER.size:
                length, version, msg_type, flags, seq, crc = HEADER.unpack_from(self.buf)
                if len(self.buf) >= length:
                    body = self.buf[HEADER.size:length]
                    self.buf = self.buf[length:]
                    assert version == VERSION and flags == 0
                    assert crc32c(body) == crc, "reply checksum mismatch"
                    return Reply(msg_type, seq, body)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def request(self, data: bytes) -> Reply:
        self.send(data)
        return self.recv_reply()

    def is_closed_by_peer(self, timeout=5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()
