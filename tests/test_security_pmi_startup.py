"""The PMI server's start-up window: no guessable id left (ranks prove a 256-bit id in Python and
hand MPICH the socket), a first line trickled byte by byte is cut off at one deadline, a
non-ASCII token is refused without killing anything, a host name resolving to loopback is an
error instead of a bind to every interface, and a rank stopped during MPI_Init fails the
barrier on every other rank with its name instead of a silent hang."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from collectives.backends.mpi import pmi
from tests.support.harness import RankFailure, spawn


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, ConnectionResetError):
        return False


@pytest.mark.timeout(60)
def test_ids_are_not_guessable_and_the_first_line_has_one_deadline():
    proc, port, ids, token = pmi.spawn(2, "127.0.0.1", "(vector,(0,1,2))", stderr=subprocess.PIPE)
    try:
        assert all(len(i) == 64 for i in ids)  # 256 bits, not MPICH's 31-bit atoi range
        # A slow stranger: one byte of a plausible first line every second never gets a full line in.
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        closed = False
        for b in b"cmd=initack pmiid=" + b"1" * 30:
            try:
                slow.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            time.sleep(1.0)
            if time.monotonic() - t0 > pmi.HELLO_TIMEOUT + 5:
                break
        closed = closed or _closed_within(slow, 2)
        assert closed and time.monotonic() - t0 < pmi.HELLO_TIMEOUT + 6, "a trickled line kept its connection"
        # A non-ASCII token in our own report: refused, the server goes on.
        bad = socket.create_connection(("127.0.0.1", port), timeout=5)
        bad.sendall("cmd=collectives_segments token=\u00e9\u00e9\u00e9 paths=/dev/shm/x\n".encode())
        assert _closed_within(bad, 5)
        # The ranks still get in, each with its own id, proven in Python.
        fds = [pmi.connect_rank(f"127.0.0.1:{port}", pmi_id, r, 10) for r, pmi_id in enumerate(ids)]
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.sendall(b"cmd=finalize\n")
            assert b"finalize_ack" in s.recv(256)
            s.close()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert b"Traceback" not in err, err[-2000:]
        assert err.count(b"rejected connection") >= 2, err
    finally:
        proc.kill()


@pytest.mark.unit
def test_a_host_name_on_loopback_is_an_error_not_every_interface():
    assert pmi.bind_address("anything", local=True) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="other hosts cannot reach"):
        pmi.bind_address("localhost", local=False)
    with pytest.raises(RuntimeError, match="cannot resolve|not an address of this machine"):
        pmi.bind_address("192.0.2.254", local=False)


@pytest.mark.timeout(120)
def test_a_rank_stopped_during_mpi_init_fails_the_job_naming_it():
    pytest.importorskip("mpi4py")
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn("tests.cases.pmi_stall:stop_in_mpi_init", 3, args={"stalled": 2, "timeout": 8}, timeout=90)
    took = time.monotonic() - t0
    out = failure.value.outputs[0]
    assert "MPI start-up did not finish" in out and "rank 2 (127.0.0.1:" in out, out[-3000:]
    assert "did not arrive: last PMI request 'initack'" in out, out[-3000:]
    assert took < 80, f"took {took:.0f}s"
