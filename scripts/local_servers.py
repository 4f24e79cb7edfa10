"""Private redis-server and PostgreSQL processes for tests and `make run`.

Starts throwaway servers from the binaries installed on the machine, on free ports and in
directories we own, so nothing depends on (or disturbs) the shared servers on 6379/5432.

Library::

    with RedisServer(tmp / "redis") as rds, PostgresServer(tmp / "pg") as pg:
        use(rds.url, pg.dsn)

CLI (stdout carries only `NAME=value` lines, for `eval` in a Makefile)::

    eval "$(python scripts/local_servers.py up --state-dir .local)"
    python scripts/local_servers.py down --state-dir .local
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, cast

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("local_servers")

PG_USER = "postgres"  # initdb superuser, and the OS user postgres runs as when we are root
PG_DATABASE = "cachecoord"
SUN_PATH_MAX = 107  # Unix socket paths longer than this make postgres refuse to start


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (picked by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20_000, 55_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _alive(pid: int, comm: str | None = None) -> bool:
    """Whether `pid` is a live process (named `comm`, if given).

    Zombies count as dead: a detached server that exited is an orphan, and PID 1 on this VM
    reaps orphans only a second or two later; meanwhile `os.kill(pid, 0)` still succeeds.
    The name check keeps us from signalling an unrelated process that reused a stale pid.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = text.partition(" (")[2].rpartition(") ")
    return rest.split()[0] != "Z" and (comm is None or name == comm)


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (postgres backends, redis fork()s for AOF/RDB)."""
    found = []
    for entry in Path("/proc").iterdir():
        with suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rpartition(") ")[2].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _redis_reachable(url: str) -> bool:
    """Whether a Redis server answers PING at `url`."""
    client = redis.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except redis.RedisError:  # includes "loading the dataset in memory" while replaying the AOF
        return False
    finally:
        client.close()


def _pg_reachable(dsn: str) -> bool:
    """Whether a PostgreSQL server accepts a connection at `dsn`."""
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:  # includes "the database system is starting up" during recovery
        return False


def _pg_os_user() -> pwd.struct_passwd | None:
    """The account to run postgres as: `postgres` when we are root (it refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no {PG_USER!r} user to run PostgreSQL as; "
            "install the Debian package `postgresql` (it creates the user)"
        ) from None


def _pg_bindir() -> Path:
    """Directory holding initdb/pg_ctl/postgres: pg_config, newest Debian version, then PATH."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with suppress(subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            candidates.append(Path(out.stdout.decode().strip()))
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        # pg_config may come from libpq-dev and point at a bindir without the server programs.
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; "
        "install the Debian package `postgresql`"
    )


def _make_traversable(path: Path) -> None:
    """Add o+x (search, not listing) to `path` and its ancestors so the postgres user can
    reach its data dir; pytest's and mkdtemp's temp dirs are 0700 root."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("chmod o+x %s so user %s can reach %s", directory, PG_USER, path)
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _spawn(
    args: list[str], logfile: Path, detach: bool, user: pwd.struct_passwd | None = None
) -> subprocess.Popen[bytes]:
    """Start `args` with output appended to `logfile`; a new session if `detach` (so it
    survives us and ignores the terminal's Ctrl-C). Setting user/group in Popen (rather than
    `runuser`) makes the Popen pid the server itself, which kill() needs."""
    with logfile.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            cwd=logfile.parent,
        )


def _run(args: list[str], logfile: Path, user: pwd.struct_passwd | None) -> None:
    """Run a helper (initdb, pg_ctl) to completion, raising with its log tail on failure."""
    code = _spawn(args, logfile, detach=False, user=user).wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({code}); {logfile}:\n{_tail(logfile)}")


