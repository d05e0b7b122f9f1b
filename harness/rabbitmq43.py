"""RabbitMQ 4.3 (the production target) beside the machine's own broker, for the ``tests/broker43`` tests.

The machine's RabbitMQ (3.10 on port 5672) is shared and never touched. 4.3 comes
from Debian forky's ``rabbitmq-server`` package, installed once per machine into
a minimal Debian root made by ``debootstrap`` and cached outside the repository,
in ``${XDG_CACHE_HOME:-~/.cache}/llm-dispatcher/rabbitmq-4.3`` (``RABBITMQ43_CACHE``
moves it): ``root/`` is the Debian root, ``.complete`` marks it finished (a root
without it is half made and is made again), ``.lock`` keeps two runs from
installing, or mounting and unmounting its ``/proc``, at once. Nodes run
``chroot``-ed into that root as its own ``rabbitmq`` user (a uid no host user
has), each on free loopback ports, with its data in a temporary directory inside
the root, and every node of one ``Testbed`` registers with that test bed's own
epmd, on its own port: two test runs can share the root at the same time.

What it takes, learnt on these machines (see ``/work/shared/NOTES.md``):

- bookworm's debootstrap has no ``forky`` script; sid's works;
- ``policy-rc.d`` exiting 101, so that installing the package starts nothing;
- ``/proc`` mounted inside the root, else the node's memory monitor crashes and
  ``rabbitmqctl status`` fails. It is mounted by the first node of any run and
  unmounted when the last process inside the root is gone, both under the lock;
- ``/etc/hosts`` (minbase has none; node names are ``...@localhost``);
- ``ERL_EPMD_PORT`` for every node and every CLI call, else the CLI asks the
  host's epmd and reports the node down; the CLI's own distribution ports moved
  away from the host broker's (35672-35682);
- one ``RABBITMQ_CONF_ENV_FILE`` per node, read by both the server and the CLI,
  and ``HOME=/var/lib/rabbitmq`` for both, so they share the Erlang cookie
  (written once at install time).

``python -m harness.rabbitmq43 setup`` installs it; ``... node`` runs one node in
the foreground; ``... cleanup`` kills every process left inside the root (only
when no test run is using it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import cache
from harness.cache import COMPLETE, locked, run_step
from harness.cache import SetupError as SetupError
from harness.services import port_open
from harness.stack import free_port

SERIES = "4.3"
"""The RabbitMQ release series the root must hold."""
SUITE = "forky"
MIRROR = os.environ.get("RABBITMQ43_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_SCRIPT = "/usr/share/debootstrap/scripts/sid"
INSTALL_TIMEOUT = 1200.0
"""Seconds each install step (debootstrap, apt-get install) may take."""
_CHROOT_HOME = "/var/lib/rabbitmq"
_CHROOT_PATH = "/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CTL_DIST_PORTS = (45672, 45871)
"""The CLI's own distribution ports: away from the host broker's CLI (35672-35682) and its node (25672)."""
_USER = "rabbitmq"


def cache_dir() -> Path:
    return cache.directory("RABBITMQ43_CACHE", f"rabbitmq-{SERIES}")


def root_dir() -> Path:
    return cache_dir() / "root"


def is_ready() -> bool:
    return (cache_dir() / COMPLETE).is_file()


def installed_version() -> str:
    """The ``rabbitmq-server`` package version the complete root holds, as its marker recorded."""
    return (cache_dir() / COMPLETE).read_text().strip()


# --- /proc inside the root, and the processes living there ------------------------------------------


def _mounts_under(root: Path) -> list[Path]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = Path(line.split()[1].replace("\\040", " "))
        if target == root or root in target.parents:
            found.append(target)
    return sorted(found, reverse=True)


def _proc_mounted(root: Path) -> bool:
    return root / "proc" in _mounts_under(root)


def _mount_proc(root: Path) -> None:
    if not _proc_mounted(root):
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True, capture_output=True)


def _unmount_all(root: Path) -> None:
    for target in _mounts_under(root):
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
    left = _mounts_under(root)
    if left:
        raise SetupError(f"could not unmount {', '.join(map(str, left))}")


def processes_inside(root: Path | None = None) -> list[int]:
    """Ids of the processes whose root directory is ``root`` (the 4.3 root by default)."""
    root = (root or root_dir()).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "root")) == root:
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def _release_proc_if_unused() -> None:
    """Unmount the root's ``/proc`` once no process lives inside the root (under the lock)."""
    with locked(cache_dir(), 60.0):
        if not processes_inside():
            with contextlib.suppress(SetupError):
                _unmount_all(root_dir())


