"""A real SLURM on this host for tests: munge, slurmctld and N slurmd "nodes" in a temp dir.

    # the slurm_cluster fixture (session scope) is in tests/conftest.py

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(script_path)
        slurm_cluster.wait_state(job, {"COMPLETED"}, timeout=120)

Each node declares ``cpus`` CPUs whatever the host has (``SlurmdParameters=config_overrides``),
so several small test jobs run side by side. Every node is ``localhost`` on its own slurmd
port (``NodeName=nK NodeHostname=localhost NodeAddr=127.0.0.1``); the daemons run as root
with a private munge socket and key, ports picked free, state under the temp dir; clients
find the cluster through ``SLURM_CONF`` (set in ``cluster.env``, inherited by jobs).
Teardown cancels every job, stops the daemons by pid, kills any process that still carries
this cluster's ``SLURM_CONF`` (job steps), and removes the directory, also after a
failure. Skips only when SLURM or munge binaries are missing (or we are not root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    found = [b for b in BINARIES if shutil.which(b) or os.path.exists(f"/usr/sbin/{b}")]
    return [b for b in BINARIES if b not in found]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, nodes: int = 2, cpus: int = 4):
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.dir = tempfile.mkdtemp(prefix="dt-slurm-")
        os.chmod(self.dir, 0o755)  # munged checks the path to its socket
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]  # never leak an outer job's variables into ours
        self.procs: list[subprocess.Popen] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        d = self.dir
        munge = os.path.join(d, "munge")
        os.makedirs(munge)
        shutil.chown(munge, "munge", "munge")
        os.chmod(munge, 0o755)
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(d, sub))
        sock, key = os.path.join(munge, "sock"), os.path.join(munge, "munge.key")
        with open(key, "wb") as f:  # a private key: no dependence on /etc/munge or a system munged
            f.write(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
        self._spawn(
            [
                _exe("munged"),
                "-F",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={munge}/pid",
                f"--log-file={munge}/log",
                f"--seed-file={munge}/seed",
            ],
            "munged",
            user="munge",
        )
        self._wait(lambda: os.path.exists(sock), 10, "munged socket")
        ctld_port = _free_port()
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} "
            "RealMemory=2000 State=UNKNOWN"
            for n in self.nodes
        )
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=dttest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=10
SlurmdParameters=config_overrides
MinJobAge=600
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", self.conf], "slurmctld")
        for n in self.nodes:
            self._spawn([_exe("slurmd"), "-D", "-f", self.conf, "-N", n], f"slurmd-{n}")
        self._wait(self._all_idle, timeout, "nodes idle")
        return self

    def _spawn(self, argv: list[str], name: str, user: str | None = None) -> None:
        out = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        self.procs.append(
            subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
            )
        )
        out.close()

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:g}s:\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[0::2], out[1::2]))
        return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())

    def logs(self, tail: int = 30) -> str:
        parts = []
        for root, _, files in os.walk(os.path.join(self.dir, "log")):
            for fn in sorted(files):
                with open(os.path.join(root, fn), errors="replace") as f:
                    lines = f.read().splitlines()[-tail:]
                parts.append(f"--- {fn}\n" + "\n".join(lines))
        return "\n".join(parts)

    def close(self) -> None:
        try:
            if any(p.poll() is None for p in self.procs[1:2]):
                self.run(["scancel", "--full", "--user", "root"], check=False, timeout=20)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline and self.run(["squeue", "-h"], check=False, timeout=20).stdout.strip()
                ):
                    time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for p in reversed(self.procs):  # slurmds, then slurmctld, then munged
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self._kill_strays()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_strays(self) -> None:
        """Job steps (slurmstepd and its tasks) outlive slurmd; they carry our SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue

    # -- client commands ------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], **kw) -> str:
        out = self.run(["sbatch", "--parsable", *args], **kw).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once the job is gone)."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def release(self, job_id: str) -> None:
        """Start a requeued job soon instead of after SLURM's ~2-minute hold-off.

        Never ``StartTime=now``: the requeue revoked the job's old launch credential on its nodes
        at a time stamp in whole seconds, and slurmd refuses a new credential that is not younger
        (``Job credential revoked``: slurmctld then marks the job FAILED, ExitCode 1:0, RunTime 0,
        without running the script). A begin time 2 s ahead makes the relaunch strictly younger
        than the revocation, which happened before the job showed PENDING/BeginTime."""
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], check=False)

    def wait_state(self, job_id: str, states: set[str], timeout: float, release: bool = False) -> dict[str, str]:
        """Block until the job reaches one of ``states``; ``release`` lifts a requeued job's hold-off."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        released: set[str] = set()
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if (
                release
                and info.get("JobState") == "PENDING"
                and info.get("Reason") == "BeginTime"
                and info.get("Restarts", "0") not in released
            ):
                self.release(job_id)  # once per requeue: the begin time it sets lies ahead
                released.add(info.get("Restarts", "0"))
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:g}s: {info}\n{self.logs()}")


class Step:
    """An ``srun`` (``argv``) run in the background in a session of its own, its stdout and stderr
    collected by a thread as they come; ``stop()`` kills what is left of its process group."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Until the output matches ``pattern``; fails with the output's tail if the step ends first."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(5)