class _Server(ABC):
    """Process bookkeeping and the context manager shared by RedisServer and PostgresServer."""

    _comm: ClassVar[str]  # process name in /proc/<pid>/stat
    _proc: subprocess.Popen[bytes] | None
    port: int

    @property
    @abstractmethod
    def address(self) -> str:
        """URL clients connect to."""

    @abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Shut the server down gracefully and wait for it to exit."""

    @abstractmethod
    def _recorded_pid(self) -> int | None:
        """The server's pid as last recorded, possibly stale."""

    @property
    def pid(self) -> int | None:
        """Pid of the running server process, or None."""
        if self._proc is not None:
            self._proc.poll()  # reap our own child if it died, so it is not left a zombie
        pid = self._recorded_pid()
        return pid if pid is not None and _alive(pid, self._comm) else None

    def is_running(self) -> bool:
        """Whether the server process is alive (not whether it accepts connections yet)."""
        return self.pid is not None

    def kill(self) -> None:
        """SIGKILL the server and its child processes, and wait until they are gone."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)  # freeze it so it cannot fork while we list its children
        victims = [pid, *_children(pid)]
        for victim in victims:
            with suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        self._wait_exit(victims, timeout=10)

    def restart(self) -> None:
        """Start again on the same port and directory (stopping first if still running)."""
        if self.is_running():
            self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_exit(self, pids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._proc is not None:
            with suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        while any(_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} did not exit within {timeout}s")
            time.sleep(0.05)

    def _wait_ready(self, ready: Callable[[], bool], timeout: float, logfile: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not ready():
            if self._proc.poll() is not None:
                problem = f"exited with code {self._proc.returncode}"
            elif time.monotonic() > deadline:
                self.kill()
                problem = f"did not answer within {timeout}s"
            else:
                time.sleep(0.05)
                continue
            raise RuntimeError(
                f"{self._comm} on port {self.port} {problem}; {logfile}:\n" + _tail(logfile)
            )


@dataclass
class RedisServer(_Server):
    """A private redis-server in `dir` (logs in dir/redis.log) on 127.0.0.1:`port`."""

    dir: Path
    port: int = 0  # 0: pick a free port at the first start, then keep it
    appendonly: bool = False  # True: AOF with fsync on every write, so data survives kill()
    extra_args: list[str] = field(default_factory=list)
    detach: bool = False  # own session, outlives this process (used by the CLI)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _pid: int | None = field(default=None, init=False, repr=False)
    _comm: ClassVar[str] = "redis-server"

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return self.url

    def _recorded_pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        """Spawn redis-server (not daemonized) and wait until it answers PING (10s)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found; install the Debian package `redis-server`")
        if self.is_running():
            raise RuntimeError(f"redis-server already running on port {self.port}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        logfile = self.dir / "redis.log"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no"]
        args += ["--dir", str(self.dir), "--logfile", str(logfile)]
        # No RDB snapshots (also none on SIGTERM): without AOF a restart really starts empty.
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self._proc = _spawn([*args, *self.extra_args], logfile, self.detach)
        self._pid = self._proc.pid
        self._wait_ready(lambda: _redis_reachable(self.url), 10, logfile)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown: AOF flushed, no RDB since `save ""`) and wait."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            self._wait_exit([pid], timeout=30)