# --- installation -----------------------------------------------------------------------------------


def _free_system_id(root: Path) -> int:
    """A system uid (and gid) that no host user or group has and the root does not use either."""
    taken = set()
    for table in ("/etc/passwd", "/etc/group", str(root / "etc/passwd"), str(root / "etc/group")):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    taken.add(int(fields[2]))
    for candidate in range(899, 100, -1):
        if candidate not in taken:
            return candidate
    raise SetupError("no free system uid for the root's rabbitmq user")


def setup(*, say: Callable[[str], None] = print) -> Path:
    """Make sure the 4.3 root is complete (installing it once per machine); return it."""
    if is_ready():
        return root_dir()
    if os.geteuid() != 0:
        raise SetupError("installing RabbitMQ 4.3 needs root (debootstrap, chroot, mount)")
    with locked(cache_dir(), 2 * INSTALL_TIMEOUT + 300):
        if not is_ready():
            say(f"installing RabbitMQ {SERIES} into {root_dir()} (about a minute, once per machine)...")
            _install(say)
    return root_dir()


def _install_debootstrap(say: Callable[[str], None], log: Path) -> None:
    """A fresh machine has no debootstrap: install it from the machine's own package lists
    (refreshed once if the package is not found in them)."""
    say("installing debootstrap (apt-get)...")
    cache.apt_install(["debootstrap"], log)
    if shutil.which("debootstrap") is None or not Path(DEBOOTSTRAP_SCRIPT).is_file():
        raise SetupError(f"debootstrap could not be installed (apt-get install -y debootstrap); see {log}")


