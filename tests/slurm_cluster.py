"""A real one-node SLURM cluster on localhost, for integration tests.

`local_slurm(tmp)` starts munged, slurmctld and slurmd with every file (key, sockets, state,
spool, logs) under `tmp` and free ports picked at run time, so tests never touch /etc/slurm or
/run/munge and two clusters never clash. It yields the environment that client commands
(sbatch, squeue, scontrol, scancel, sinfo) need, and on exit cancels all jobs and stops every
process it started. Needs root (munged and slurmd run as root here) and the Debian packages
slurm-wlm and munge; `slurm_available()` says why not, for a pytest skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
# Every process started here (and every job submitted with the yielded env, unless it sets
# --export=NONE) carries this variable, so cleanup can find exactly our stray slurmstepd and job
# processes without matching by name; slurmd's reaper ends the rest.
MARKER = "SLT_LOCAL_SLURM"
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
# Unix socket paths are limited to 108 bytes; slurmd also puts step sockets in its spool dir.
MAX_SOCKET_DIR = 60


def _search_path() -> str:
    """PATH plus the sbin dirs where Debian puts the daemons (a non-login PATH may lack them)."""
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(dirs + [d for d in ("/usr/sbin", "/sbin") if d not in dirs])


def slurm_available() -> str | None:
    """None when a local cluster can start here, else the reason (for pytest.skip)."""
    missing = [b for b in BINARIES if shutil.which(b, path=_search_path()) is None]
    if missing:
        return f"SLURM binaries not found: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (munged, slurmd and SlurmUser=root)"
    return None


def _reap_main(argv: list[str], grace: float = 5.0) -> int:
    """Run argv (slurmd) as a child subreaper, so orphaned slurmstepds are reaped here, not left
    as zombies of an init that reaps lazily; on SIGTERM stop it, then end all that is left."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    stopping: list[float] = []
    code: int | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.append(time.monotonic())
        if code is None:  # not yet reaped, so the pid is still slurmd's
            os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 1 if code is None else code  # no children left at all
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
        if done:
            continue
        if stopping and time.monotonic() - stopping[0] > grace:
            for child in _children(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        time.sleep(0.05)


def _children(parent: int) -> list[int]:
    """Direct children of `parent`, from /proc (state field 4 is the ppid)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                kids.append(int(entry))
    return kids


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on localhost now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _real_memory_mb() -> int:
    """Half of MemTotal in MiB: slurmd drains a node that claims more memory than it has."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return max(256, int(line.split()[1]) // 1024 // 2)
    return 1024


def _tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  ({path}: {exc})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or "  (empty)"


def _short_dir(tmp: Path, name: str) -> Path:
    """tmp/name, or a short mkdtemp when that path is too long for unix sockets inside it."""
    d = tmp / name
    if len(str(d)) > MAX_SOCKET_DIR:
        d = Path(tempfile.mkdtemp(prefix=f"slt-{name}-"))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def _marked_pids(marker_value: str) -> list[int]:
    """Processes whose environment carries our marker: daemons' children, steps and jobs."""
    pids = []
    needle = f"{MARKER}={marker_value}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def _stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL whatever is still alive after `timeout` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def _kill_marked(marker_value: str, timeout: float = 5.0) -> None:
    """Terminate, then kill, every process left over that carries our marker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked_pids(marker_value)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _marked_pids(marker_value):
            time.sleep(0.1)


def _write_conf(
    path: Path, *, host: str, cpus: int, munge_socket: Path, tmp: Path, spool: Path,
    ctld_port: int, slurmd_port: int,
) -> None:
    """The slurm.conf of a one-node cluster with everything under tmp and short timings."""
    state = tmp / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    lines = [
        f"ClusterName=slt{ctld_port}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # socket: daemons, clients and steps all find our munged through this one line.
        # cred_expire also sets how long a requeued job waits before it may start again
        # (default 120 s); 5 is slurm's floor (a smaller value falls back to 120).
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={tmp / 'slurmctld.pid'}",
        f"SlurmdPidFile={tmp / 'slurmd.pid'}",
        f"SlurmctldLogFile={tmp / 'slurmctld.log'}",
        f"SlurmdLogFile={tmp / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in a container (and none needed): track processes by parentage.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # Trust the configured CPUs/memory over the hardware, so tests may ask for more slots.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=5",
        "MinJobAge=300",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,sched_min_interval=100000,bf_interval=1",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()}"
        " State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    path.write_text("\n".join(lines) + "\n")


def _node_state(env: dict[str, str]) -> str:
    """sinfo's compact state of our node ('idle', 'down*', ...), or '' while it can't say."""
    r = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10,
    )
    return r.stdout.strip() if r.returncode == 0 else ""


def _squeue_ids(env: dict[str, str]) -> list[str]:
    """Ids of all jobs squeue still lists (pending, running or completing)."""
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                       timeout=30, check=False)
    return r.stdout.split() if r.returncode == 0 else []


def _cancel_all(env: dict[str, str], timeout: float = 15.0) -> None:
    """Cancel every job, whoever submitted it, and wait for slurmd to finish them off."""
    ids = _squeue_ids(env)
    if ids:
        subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=30, check=False)
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        time.sleep(0.2)
        ids = _squeue_ids(env)


@contextlib.contextmanager
def local_slurm(tmp: Path, cpus: int | None = None) -> Iterator[dict[str, str]]:
    """Start munged + slurmctld + slurmd under tmp; yield the env for sbatch & co; stop all."""
    reason = slurm_available()
    if reason:
        raise RuntimeError(reason)
    tmp = Path(tmp).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    mode = tmp.stat().st_mode & 0o777
    if mode & 0o022:
        os.chmod(tmp, mode & ~0o022)  # munged refuses a key file in a dir writable by others
    host = socket.gethostname().split(".")[0]  # what slurmd calls itself (hostname -s)
    ctld_port, slurmd_port = _free_ports(2)
    marker_value = f"{tmp}:{ctld_port}"

    sock_dir = _short_dir(tmp, "munge")
    os.chmod(sock_dir, 0o755)  # munged wants its socket dir searchable by all (non-root clients)
    spool = _short_dir(tmp, "spool")
    munge_socket = sock_dir / "munge.sock"
    key = tmp / "munge.key"
    with open(key, "wb") as fh:
        fh.write(os.urandom(1024))
    os.chown(key, 0, 0)
    os.chmod(key, 0o400)

    conf = tmp / "slurm.conf"
    _write_conf(conf, host=host, cpus=cpus or os.cpu_count() or 1, munge_socket=munge_socket,
                tmp=tmp, spool=spool, ctld_port=ctld_port, slurmd_port=slurmd_port)
    env = dict(os.environ)
    env.update({"SLURM_CONF": str(conf), MARKER: marker_value, "PATH": _search_path()})
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
        if var != "SLURM_CONF":
            del env[var]  # a surrounding allocation's variables would confuse our clients

    procs: list[subprocess.Popen] = []
    names = ["munged", "slurmctld", "slurmd"]  # in start order, matching procs

    def start(name: str, argv: list[str]) -> None:
        # Run in the foreground, every daemon logs to stderr too: tmp/<name>.out has it all.
        out = open(tmp / f"{name}.out", "wb")
        try:
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        finally:
            out.close()

    def diagnose(what: str) -> str:
        tails = [f"--- {tmp / (n + '.out')}\n{_tail(tmp / (n + '.out'))}" for n in names]
        return "\n".join([what, *tails])

    try:
        start("munged", [
            # --force: start over a stale socket left by a killed run.
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={tmp / 'munged.pid'}", f"--log-file={tmp / 'munged.log'}",
            f"--seed-file={tmp / 'munged.seed'}",
        ])
        deadline = time.monotonic() + 15
        while not munge_socket.exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(diagnose("munged did not start"))
            time.sleep(0.05)

        start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        # slurmd's steps daemonize away from it: run it under a reaper that outlives them.
        start("slurmd", [sys.executable, str(Path(__file__).resolve()), "reap",
                         "slurmd", "-D", "-f", str(conf), "-N", host])
        deadline = time.monotonic() + 60
        state = ""
        while True:
            dead = [name for name, p in zip(names, procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(diagnose(f"{', '.join(dead)} exited while starting"))
            state = _node_state(env)
            if state == "idle":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(diagnose(f"node not idle after 60 s (sinfo: {state!r})"))
            time.sleep(0.25)
        yield env
    finally:
        if len(procs) >= 3 and procs[1].poll() is None:
            _cancel_all(env)
        _stop(procs[:0:-1])  # slurmd (its reaper ends the steps left), then slurmctld
        _stop(procs[:1])  # munged last: the others authenticate through it until they stop
        _kill_marked(marker_value)
        for d in (sock_dir, spool):
            if not d.is_relative_to(tmp):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "reap":
        sys.exit(_reap_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} reap COMMAND [ARGS...]")
