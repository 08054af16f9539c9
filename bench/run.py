"""``make bench``: every scenario against quart-claude and the two baselines, with the
emulator serving TLS as production's upstream does (``--plain`` for plain HTTP).

The server runs pinned to core 0, the emulator and this load generator to core 1 (on a
2-core machine). Server CPU comes from ``/proc/<pid>/stat`` (user + system) over the load,
RSS from ``/proc/<pid>/status``. Results: a Markdown table on stdout and JSON in
``bench/results/``.

    python -m bench.run [--quick] [--plain] [--only SCENARIO ...] [--systems SYSTEM ...]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from quart_claude.testing import certificates

from .load import StreamResult, chat, direct_ttft

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOAD_CORE = "0", "1"


@dataclass
class Scenario:
    name: str
    streams: int
    tokens: int
    token_delay: float
    first_token_delay: float = 0.0
    systems: tuple[str, ...] = ("quart_claude",)
    resume_every: int | None = None
    redis: str = ""  # "server": a redis-server; "cluster": a 3-primary Redis Cluster
    ramp: float = 0.0  # seconds over which streams start
    #: a system run with fewer streams than the scenario's (the Flask front end is a thread
    #: per stream: one gthread worker holds hundreds, not thousands)
    streams_of: dict[str, int] = field(default_factory=dict)

    def for_system(self, system: str) -> Scenario:
        """The scenario as ``system`` runs it: with its own stream count, if it has one."""
        streams = self.streams_of.get(system)
        return self if streams is None else dataclasses.replace(self, streams=streams)


def scenarios(quick: bool) -> list[Scenario]:
    scale = 10 if quick else 1
    return [
        Scenario(
            "flat-out",
            20,
            2000 // scale,
            0.0,
            systems=("bare", "common", "quart_claude", "bedrock"),
        ),
        Scenario(
            "paced",
            100 // (scale // 5 or 1),
            100 // scale if quick else 200,
            0.1,
            # and --systems budget; guard-cut and guard-hold: an output guard's windows
            systems=("bare", "common", "quart_claude", "flask", "guard-cut", "guard-hold"),
            ramp=1.0,
        ),
        Scenario(
            "idle-heavy",
            2000 // scale,
            10 // (2 if quick else 1),
            1.0,
            first_token_delay=5.0 / (5 if quick else 1),
            systems=("bare-aiohttp", "bare", "quart_claude", "flask"),
            ramp=2.0,
            streams_of={"flask": 500 // scale},
        ),
        # 1,000 streams opened within a second, the first token 200 ms after each request:
        # setup under a burst, against floors on both HTTP clients
        Scenario(
            "burst",
            1000 // scale,
            10,
            0.05,
            first_token_delay=0.2,
            systems=("bare-aiohttp", "bare", "quart_claude", "flask"),
            ramp=1.0,
        ),
        # 5,000 streams open together on one worker (opened over 20 s, each a minute long),
        # an event a second each
        Scenario(
            "5000-streams",
            5000 // scale,
            60 // (6 if quick else 1),
            1.0,
            systems=("bare-aiohttp", "quart_claude"),
            ramp=20.0 / (4 if quick else 1),
        ),
        Scenario(
            "resume-heavy",
            100 // (scale // 5 or 1),
            100 // scale if quick else 200,
            0.05,
            resume_every=10,
            ramp=1.0,
        ),
        Scenario(
            "setup", 500 // scale, 1, 0.0, systems=("quart_claude", "conversations", "budget")
        ),
        # a worker that served one stream and now idles: its RSS (and, printed after the
        # table, what importing the package takes)
        Scenario(
            "idle-worker", 0, 1, 0.0, systems=("bare", "bare-aiohttp", "quart_claude", "flask")
        ),
        Scenario(
            "paced-redis",
            100 // (scale // 5 or 1),
            100 // scale if quick else 200,
            0.1,
            redis="server",
            ramp=1.0,
        ),
        Scenario(
            "paced-cluster",
            100 // (scale // 5 or 1),
            100 // scale if quick else 200,
            0.1,
            redis="cluster",
            ramp=1.0,
        ),
    ]


def listener() -> socket.socket:
    """A listening loopback socket on a free port, for a server process to inherit
    (``fd://N``): the port is ours from the start, so a server started beside other runs can
    never answer on a port another one took first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def emulator_process(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m quart_claude.testing --port 0 ARGS``; the process and the port it
    reports it is listening on."""
    command = [sys.executable, "-m", "quart_claude.testing", "--port", "0", *args]
    process = subprocess.Popen(
        pinned(LOAD_CORE, command), cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "quart-claude emulator listening on http://host:port"
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"the emulator did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def worker_of(pid: int) -> int:
    """The one worker process of a Gunicorn master (the process that serves, and is measured)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one Gunicorn worker under {pid}, found {children}")
    return int(children[0])


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pinned(core: str, args: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *args] if taskset else args


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Measurement:
    scenario: str
    system: str
    streams: int
    events: int = 0
    failures: int = 0
    wall: float = 0.0
    cpu_us_per_event: float | None = None
    cpu_ms_per_stream: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    ttft_overhead_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    events_per_s: float | None = None
    peak_rss_mib: float | None = None
    rss_per_stream_kib: float | None = None
    errors: list[str] = field(default_factory=list)


async def run_load(scenario: Scenario, port: int, pid: int) -> tuple[list[StreamResult], int]:
    """All streams of a scenario; returns the results and the highest RSS seen meanwhile."""
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    tasks = []
    gap = scenario.ramp / scenario.streams if scenario.ramp else 0.0
    for index in range(scenario.streams):
        tasks.append(
            asyncio.create_task(
                chat("127.0.0.1", port, f"bench {index}", resume_every=scenario.resume_every)
            )
        )
        if gap:
            await asyncio.sleep(gap)
        elif scenario.name == "setup" and index % 20 == 19:
            await asyncio.gather(*tasks[-20:])  # 20 at a time: setup cost, not queueing
    results = await asyncio.gather(*tasks)
    done.set()
    await sampler
    return list(results), peak


def measure(
    scenario: Scenario,
    system: str,
    emulator_port: int,
    redis_url: str | None,
    direct: float,
    profile: Path | None = None,
    tls_ca: Path | None = None,
    waves: int = 1,
) -> list[Measurement]:
    """The scenario on a fresh server of ``system``: one measurement, or one per wave (the
    same load again on the same server: what a worker keeps after streams come and go)."""
    sock = listener()
    port = port_of(sock)
    upstream = f"{'https' if tls_ca else 'http'}://127.0.0.1:{emulator_port}"
    args = [
        sys.executable,
        "-m",
        "bench.servers",
        system,
        f"fd://{sock.fileno()}",
        upstream,
    ]
    if redis_url:
        args.append(redis_url)
    if system == "flask":  # Gunicorn's gthread worker, one worker, a thread per stream
        app = f"bench.servers:flask_app({upstream!r}, {redis_url!r})"
        args = [
            str(Path(sys.executable).with_name("gunicorn")),
            "-k",
            "gthread",
            "-w",
            "1",
            "--threads",
            str(scenario.streams + 16),
            "--worker-connections",  # gthread's cap on open connections (default 1000)
            str(scenario.streams + 16),
            "-b",
            f"fd://{sock.fileno()}",
            "--backlog",
            "4096",
            "--timeout",
            "300",
            "--keep-alive",
            "120",
            "--access-logfile",
            "/dev/null",
            app,
        ]
    env = {**os.environ, "SSL_CERT_FILE": str(tls_ca)} if tls_ca else None  # trusts the CA
    server = subprocess.Popen(
        pinned(SERVER_CORE, args), cwd=ROOT, pass_fds=(sock.fileno(),), env=env
    )
    sock.close()  # the server holds its own copy
    spy = None
    if profile is not None:  # sample the server with py-spy until it exits
        profile.mkdir(parents=True, exist_ok=True)
        out = profile / f"{scenario.name}-{system}.txt"
        spy = subprocess.Popen(
            [
                py_spy(),
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "--pid",
                str(server.pid),
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    name = scenario.name + ("" if tls_ca else "+plain")
    try:
        wait_port(port)
        # warm up: one stream, so imports and first-request costs are not counted
        asyncio.run(chat("127.0.0.1", port, "warm up"))
        pid = worker_of(server.pid) if system == "flask" else server.pid
        if scenario.streams == 0:  # idle: what a worker holds once it has served one stream
            time.sleep(2)
            idle = Measurement(name, system, 0, peak_rss_mib=rss_kib(pid) / 1024)
            return [idle]
        results_of_waves = []
        for n in range(1, waves + 1):
            if n > 1:
                time.sleep(1)  # the last wave's connections close before this one's RSS is read
            wave = Measurement(name + (f" wave {n}" if waves > 1 else ""), system, scenario.streams)
            results_of_waves.append(_wave(scenario, port, pid, direct, wave))
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        if spy is not None:
            spy.wait(30)
    return results_of_waves


def _wave(
    scenario: Scenario, port: int, pid: int, direct: float, result: Measurement
) -> Measurement:
    """One run of the scenario's streams on a server that is up (and may have run others)."""
    rss_before = rss_kib(pid)
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    results, peak = asyncio.run(run_load(scenario, port, pid))
    result.wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    result.events = sum(r.events for r in results)
    result.failures = sum(1 for r in results if not r.ok)
    result.errors = sorted({r.error or "" for r in results if not r.ok})[:5]
    latencies = [lat for r in results for lat in r.latencies]
    if result.events:
        result.cpu_us_per_event = cpu / result.events * 1e6
        result.events_per_s = result.events / result.wall
    result.cpu_ms_per_stream = cpu / scenario.streams * 1e3
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    result.latency_p50_ms = p50 * 1e3 if p50 is not None else None
    result.latency_p99_ms = p99 * 1e3 if p99 is not None else None
    ttfts = [r.ttft for r in results if r.ttft is not None]
    if ttfts:
        result.ttft_overhead_ms = (statistics.median(ttfts) - direct) * 1e3
        result.ttft_p50_ms = (percentile(ttfts, 0.5) or 0.0) * 1e3
        result.ttft_p99_ms = (percentile(ttfts, 0.99) or 0.0) * 1e3
    result.peak_rss_mib = rss_kib(pid, "VmHWM") / 1024
    result.rss_per_stream_kib = (peak - rss_before) / scenario.streams
    return result


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server without persistence on a unix socket in a temporary folder (no port
    to race other runs for); yields its URL and stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="qc-bench-redis-") as folder:
        path = Path(folder) / "redis.sock"
        command = [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        process = subprocess.Popen(pinned(LOAD_CORE, command), stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _pong(path):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"unix://{path}?db=0"
        finally:
            process.terminate()
            process.wait(10)


@contextlib.contextmanager
def redis_cluster() -> Iterator[str]:
    """Three redis-server primaries (``--cluster-enabled yes``) on loopback ports, joined by
    ``redis-cli --cluster create`` and pinned beside the load; yields the store URL."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="qc-bench-cluster-") as folder:
        ports = _cluster_ports(3)
        processes = []
        for port in ports:
            node = Path(folder) / str(port)
            node.mkdir()
            command = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(node),
            ]  # fmt: skip
            processes.append(
                subprocess.Popen(pinned(LOAD_CORE, command), stdout=subprocess.DEVNULL)
            )
        try:
            for port in ports:
                _wait_for_port(port)
            nodes = [f"127.0.0.1:{port}" for port in ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + 30
            while not all(_cluster_ok(cli, port) for port in ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not form")
                time.sleep(0.1)
            yield "redis+cluster://" + ",".join(nodes)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with listener() as sock:
            port = port_of(sock)
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on {port} did not start")
        time.sleep(0.05)


def _cluster_ok(cli: str, port: int) -> bool:
    info = subprocess.run([cli, "-p", str(port), "CLUSTER", "INFO"], capture_output=True)
    return b"cluster_state:ok" in info.stdout


def _pong(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--systems", nargs="*", help="systems to run (default: each scenario's)")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of the server here")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes"
    )
    parser.add_argument(
        "--streams", type=int, help="concurrent streams instead of each scenario's (find a limit)"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="the emulator serves plain HTTP (default: TLS, as production's upstream)",
    )
    parser.add_argument(
        "--waves", type=int, default=1, help="run each load this many times on one server"
    )
    args = parser.parse_args()
    if args.profile is not None:
        py_spy()  # a loud stop now, not with a server started
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    compiled()

    measurements: list[Measurement] = []
    tls_folder = tempfile.TemporaryDirectory(prefix="qc-bench-tls-")
    tls = None if args.plain else certificates(Path(tls_folder.name))
    tls_args = ["--tls-cert", str(tls[1]), "--tls-key", str(tls[2])] if tls else []
    for scenario in scenarios(args.quick):
        if args.only and scenario.name not in args.only:
            continue
        if args.streams:  # every system at this count
            scenario.streams, scenario.streams_of = args.streams, {}
        emulator, emulator_port = emulator_process(
            [
                "--tokens",
                str(scenario.tokens),
                "--token-delay",
                str(scenario.token_delay),
                "--first-token-delay",
                str(scenario.first_token_delay),
                "--stamp",
                *tls_args,
            ]
        )
        with contextlib.ExitStack() as stack:
            stack.callback(emulator.wait, 10)
            stack.callback(emulator.terminate)
            context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
            direct = statistics.median(
                asyncio.run(direct_ttft("127.0.0.1", emulator_port, context)) for _ in range(5)
            )
            redis_url = None
            if scenario.redis:
                store = redis_cluster if scenario.redis == "cluster" else redis_server
                redis_url = stack.enter_context(store())
            for system in args.systems or scenario.systems:
                waves = measure(
                    scenario.for_system(system), system, emulator_port, redis_url, direct,
                    args.profile, tls[0] if tls else None, args.waves,
                )  # fmt: skip
                measurements.extend(waves)
                for m in waves:
                    print(
                        f"{m.scenario:13} {m.system:13} events={m.events} failures={m.failures}"
                        f" cpu/event={_fmt(m.cpu_us_per_event)}us",
                        *(f"\n  failed: {error}" for error in m.errors),
                        file=sys.stderr,
                        flush=True,
                    )

    tls_folder.cleanup()
    print(table(measurements))
    if not args.only or "idle-worker" in args.only:
        print(f"\nimporting quart_claude: {import_seconds():.2f} s (median of 5 fresh processes)")
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps([m.__dict__ for m in measurements], indent=2))


def py_spy() -> str:
    """py-spy beside this interpreter (the venv's), else on PATH: a loud stop without it."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def compiled() -> None:
    """The package and the bench compiled to bytecode, as an installed wheel has them: an
    editable checkout under ``PYTHONDONTWRITEBYTECODE`` compiles every module from source in
    each server and in each timed import."""
    for folder in ("quart_claude", "bench"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def import_seconds() -> float:
    """Wall time of ``import quart_claude`` in a fresh interpreter (past the interpreter's
    own start), the median of five."""
    script = (
        "import time; t = time.perf_counter(); import quart_claude; print(time.perf_counter() - t)"
    )
    runs = [
        float(subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout)
        for _ in range(5)
    ]  # fmt: skip
    return statistics.median(runs)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(measurements: list[Measurement]) -> str:
    floor = {m.scenario: m.cpu_us_per_event or 0.0 for m in measurements if m.system == "bare"}
    common = {m.scenario: m.cpu_us_per_event or 0.0 for m in measurements if m.system == "common"}
    rows = [
        "| scenario | system | streams | events | failures | CPU µs/event | vs floor | "
        "vs common | latency p50 / p99 ms | TTFT overhead ms | TTFT p50 / p99 ms | events/s | "
        "peak RSS MiB | RSS KiB/stream | CPU ms/stream |",
        "|" + "---|" * 15,
    ]
    for m in measurements:
        ratio = (
            f"{m.cpu_us_per_event / floor[m.scenario]:.2f}x"
            if m.cpu_us_per_event and floor.get(m.scenario)
            else "-"
        )
        vs_common = (
            f"{m.cpu_us_per_event / common[m.scenario]:.0%}"
            if m.cpu_us_per_event and common.get(m.scenario)
            else "-"
        )
        rows.append(
            f"| {m.scenario} | {m.system} | {m.streams} | {m.events} | {m.failures} | "
            f"{_fmt(m.cpu_us_per_event)} | {ratio} | {vs_common} | "
            f"{_fmt(m.latency_p50_ms, 1)} / {_fmt(m.latency_p99_ms, 1)} | "
            f"{_fmt(m.ttft_overhead_ms, 1)} | {_fmt(m.ttft_p50_ms)} / {_fmt(m.ttft_p99_ms)} | "
            f"{_fmt(m.events_per_s)} | "
            f"{_fmt(m.peak_rss_mib, 1)} | {_fmt(m.rss_per_stream_kib, 1)} | "
            f"{_fmt(m.cpu_ms_per_stream, 2)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