def _install(say: Callable[[str], None]) -> None:
    root = root_dir()
    log = cache_dir() / "setup.log"
    started = time.monotonic()
    if shutil.which("debootstrap") is None or not Path(DEBOOTSTRAP_SCRIPT).is_file():
        _install_debootstrap(say, log)
    if root.exists():
        # Half made by an attempt that did not finish: its processes and mounts go first.
        for pid in processes_inside(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _unmount_all(root)
        shutil.rmtree(root)
    run_step(
        ["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR, DEBOOTSTRAP_SCRIPT],
        f"debootstrap {SUITE} from {MIRROR}",
        log,
        INSTALL_TIMEOUT,
    )
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(
        "#!/bin/sh\n# Nothing starts services in this root: the tests start RabbitMQ nodes.\nexit 101\n"
    )
    policy.chmod(0o755)
    ident = _free_system_id(root)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    chroot = ["chroot", str(root)]
    run_step([*chroot, "groupadd", "--system", "--gid", str(ident), _USER], "groupadd", log, 60, env)
    user = [
        "--uid",
        str(ident),
        "--gid",
        str(ident),
        "--home-dir",
        _CHROOT_HOME,
        "--shell",
        "/usr/sbin/nologin",
    ]
    run_step(
        [*chroot, "useradd", "--system", *user, _USER],
        "useradd",
        log,
        60,
        env,
    )
    _mount_proc(root)
    try:
        run_step(
            [*chroot, "apt-get", "install", "-y", "--no-install-recommends", "rabbitmq-server"],
            "apt-get install rabbitmq-server (inside the root)",
            log,
            INSTALL_TIMEOUT,
            env,
        )
        run_step([*chroot, "apt-get", "clean"], "apt-get clean", log, 60, env)
        for pid in processes_inside(root):  # nothing should have started; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        _unmount_all(root)
    version = subprocess.run(
        [*chroot, "dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    ).stdout.strip()
    if not version.startswith(f"{SERIES}."):
        raise SetupError(
            f"Debian {SUITE} now ships rabbitmq-server {version or '(none)'}, not {SERIES}.x: "
            f"update SERIES/SUITE in {__file__}"
        )
    home = root / _CHROOT_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
    cookie.chmod(0o400)
    for path in (home, cookie):
        os.chown(path, ident, ident)
    (cache_dir() / COMPLETE).write_text(version + "\n")
    size = subprocess.run(["du", "-sh", str(root)], capture_output=True, text=True, check=False).stdout
    say(f"RabbitMQ {version} installed in {time.monotonic() - started:.0f} s ({size.split()[0] or '?'})")


def _ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == _USER:
            return int(fields[2]), int(fields[3])
    raise SetupError(f"no {_USER} user in {root}/etc/passwd; the root is damaged: remove {cache_dir()}")


# --- nodes ------------------------------------------------------------------------------------------

_RUN_MARK = "DISPATCH_RABBITMQ43_RUN"
"""Environment variable every process of a test bed carries: the name of its run directory."""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_run(run: str) -> int:
    """SIGKILL every process inside the root that belongs to the run directory ``run``; how many."""
    count = 0
    for pid in processes_inside():
        if _environ(pid).get(_RUN_MARK) == run:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                count += 1
    return count


def sweep_orphans() -> list[str]:
    """Kill and remove what test runs that died without cleaning up left (their owner is gone)."""
    swept = []
    for run_dir in (root_dir() / "var/tmp").glob("dispatch43-*"):
        try:
            owner = int((run_dir / "owner").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = 0
        if owner and _alive(owner):
            continue
        _kill_run(run_dir.name)
        shutil.rmtree(run_dir, ignore_errors=True)
        swept.append(run_dir.name)
    return swept


class Node43:
    """One RabbitMQ 4.3 node of a ``Testbed``: chroot-ed, on free loopback ports, its data in the run dir.

    ``url`` is an AMQP URL (guest, from loopback) for aio-pika or for the
    dispatcher's processes (``RABBITMQ_URL``).
    """

    def __init__(self, bed: Testbed, index: int) -> None:
        self.bed = bed
        self.name = f"rabbit{index}-{bed.run_id}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.inside = f"{bed.inside}/node{index}"
        """This node's directory as the node sees it (inside the root)."""
        self.directory = bed.root / self.inside.lstrip("/")
        """The same directory as this process sees it."""
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files()

    def _write_files(self) -> None:
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = true\nlog.console.level = info\nlog.file.level = info\n"
        )
        # Read by rabbitmq-server and by rabbitmqctl alike (sourced by their shell scripts).
        (self.directory / "rabbitmq-env.conf").write_text(
            f"NODENAME={self.name}\n"
            f"NODE_IP_ADDRESS=127.0.0.1\nNODE_PORT={self.port}\nDIST_PORT={self.dist_port}\n"
            f"MNESIA_BASE={self.inside}/mnesia\nLOG_BASE={self.inside}/log\n"
            f"CONFIG_FILE={self.inside}/rabbitmq.conf\n"
            f"ENABLED_PLUGINS_FILE={self.inside}/enabled_plugins\n"
            f"PID_FILE={self.inside}/pid\n"
            # No scheduler busy-waiting: nodes share a few cores with each other and with the
            # services under test, and a spinning node takes the CPU they need.
            "SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1} "
            "+sbwt none +sbwtdcpu none +sbwtdio none'\n"
        )
        for path in [self.directory, *self.directory.rglob("*")]:
            os.chown(path, self.bed.uid, self.bed.gid)

    def env(self) -> dict[str, str]:
        return {**self.bed.env(), "RABBITMQ_CONF_ENV_FILE": f"{self.inside}/rabbitmq-env.conf"}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 90.0) -> None:
        """Boot the node (its data kept from an earlier start) and wait until it takes AMQP connections."""
        if self.running():
            return
        self.bed.ensure_epmd()
        with (self.directory / "server.out").open("ab") as out:
            self._process = subprocess.Popen(
                [*self.bed.chroot(), "/usr/lib/rabbitmq/bin/rabbitmq-server"],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"RabbitMQ 4.3 node {self.name} exited:\n{self.log_tail()}")
            if port_open(self.port):
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"RabbitMQ 4.3 node {self.name} not listening after {timeout} s:\n{self.log_tail()}"
        )

    def ctl(self, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl") -> str:
        """Run ``rabbitmqctl -n <this node> args...`` inside the root (or ``tool``: rabbitmq-queues, ...)."""
        argv = [*self.bed.chroot(), f"/usr/lib/rabbitmq/bin/{tool}", "-n", self.name, *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=self.env()
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} on {self.name} failed: {result.stdout}{result.stderr}"
            )
        return result.stdout

    def status(self) -> str:
        return self.ctl("status")

    def list_queues(self, *columns: str) -> list[list[str]]:
        """``list_queues`` rows (tab-separated columns, header dropped), default columns name and messages."""
        out = self.ctl("list_queues", "--quiet", "--no-table-headers", *(columns or ("name", "messages")))
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def json(self, *args: str, timeout: float = 60.0) -> Any:
        """A ``rabbitmqctl`` command's answer with ``--formatter json``, decoded."""
        return json.loads(self.ctl(*args, "--formatter", "json", timeout=timeout))

    def list_deprecated_features(self) -> dict[str, str]:
        """Each deprecated feature's state on this node (``permitted`` or ``denied``)."""
        return {row["name"]: row["state"] for row in self.json("list_deprecated_features")}

    def running_nodes(self) -> list[str]:
        """The cluster's running members, as this node sees them."""
        return sorted(self.json("cluster_status")["running_nodes"])

    def set_vm_memory_high_watermark(self, fraction: float) -> None:
        self.ctl("set_vm_memory_high_watermark", str(fraction))

    def wait_cluster(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until this node sees exactly ``names`` running in its cluster (a restarted one rejoined)."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                seen = self.running_nodes()
                if seen == sorted(names):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} sees {seen} running after {timeout} s, not {sorted(names)}")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")

    def join_cluster(self, other: Node43) -> None:
        """``stop_app``, ``join_cluster <other>``, ``start_app``: this node joins other's cluster."""
        self.stop_app()
        self.ctl("join_cluster", other.name)
        self.start_app()

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (SIGTERM: the start script stops the node as ``rabbitmqctl stop`` would)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node: its start script, the Erlang VM and the VM's helpers."""
        if self._process is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(10)

    def _signal(self, signum: int) -> None:
        """Signal the node's process group, only those of its members that live inside the root."""
        assert self._process is not None
        inside = set(processes_inside(self.bed.root))
        for pid in inside:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == self._process.pid:
                    os.kill(pid, signum)

    def log_path(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    def log_text(self) -> str:
        try:
            return self.log_path().read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.directory / "server.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Testbed:
    """RabbitMQ 4.3 nodes of one test run: their own epmd (own port), data in the root's ``/var/tmp``.

    ``close()`` stops every node and the epmd, removes the data, and unmounts the
    root's ``/proc`` if no other run still has a process inside.
    """

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise SetupError(
                "RabbitMQ 4.3 nodes run chroot-ed, with /proc mounted in their root: that needs root"
            )
        self.root = setup().resolve()
        self.uid, self.gid = _ids(self.root)
        self.run_id = uuid.uuid4().hex[:8]
        tmp = self.root / "var/tmp"
        with locked(cache_dir(), 120.0):
            sweep_orphans()
            self.directory = Path(tempfile.mkdtemp(prefix=f"dispatch43-{self.run_id}-", dir=tmp))
        (self.directory / "owner").write_text(f"{os.getpid()}\n")
        os.chown(self.directory, self.uid, self.gid)
        self.inside = f"/var/tmp/{self.directory.name}"
        self.epmd_port = free_port()
        self.nodes: list[Node43] = []
        self._epmd: subprocess.Popen[bytes] | None = None

    def chroot(self) -> list[str]:
        return ["chroot", f"--userspec={self.uid}:{self.gid}", f"--groups={self.gid}", str(self.root)]

    def env(self) -> dict[str, str]:
        """What every node, CLI call and epmd of this test bed gets (and nothing of ours)."""
        return {
            "PATH": _CHROOT_PATH,
            "HOME": _CHROOT_HOME,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CTL_DIST_PORT_MIN": str(_CTL_DIST_PORTS[0]),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(_CTL_DIST_PORTS[1]),
            _RUN_MARK: self.directory.name,
        }

    def ensure_epmd(self) -> None:
        """This test bed's epmd, in the foreground as our child; ``/proc`` mounted first (under the lock)."""
        if self._epmd is not None and self._epmd.poll() is None:
            return
        with locked(cache_dir(), 120.0):
            _mount_proc(self.root)
            with (self.directory / "epmd.out").open("ab") as out:
                self._epmd = subprocess.Popen(
                    [*self.chroot(), "epmd", "-port", str(self.epmd_port)],
                    env=self.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            # Inside the root before the lock goes: a run unmounting /proc meanwhile would see it.
            deadline = time.monotonic() + 10
            while self._epmd.pid not in processes_inside(self.root) and time.monotonic() < deadline:
                if self._epmd.poll() is not None:
                    break
                time.sleep(0.02)
        deadline = time.monotonic() + 10
        while not port_open(self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"epmd did not start: {(self.directory / 'epmd.out').read_text()}")
            time.sleep(0.05)

    def node(self, start: bool = True) -> Node43:
        node = Node43(self, len(self.nodes) + 1)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def cluster(self, size: int = 3) -> list[Node43]:
        """``size`` nodes, booted at once, the others joined to the first with ``join_cluster``."""
        members = [self.node(start=False) for _ in range(size)]
        errors: list[BaseException] = []

        def boot(node: Node43) -> None:
            try:
                node.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(node,)) for node in members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for node in members[1:]:
            node.join_cluster(members[0])
        return members

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout=30)
        if self._epmd is not None and self._epmd.poll() is None:
            self._epmd.kill()
            self._epmd.wait(10)
        _kill_run(self.directory.name)  # anything of ours left (a node's helper that outlived it)
        shutil.rmtree(self.directory, ignore_errors=True)
        _release_proc_if_unused()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.rabbitmq43", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help=f"install RabbitMQ {SERIES} into its cached root (once per machine)")
    commands.add_parser("node", help="set up, then run one node until Ctrl-C")
    commands.add_parser("cleanup", help="kill every process inside the root and unmount its /proc")
    run = commands.add_parser("run", help="run a command with RABBITMQ_URL set to a fresh node, then stop it")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args()
    if args.command == "cleanup":
        with locked(cache_dir(), 120.0):
            for pid in processes_inside():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            _unmount_all(root_dir())
            for run_dir in (root_dir() / "var/tmp").glob("dispatch43-*"):
                shutil.rmtree(run_dir, ignore_errors=True)
        return
    started = time.monotonic()
    try:
        setup()
    except SetupError as exc:
        sys.exit(f"RabbitMQ {SERIES} set-up failed: {exc}")
    if args.command == "setup":
        print(f"RabbitMQ {installed_version()} ready in {root_dir()} ({time.monotonic() - started:.0f} s)")
        return
    bed = Testbed()
    if args.command == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            sys.exit("run: no command given (python -m harness.rabbitmq43 run -- CMD ...)")
        try:
            node = bed.node()
            print(f"RabbitMQ {installed_version()} node {node.name} for: {' '.join(argv)}", flush=True)
            sys.exit(subprocess.call(argv, env={**os.environ, "RABBITMQ_URL": node.url}))
        finally:
            bed.close()
    try:
        node = bed.node()
        print(f"RABBITMQ_URL={node.url}  (node {node.name}; Ctrl-C stops it)", flush=True)
        while node.running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        bed.close()


if __name__ == "__main__":
    main()
