"""Fixtures that run the real binaries as processes on loopback."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

SOURCE_DIR = os.environ.get("LOTTERY_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
BIN_DIR = os.environ.get("LOTTERY_BIN_DIR", os.path.join(SOURCE_DIR, "build", "bin"))
TP0_DIR = os.path.abspath(os.path.join(SOURCE_DIR, "..", "shared", "data", "tp0"))

LOG_LINE = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} (DEBUG|INFO|WARNING|ERROR|CRITICAL) action: ([a-z_]+) \| "
    r"result: (success|fail|in_progress)((?: \| [^|:]+: [^|]*)*)$")


def parse_log_line(line):
    """Parses a heritage log line into (level, action, result, fields) or None."""
    m = LOG_LINE.match(line.rstrip("\n"))
    if not m:
        return None
    fields = {}
    for part in m.group(4).split(" | ")[1:]:
        key, _, value = part.partition(": ")
        fields[key] = value
    return m.group(1), m.group(2), m.group(3), fields


def events(text, action=None):
    out = []
    for line in text.splitlines():
        parsed = parse_log_line(line)
        if parsed and (action is None or parsed[1] == action):
            out.append(parsed)
    return out


class Server:
    def __init__(self, workdir, data_dir, args=(), env=None, port=0):
        self.workdir = workdir
        self.data_dir = data_dir
        self.log_path = os.path.join(workdir, f"server-{int(time.time() * 1e6)}.log")
        self.log_file = open(self.log_path, "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [os.path.join(BIN_DIR, "lottery-server"), "--ip", "127.0.0.1", "--port", str(port), "--data-dir", data_dir,
             *args],
            cwd=workdir, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env)
        self.port = self._wait_for_port()

    def _wait_for_port(self):
        deadline = time.time() + 20
        while time.time() < deadline:
            for _, _, result, fields in events(self.log(), "listen"):
                if result == "success" and "port" in fields:
                    return int(fields["port"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError("server did not report its port:\n" + self.log())

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log_file.close()

    def address(self):
        return f"127.0.0.1:{self.port}"


def io_uring_refusal():
    """Why this machine cannot run io_uring, or None. Asks the kernel the
    way the server does: io_uring_setup(2)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 4, params)  # __NR_io_uring_setup on x86-64
    if fd >= 0:
        os.close(fd)
        return None
    return f"io_uring_setup failed: {os.strerror(ctypes.get_errno())}"


@pytest.fixture(autouse=True)
def _backend_available():
    if os.environ.get("SERVER_IO") in ("uring", "io_uring"):
        why = io_uring_refusal()
        if why:
            pytest.skip(f"SERVER_IO=uring but {why}")


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="lottery-it-") as d:
        yield d


@pytest.fixture
def start_server(workdir):
    servers = []

    def start(data_dir=None, args=(), env=None):
        s = Server(workdir, data_dir or os.path.join(workdir, "data"), args, env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def run_client(agency, address, data_file, workdir, extra_args=(), env=None, timeout=300, wait=True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLI_")}
    full_env.update({"CLI_ID": str(agency), "CLI_SERVER_ADDRESS": address, "CLI_DATA_FILE": data_file})
    full_env.update(env or {})
    log_path = os.path.join(workdir, f"client{agency}-{int(time.time() * 1e6)}.log")
    log_file = open(log_path, "w")
    proc = subprocess.Popen([os.path.join(BIN_DIR, "lottery-client"), *extra_args], cwd=workdir,
                            stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    proc.log_path = log_path
    proc.log_file = log_file
    if wait:
        proc.wait(timeout=timeout)
        log_file.close()
    return proc


def read(path):
    with open(path) as f:
        return f.read()


def datagen(out_dir, *args):
    subprocess.run([os.path.join(BIN_DIR, "lottery-datagen"), "--out-dir", out_dir, *args], check=True,
                   stdout=subprocess.DEVNULL)
    import json
    with open(os.path.join(out_dir, "expected.json")) as f:
        return json.load(f)