def redis_supports_cluster() -> str | None:
    """None if the installed redis-server (and redis-cli) can run a cluster, else why not.
    Starts one throwaway cluster-enabled node to find out."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return "redis-server or redis-cli is not installed"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="redis-cluster-probe-") as tmp:
        node = RedisServer(
            Path(tmp), port=free_cluster_port(), extra_args=["--cluster-enabled", "yes"]
        )
        try:
            node.start()
        except RuntimeError as err:
            return f"redis-server does not start with --cluster-enabled yes: {err}"
        node.stop()
    return None


@dataclass
class RedisCluster:
    """A private Redis Cluster of `primaries` primaries with `replicas` replicas each,
    from redis-server processes in `dir`/node-<i> on free ports of 127.0.0.1.

    Nodes have no persistence (`--appendonly no --save ""`): a killed primary's data lives
    on only in its replica, which the cluster promotes (cluster-node-timeout is short)."""

    dir: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    nodes: list[RedisServer] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of one live node (any node is a startup node for cluster clients)."""
        for node in self.nodes:
            if node.is_running():
                return node.url
        raise RuntimeError("no node of the cluster is running")

    def start(self) -> None:
        """Start the nodes, join them (redis-cli --cluster create) and wait for
        cluster_state:ok on every node (30s)."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found; install the Debian package `redis-tools`")
        count = self.primaries * (1 + self.replicas)
        try:
            for i in range(count):
                node_dir = self.dir / f"node-{i}"
                node = RedisServer(
                    node_dir,
                    port=free_cluster_port(),
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout", str(self.node_timeout_ms),
                        "--repl-diskless-sync-delay", "0",
                    ],
                )  # fmt: skip
                node.start()
                self.nodes.append(node)
            create = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            out = subprocess.run(
                [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True,
                timeout=60,
            )
            if out.returncode != 0:
                raise RuntimeError(
                    "redis-cli --cluster create failed:\n"
                    + (out.stdout + out.stderr).decode(errors="replace")
                )
            self.wait_ok()
            self.wait_replicas_synced()
        except BaseException:
            self.stop()
            raise

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        client = redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            raw: Any = cast(Any, client).execute_command("CLUSTER INFO")
        finally:
            client.close()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every running node reports cluster_state:ok and `primaries`
        running nodes are primaries (after a primary is killed: its replica took over)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                live = [n for n in self.nodes if n.is_running()]
                infos = [self.cluster_info(n) for n in live]
                last = infos
                if (
                    all(i.get("cluster_state") == "ok" for i in infos)
                    and len(self.primary_ports()) >= self.primaries
                ):
                    return
            except redis.RedisError as err:
                last = err
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout}s: {last}")
            time.sleep(0.1)

    def wait_replicas_synced(self, timeout: float = 30) -> None:
        """Wait until every running replica's link to its primary is up (a replica
        that never synced would not take over from a failed primary)."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for node in self.nodes:
                if not node.is_running():
                    continue
                client = redis.Redis(port=node.port, socket_timeout=2)
                try:
                    info = client.info("replication")
                finally:
                    client.close()
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    pending.append(node.port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {pending} not in sync within {timeout}s")
            time.sleep(0.1)

    def primary_ports(self) -> list[int]:
        """Ports of the nodes that are primaries now."""
        ports = []
        for node in self.nodes:
            if not node.is_running():
                continue
            client = redis.Redis(port=node.port, socket_timeout=2)
            try:
                role: Any = cast(Any, client).execute_command("ROLE")
            finally:
                client.close()
            if role[0] in (b"master", "master"):
                ports.append(node.port)
        return ports

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`."""
        self.node(port).kill()

    def stop_node(self, port: int) -> None:
        self.node(port).stop()

    def start_node(self, port: int) -> None:
        """Start a stopped node again (it rejoins from its nodes.conf)."""
        self.node(port).start()

    def stop(self) -> None:
        for node in self.nodes:
            with suppress(Exception):
                node.stop()
        self.nodes.clear()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class PostgresServer(_Server):
    """A private PostgreSQL cluster in `dir`/data (logs in dir/postgres.log) on 127.0.0.1."""

    dir: Path
    port: int = 0  # 0: pick a free port at the first start, then keep it
    detach: bool = False  # own session, outlives this process (used by the CLI)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _comm: ClassVar[str] = "postgres"

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()

    @property
    def dsn(self) -> str:
        """libpq URL of the `cachecoord` database (trust auth, user postgres)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    @property
    def address(self) -> str:
        return self.dsn

    def _recorded_pid(self) -> int | None:
        try:  # postgres writes its pid on the first line, even when another process started it
            return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        """initdb on first use, start postgres, wait for a connection (30s), create the db."""
        bindir = _pg_bindir()
        user = _pg_os_user()
        if self.is_running():
            raise RuntimeError(f"postgres already running in {self.dir}")
        data, sockets, logfile = self.dir / "data", self.dir / "sock", self.dir / "postgres.log"
        self.dir.mkdir(parents=True, exist_ok=True)
        for directory in (data, sockets):
            directory.mkdir(mode=0o700, exist_ok=True)
            if user:
                os.chown(directory, user.pw_uid, user.pw_gid)
        if user:
            _make_traversable(self.dir)
        if not (data / "PG_VERSION").exists():
            # --no-sync only skips fsync of initdb's own files; the server keeps fsync=on.
            initdb = [str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust"]
            _run([*initdb, "--no-sync", "-E", "UTF8", "--locale=C"], logfile, user)
        self.port = self.port or free_port()
        # Not running, so any lock file is stale. Drop it: after a kill of a detached server
        # the old pid may still be an unreaped zombie, which postgres takes for a live postmaster.
        if self._recorded_pid() is not None:
            (data / "postmaster.pid").unlink()
        sockdir = str(sockets)
        if len(f"{sockdir}/.s.PGSQL.{self.port}") > SUN_PATH_MAX:
            sockdir = ""  # no Unix socket rather than a startup failure; we use TCP anyway
        args = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port)]
        self._proc = _spawn([*args, "-h", "127.0.0.1", "-k", sockdir], logfile, self.detach, user)
        admin = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        self._wait_ready(lambda: _pg_reachable(admin), 30, logfile)
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [PG_DATABASE]
            ).fetchone():
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def stop(self) -> None:
        """`pg_ctl stop -m fast` (rolls back open transactions, checkpoints) and wait."""
        pid = self.pid
        if pid is not None:
            pg_ctl = [str(_pg_bindir() / "pg_ctl"), "stop", "-D", str(self.dir / "data")]
            _run(
                [*pg_ctl, "-m", "fast", "-w", "-t", "60"], self.dir / "postgres.log", _pg_os_user()
            )
            self._wait_exit([pid], timeout=30)


# --- CLI --------------------------------------------------------------------------------------

_Factory = Callable[[Path, int], _Server]
_KINDS: dict[str, tuple[_Factory, Callable[[str], bool]]] = {
    "redis": (lambda d, port: RedisServer(d, port, detach=True), _redis_reachable),
    "postgres": (lambda d, port: PostgresServer(d, port, detach=True), _pg_reachable),
}


def _recorded(state: Path, kind: str) -> _Server | None:
    """The private server an earlier `up` recorded in `state`, if it is still running."""
    try:
        pid = int((state / f"{kind}.pid").read_text())
        port = int((state / f"{kind}.port").read_text())
    except (OSError, ValueError):
        return None
    server = _KINDS[kind][0](state / kind, port)
    if isinstance(server, RedisServer):
        server._pid = pid  # redis keeps no pid file; postgres has postmaster.pid
    return server if server.pid == pid else None


def _ensure(state: Path, kind: str, url: str | None) -> str:
    """URL of a reachable server of `kind`: `url` if it answers, else a private one."""
    factory, reachable = _KINDS[kind]
    if url:
        if reachable(url):
            log.info("%s: using %s", kind, url)
            return url
        log.warning("%s: %s is not reachable; using a private server", kind, url)
    server = _recorded(state, kind)
    if server is not None:
        if reachable(server.address):
            log.info("%s: reusing private server pid %s at %s", kind, server.pid, server.address)
            return server.address
        log.warning("%s: private server pid %s does not answer; restarting it", kind, server.pid)
        server.stop()
    server = factory(state / kind, 0)
    server.start()
    (state / f"{kind}.pid").write_text(f"{server.pid}\n")
    (state / f"{kind}.port").write_text(f"{server.port}\n")
    log.info("%s: started private server pid %s at %s", kind, server.pid, server.address)
    return server.address


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `up` / `down` private servers recorded in --state-dir."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="reuse or start servers; print CACHECOORD_*_URL=... lines")
    up.add_argument("--state-dir", type=Path, required=True)
    up.add_argument("--redis-url", default=os.environ.get("CACHECOORD_REDIS_URL"))
    up.add_argument("--database-url", default=os.environ.get("CACHECOORD_DATABASE_URL"))
    down = sub.add_parser("down", help="stop the private servers recorded in --state-dir")
    down.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="local_servers: %(message)s")

    state: Path = args.state_dir.absolute()
    if args.command == "up":
        state.mkdir(parents=True, exist_ok=True)
        redis_url = _ensure(state, "redis", args.redis_url)
        database_url = _ensure(state, "postgres", args.database_url)
        print(f"CACHECOORD_REDIS_URL={shlex.quote(redis_url)}")
        print(f"CACHECOORD_DATABASE_URL={shlex.quote(database_url)}")
    else:
        for kind in _KINDS:
            if (server := _recorded(state, kind)) is not None:
                log.info("%s: stopping private server pid %s", kind, server.pid)
                server.stop()
            for suffix in ("pid", "port"):
                (state / f"{kind}.{suffix}").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
