#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<name>/).

Real traffic: a lottery-server and a lottery-client run on loopback through a
recording proxy, so the frame and session seeds are the bytes the real client
and server exchange. To those it adds the malformed frames of the violations
table (docs/PROTOCOL.md) and the bad bets of the unit tests, and for the CSV
reader slices of generated agency files plus the corner cases of its tests.

    tests/fuzz/make_corpus.py [--bin-dir build/bin]

Seeds are named by content (a short hash), so running it again adds what is
new and never duplicates. Crash inputs found later are added by hand as
crash-<what> (see docs/SECURITY.md)."""
import argparse
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from lottery_proto import (BATCH, FINISHED, HELLO, WINNERS, batch, batch_body, encode_bet, finished,  # noqa: E402
                           frame, hello, winners)

CORPUS = os.path.join(HERE, "corpus")
GOOD = ("Ana María", "Núñez", "30111222", "1990-05-17", 1234)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}-{hashlib.sha1(data).hexdigest()[:10]}")
    with open(path, "wb") as f:
        f.write(data)


class Recorder:
    """A TCP proxy that keeps every byte in each direction."""

    def __init__(self, upstream_port):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.upstream_port = upstream_port
        self.sessions = []  # (client bytes, server bytes) per connection
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            record = [bytearray(), bytearray()]
            self.sessions.append(record)
            threading.Thread(target=self._pump, args=(client, server, record[0]), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, record[1]), daemon=True).start()

    @staticmethod
    def _pump(src, dst, record):
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            record += chunk
            try:
                dst.sendall(chunk)
            except OSError:
                return


def record_traffic(bin_dir):
    """Client and server bytes of a real run: two agencies, small batches."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "gen")
        subprocess.run([os.path.join(bin_dir, "lottery-datagen"), "--out-dir", data, "--agencies", "2",
                        "--bets-list", "60,25", "--winners-list", "3,1", "--seed", "21"],
                       check=True, stdout=subprocess.DEVNULL)
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen([os.path.join(bin_dir, "lottery-server"), "--ip", "127.0.0.1", "--port", "0",
                                   "--data-dir", os.path.join(tmp, "data"), "--agencies", "2", "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            port = None
            for _ in range(500):
                with open(log.name) as f:
                    for line in f:
                        if "action: listen" in line and "port: " in line:
                            port = int(line.split("port: ")[1].split()[0])
                if port:
                    break
                time.sleep(0.02)
            proxy = Recorder(port)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CLI_")}
            clients = []
            for agency in (1, 2):
                env_a = dict(env, CLI_ID=str(agency), CLI_SERVER_ADDRESS=f"127.0.0.1:{proxy.port}",
                             CLI_DATA_FILE=os.path.join(data, f"agency-{agency}.csv"), CLI_BATCH_MAXAMOUNT="16")
                clients.append(subprocess.Popen([os.path.join(bin_dir, "lottery-client")], env=env_a,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for c in clients:
                c.wait(timeout=60)
            time.sleep(0.3)
        finally:
            server.terminate()
            server.wait()
        agency_files = [open(os.path.join(data, f"agency-{a}.csv"), "rb").read() for a in (1, 2)]
        return [(bytes(c), bytes(s)) for c, s in proxy.sessions], agency_files


def split_frames(stream):
    out = []
    while len(stream) >= 16:
        n = struct.unpack_from("<I", stream)[0]
        if n < 16 or n > len(stream):
            break
        out.append(stream[:n])
        stream = stream[n:]
    return out


def error_table_frames():
    """The malformed frames of docs/PROTOCOL.md's violations table."""
    bet = encode_bet(*GOOD)
    return {
        "short_length": frame(BATCH, 1, b"", length=3),
        "oversized_frame": frame(BATCH, 1, b"", length=70000),
        "bad_version": frame(BATCH, 1, b"", version=9),
        "bad_flags": frame(BATCH, 1, b"", flags=1),
        "bad_checksum": frame(BATCH, 1, batch_body(1, [GOOD]), crc=7),
        "unknown_type": frame(0x42, 1, b"\0\0\0\0"),
        "hello_wrong_size": frame(HELLO, 1, b"\x01\x00\x00\x00"),
        "finished_wrong_size": frame(FINISHED, 2, b"\x01\x00"),
        "winners_wrong_size": frame(WINNERS, 2, b"\x01\x00\x00\x00"),
        "batch_truncated_header": frame(BATCH, 2, b"\x01\x00\x01"),
        "bet_truncated": frame(BATCH, 2, struct.pack("<HH", 1, 2) + bet + bet[:5]),
        "field_overflow": frame(BATCH, 2, struct.pack("<HH", 1, 1) + bet[:8] + b"\xff" + bet[9:]),
        "trailing_bytes": frame(BATCH, 2, batch_body(1, [GOOD]) + b"\0"),
        "zero_bets": frame(BATCH, 2, struct.pack("<HH", 1, 0)),
        "invalid_utf8": batch(2, 1, [encode_bet("Ana", "Paz", "1", "1990-01-01", 1).replace(b"Ana", b"A\xc3\x28")]),
        "name_too_long": batch(2, 1, [("A" * 101, "Paz", "1", "1990-01-01", 1)]),
        "surrogate": batch(2, 1, [encode_bet("Ana", "Paz", "1", "1990-01-01", 1).replace(b"Ana", b"\xed\xa0\x80")]),
        "overlong": batch(2, 1, [encode_bet("Ana", "Paz", "1", "1990-01-01", 1).replace(b"Ana", b"\xc0\xafA")]),
        "bad_document": batch(2, 1, [("Ana", "Paz", "12a", "1990-01-01", 1)]),
        "bad_birthdate": batch(2, 1, [("Ana", "Paz", "1", "1990-02-29", 1)]),
        "bad_number": batch(2, 1, [("Ana", "Paz", "1", "1990-01-01", 10000)]),
        "other_agency": batch(2, 2, [GOOD]),
        "sequence_gap": batch(9, 1, [GOOD]),
        "second_finished": finished(3, 1) + finished(4, 1),
        "second_winners": winners(5, 1) + winners(6, 1),
        "other_winners": winners(5, 2),
    }


def csv_corner_cases():
    return {
        "bom_crlf": b"\xef\xbb\xbfAna,Paz,123,1990-01-02,7\r\nEva,Ruiz,45,1985-12-31,9999\r\n",
        "blank_lines": b"\n\nAna,Paz,123,1990-01-02,7\n  \n\t\nEva,Ruiz,45,1985-12-31,0\n",
        "no_final_newline": b"Ana,Paz,123,1990-01-02,7",
        "utf8_names": "José María,Núñez Ñandú,30111222,1990-05-17,42\n".encode(),
        "bad_date": b"Ana,Paz,123,1990-02-30,7\n",
        "bad_number": b"Ana,Paz,123,1990-01-02,10000\n",
        "too_many_fields": b"Ana,Paz,123,1990-01-02,7,8\n",
        "too_few_fields": b"Ana,Paz,123\n",
        "bad_utf8": b"Ana\xc3,Paz,123,1990-01-02,7\n",
        "control_char": b"An\x01a,Paz,123,1990-01-02,7\n",
        "long_document": b"Ana,Paz,12345678901,1990-01-02,7\n",
        "cr_only": b"Ana,Paz,123,1990-01-02,7\rEva,Ruiz,45,1985-12-31,9\r",
        "leading_zero_number": b"Ana,Paz,0123,1990-01-02,0042\n",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    args = ap.parse_args()
    sessions, agency_files = record_traffic(args.bin_dir)
    assert sessions, "nothing recorded"
    for i, (client_bytes, server_bytes) in enumerate(sessions):
        # Whole conversations, as streams.
        write("frame_decoder", f"traffic_client{i}", client_bytes)
        write("frame_decoder", f"traffic_server{i}", server_bytes)
        for prefix in (b"\x00\x03", b"\x07\x06", b"\x2a\x07"):  # 7-byte, 4 KiB and 64 KiB packets
            write("session", f"traffic_client{i}", prefix + client_bytes)
        for f in split_frames(client_bytes)[:6]:
            if f[5] == BATCH:
                write("bet_validator", "traffic_batch", b"\x01" + f[16:])
        for f in split_frames(server_bytes)[:6]:
            write("frame_decoder", "traffic_reply", f)
    hello_then = hello(1, 1, 99)
    for name, data in error_table_frames().items():
        write("frame_decoder", f"error_{name}", data)
        write("session", f"error_{name}", b"\x05\x03" + hello_then + data)
        if data[5] == BATCH and len(data) > 16:
            write("bet_validator", f"error_{name}", b"\x00" + data[16:])
    for name, data in csv_corner_cases().items():
        write("csv_reader", name, data)
    for i, text in enumerate(agency_files):
        write("csv_reader", f"agency{i + 1}_head", b"\n".join(text.split(b"\n")[:12]) + b"\n")
    print("corpus written under", CORPUS)


if __name__ == "__main__":
    main()
