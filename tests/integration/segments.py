"""Reads store segments per docs/STORAGE.md, independently of the C++ reader,
so tests check the on-disk contract itself."""
import glob
import os
import struct

from lottery_proto import crc32c

SEGMENT_MAGIC = b"LOTSEG\x00\x01"
SEGMENT_HEADER = 64
ENTRY_HEADER = 40
ENTRY_MAGIC = 0x31544542
SKIP_MAGIC = 0x31504B53  # a checksummed record over bytes --repair found damaged


def entry_size(payload):
    return (ENTRY_HEADER + payload + 7) & ~7


def decode_bets(payload, count):
    bets, p = [], 0
    for _ in range(count):
        number, year, month, day, dl, fl, ll = struct.unpack_from("<HHBBBBB", payload, p)
        p += 9
        doc = payload[p:p + dl].decode()
        first = payload[p + dl:p + dl + fl].decode()
        last = payload[p + dl + fl:p + dl + fl + ll].decode()
        p += dl + fl + ll
        bets.append((first, last, doc, f"{year:04d}-{month:02d}-{day:02d}", number))
    assert p == len(payload)
    return bets


def read_segment(path):
    """Returns (entries, tail_state): entries are dicts; tail_state is 'clean' or a reason."""
    data = open(path, "rb").read()
    assert data[:8] == SEGMENT_MAGIC, f"{path}: bad magic"
    assert struct.unpack_from("<I", data, 60)[0] == crc32c(data[:60]), f"{path}: header checksum"
    entries, off = [], SEGMENT_HEADER
    while len(data) - off >= ENTRY_HEADER:
        head = data[off:off + ENTRY_HEADER]
        if head == bytes(ENTRY_HEADER):
            return entries, "clean"
        crc, payload_len, magic, agency, count, producer, seq, _ = struct.unpack_from("<IIIHHQQQ", data, off)
        if magic not in (ENTRY_MAGIC, SKIP_MAGIC) or off + entry_size(payload_len) > len(data):
            return entries, f"bad entry at {off}"
        if crc != crc32c(data[off + 4:off + ENTRY_HEADER + payload_len]):
            return entries, f"checksum mismatch at {off}"
        if magic == SKIP_MAGIC:
            off += entry_size(payload_len)
            continue
        payload = data[off + ENTRY_HEADER:off + ENTRY_HEADER + payload_len]
        entries.append({"agency": agency, "count": count, "producer": producer, "seq": seq,
                        "bets": decode_bets(payload, count), "offset": off})
        off += entry_size(payload_len)
    return entries, "clean"


def read_store(data_dir):
    entries = []
    for path in sorted(glob.glob(os.path.join(data_dir, "segment-w*-*.lseg"))):
        segment_entries, _ = read_segment(path)
        entries.extend(segment_entries)
    return entries
