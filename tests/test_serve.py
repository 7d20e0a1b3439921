"""The status page, /status.json, /healthz and /metrics, served by a run (`--serve`) and by
`crawlproc serve`, read by real clients: urllib, prometheus_client's parser, raw sockets.
(The browser test is in test_serve_browser.py.)

Runs use tests/gated_processor.py, whose tasks wait at gates the test opens: what a test
looks at is a state the run holds until the test lets it go on, never a guessed moment.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, make_tree, out_held, run_cli, wait_until

GATED = f"{REPO / 'tests' / 'gated_processor.py'}:gated"
SCRIPT_NAME = "<script>alert(1)</script>.txt"  # a folder `<script>alert(1)<` holding `script>.txt`
FILES = 12  # plain files; with SCRIPT_NAME (fails) and last.txt (waits at the last gate): 14 tasks
RUN_TIMEOUT = 120
URL_TIMEOUT = 60
HTTP_TIMEOUT = 10


class Served:
    """A crawlproc subprocess serving the page (`run/watch --serve 0` or `serve --port 0`);
    its URL is read from its stderr, where it says which port it took."""

    def __init__(self, tmp_path: Path, *args: str, name: str) -> None:
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crawlproc", *args], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True)
        self.url = wait_until(self._url, URL_TIMEOUT, f"the URL in the stderr of crawlproc {' '.join(args)}")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _url(self) -> str | None:
        if self.proc.poll() is not None:
            pytest.fail(f"crawlproc exited with {self.proc.returncode} before serving:\n{self.stderr}")
        found = re.search(r"http://localhost:\d+/", self.stderr)
        return found.group(0) if found else None

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"crawlproc did not finish within {RUN_TIMEOUT}s:\n{self.stderr[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=RUN_TIMEOUT)


@pytest.fixture
def served(tmp_path):
    """Start Served processes; any still running at the end is killed with its group."""
    started: list[Served] = []

    def start(*args: str, name: str = "crawlproc") -> Served:
        started.append(Served(tmp_path, *args, name=f"{name}-{len(started)}"))
        return started[-1]

    yield start
    for process in started:
        process.kill()


class Gates:
    """The gated tree of a test, and the two gates its tasks wait at."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = make_tree(tmp_path / "data", {**{f"a{i:02}.txt": f"line {i}\n" for i in range(FILES)},
                                                  "last.txt": "the end\n", SCRIPT_NAME: "x\n"})
        self.out = tmp_path / "out"
        self.first, self.last = tmp_path / "gate", tmp_path / "last-gate"

    def run_args(self, *extra: str) -> list[str]:
        return ["run", str(self.data), "-o", str(self.out), "-p", GATED, "--param", f"gate={self.first}",
                "--param", f"last_gate={self.last}", "--batch-size", "1", "-w", "2", "--no-progress", *extra]


@pytest.fixture
def gates(tmp_path) -> Gates:
    return Gates(tmp_path)


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def status_json(url: str) -> dict:
    status, _, body = get(url + "status.json")
    assert status == 200
    return json.loads(body)


def status_cli(out: Path) -> dict:
    result = run_cli("status", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client: 'name{label="v"}' -> value."""
    status, headers, body = get(url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def finished_out(tmp_path: Path) -> Path:
    """A small OUT whose run has finished."""
    data = make_tree(tmp_path / "data", {"a.txt": "one\n", "b.txt": "two\n"})
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "--no-progress").returncode == 0
    return out


# -- a run serving its page ------------------------------------------------------------------

def test_metrics_follow_a_run_and_parse_as_prometheus_text(gates, served):
    run = served(*gates.run_args("--retries", "1", "--retry-delay", "0", "--serve", "0"), name="run")
    before = wait_until(lambda: (lambda s: s if s["crawlproc_run_going"] == 1 and "crawlproc_workers" in s
                                 else None)(metrics(run.url)), URL_TIMEOUT, "the run's first snapshot")
    assert before["crawlproc_tasks_done_total"] == 0 and before['crawlproc_tasks{state="done"}'] == 0
    gates.first.touch()
    # All but last.txt done (it waits at the last gate), and the <script> file failed once and is
    # tried again (maybe queued behind last.txt on its worker: its second failure may wait).
    wait_until(lambda: (lambda s: s["crawlproc_tasks_done_total"] == FILES and s["crawlproc_tasks_retried_total"] == 1)(
        metrics(run.url)), RUN_TIMEOUT, "12 done and a retry")
    samples = wait_until(lambda: (lambda s, counts: s if all(s[f'crawlproc_tasks{{state="{k}"}}'] == v
                                                             for k, v in counts.items()) else None)(
        metrics(run.url), status_cli(gates.out)["counts"]), URL_TIMEOUT, "the ledger's counts in /metrics")
    assert samples['crawlproc_tasks{state="done"}'] == FILES and samples["crawlproc_tasks_running"] >= 1
    buckets = [v for k, v in samples.items() if k.startswith("crawlproc_task_duration_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["crawlproc_task_duration_seconds_count"] == FILES
    assert samples["crawlproc_task_duration_seconds_sum"] > 0
    assert samples["crawlproc_workers"] == 2 and "crawlproc_files_per_second" in samples
    gates.last.touch()
    assert run.finish() == 1  # one task failed

    after = served("serve", "-o", str(gates.out), "--port", "0", name="serve")
    samples = metrics(after.url)
    assert samples["crawlproc_tasks_done_total"] == FILES + 1 and samples["crawlproc_tasks_failed_total"] == 1
    assert samples["crawlproc_tasks_retried_total"] == 1  # from the ledger: the failed task's second attempt
    assert samples['crawlproc_tasks{state="done"}'] == FILES + 1 and samples["crawlproc_run_going"] == 0
    assert "crawlproc_oldest_pending_age_seconds" not in samples  # nothing pending: no made-up age
    assert after.stop() == 0


def test_a_runs_task_times_are_its_own_and_serve_shows_the_ledgers(gates, served):
    """/metrics of a run counts the times of the tasks it did (as its done counter does: a
    Prometheus histogram never goes down while its process lives); `crawlproc serve` shows
    every done task's in the ledger."""
    gates.first.touch()
    gates.last.touch()
    assert run_cli(*gates.run_args()).returncode == 1  # the <script> file failed
    gates.last.unlink()
    (gates.data / "b-later.txt").write_text("new\n")  # before last-new.txt in every worker's queue
    (gates.data / "last-new.txt").write_text("newer\n")  # waits at the last gate
    run = served(*gates.run_args("--serve", "0"), name="rerun")
    samples = wait_until(lambda: (lambda s: s if s["crawlproc_tasks_done_total"] == 1
                                  and s['crawlproc_tasks{state="done"}'] == FILES + 2 else None)(metrics(run.url)),
                         RUN_TIMEOUT, "b-later.txt done by the rerun, in the ledger's counts too")
    assert samples["crawlproc_task_duration_seconds_count"] == 1
    assert samples['crawlproc_task_duration_seconds_bucket{le="+Inf"}'] == 1
    gates.last.touch()
    assert run.finish() == 1  # the failed task is still failed

    after = served("serve", "-o", str(gates.out), "--port", "0", name="serve")
    assert metrics(after.url)["crawlproc_task_duration_seconds_count"] == FILES + 3
    assert after.stop() == 0


def test_status_json_is_status_and_the_live_run(gates, served):
    run = served(*gates.run_args("--retries", "0", "--serve", "0"), name="run")
    busy = wait_until(lambda: [w for w in (status_json(run.url)["live"] or {}).get("workers", []) if w["relpath"]],
                      URL_TIMEOUT, "workers on their first tasks")
    assert all(w["pid"] > 0 and w["rss_bytes"] > 0 and w["running_s"] >= 0 for w in busy)
    gates.first.touch()
    document = wait_until(lambda: (lambda d: d if d["counts"]["done"] == FILES and d["counts"]["failed"] == 1
                                   else None)(status_json(run.url)), RUN_TIMEOUT, "12 done and 1 failed")
    status = status_cli(gates.out)
    assert {key: document[key] for key in ("out", "counts", "total", "data_dir", "processor", "running_pid")} == \
           {key: status[key] for key in ("out", "counts", "total", "data_dir", "processor", "running_pid")}
    assert set(status) <= set(document)
    assert [w["relpath"] for w in document["live"]["workers"] if w["relpath"]] == ["last.txt"]
    assert document["latest_failures"][0]["relpath"] == SCRIPT_NAME
    assert "ValueError" in document["latest_failures"][0]["error"]
    assert document["live"]["source"] == "run" and document["live"]["history"]
    gates.last.touch()
    assert run.finish() == 1


def test_read_only_and_nothing_from_elsewhere(tmp_path, served):
    out = finished_out(tmp_path)
    server = served("serve", "-o", str(out), "--port", "0", name="serve")
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = get(server.url + "status.json", method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    assert get(server.url + "results/")[0] == 404
    assert get(server.url + "../ledger.db")[0] == 404
    assert get(server.url + "healthz")[2] == b"ok\n"
    status, headers, page = get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert not re.search(rb"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page)  # no address elsewhere
    assert json.loads(get(server.url + "status.json")[2])["counts"] == status_cli(out)["counts"]
    assert server.stop() == 0


# -- errors a user can cause -----------------------------------------------------------------

def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "one\n"})
    out = tmp_path / "out"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", str(data), "-o", str(out), "--serve", str(port))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], result.stderr
    assert f"crawlproc run {data} -o {out} --serve=0" in lines[0]  # the same command, any free port
    assert not out.exists()  # refused before anything was written


def test_a_served_run_on_an_out_in_use_is_refused_before_its_page_is_announced(tmp_path):
    """It logged 'status page: http://...' (and served it a moment), then exited 3."""
    data = make_tree(tmp_path / "data", {"a.txt": "one\n"})
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-q").returncode == 0
    with out_held(out):
        result = run_cli("run", str(data), "-o", str(out), "--serve", "0")
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [f"crawlproc: another crawlproc (pid {os.getpid()}) is using {out}"]


def test_serve_command_port_in_use(tmp_path):
    out = finished_out(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "-o", str(out), "--port", str(port))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"crawlproc serve -o {out} --port=0" in result.stderr


HIDE_PROMETHEUS_CLIENT = """
import sys

class HidePrometheusClient:  # as if it were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "prometheus_client":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HidePrometheusClient())
"""


def test_without_prometheus_client_serve_is_one_line_naming_the_extra(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "one\n"})
    hidden = make_tree(tmp_path / "hide", {"sitecustomize.py": HIDE_PROMETHEUS_CLIENT})
    env = {"PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "--serve", "0", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "crawlproc: the status page and /metrics need prometheus_client: pip install 'crawlproc[serve]'"]
    result = run_cli("serve", "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 2 and "crawlproc[serve]" in result.stderr


@pytest.mark.parametrize("value", ["nonsense", "host:", "80000", ":8080"])
def test_a_bad_serve_address_is_a_usage_error(tmp_path, value):
    result = run_cli("run", str(tmp_path), "-o", str(tmp_path / "out"), "--serve", value)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--serve" in result.stderr and "[HOST:]PORT" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_host_is_one_line_exit_2_and_nothing_listens(tmp_path):
    """An empty $HOST in a script (`--host "$HOST"`) once listened on every interface."""
    out = finished_out(tmp_path)
    for host in ("", "   "):
        with socket.socket() as probe:  # a port free now, to see that nothing takes it
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = run_cli("serve", "-o", str(out), "--host", host, "--port", str(port), timeout=URL_TIMEOUT)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "'--host'" in result.stderr and "empty" in result.stderr and "0.0.0.0" in result.stderr
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT).close()


def test_an_empty_host_is_refused_from_python_too(tmp_path):
    from crawlproc.errors import UsageError
    from crawlproc.serve import Address, serve_out
    from crawlproc.serve.page_process import PageProcess

    out = finished_out(tmp_path)

    def ready(url: str) -> None:
        pytest.fail(f"served on {url}")

    for host in ("", " ", "[]"):
        with pytest.raises(UsageError, match="empty"):
            serve_out(out, Address(host, 0), ready=ready)
        with pytest.raises(UsageError, match="empty"):
            PageProcess(Address(host, 0), out).close()


def test_serve_of_a_folder_without_ledger_says_so(tmp_path):
    result = run_cli("serve", "-o", str(tmp_path / "nowhere"), "--port", "0")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"crawlproc: OUT {tmp_path / 'nowhere'} does not exist"]


# -- slow clients never stall the run, nor lock others out of the page --------------------------

def test_stuck_clients_never_stall_the_run(gates, served):
    from crawlproc.serve.server import Limits

    run = served(*gates.run_args("--retries", "0", "--serve", "0"), name="run")
    port = int(run.url.rsplit(":", 1)[1].strip("/"))
    stuck = []
    try:
        for _ in range(2 * Limits().waiting):  # more than the server keeps waiting: the oldest are dropped
            stuck.append(socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT))
            stuck[-1].sendall(b"GET /status.json HTTP/1.1\r\n")  # and never ends its request
        assert get(run.url + "healthz")[2] == b"ok\n"
        gates.first.touch()
        gates.last.touch()
        assert run.finish() == 1  # the run went through to its end (the <script> file failed)
    finally:
        for connection in stuck:
            connection.close()
    assert status_cli(gates.out)["counts"]["done"] == FILES + 1


TRICKLE_SECONDS = 0.5  # well under the 10 s a read once waited: such a client was never cut off


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server has closed `connection` without answering it (never waits)."""
    if not select.select([connection], [], [], 0)[0]:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


class Tricklers:
    """Clients that send a request line, then a header a byte every TRICKLE_SECONDS, never
    ending it ("slowloris"); a thread of the test sends the bytes."""

    def __init__(self, port: int, count: int) -> None:
        self.connections = []
        for _ in range(count):
            self.connections.append(socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT))
            self.connections[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slowly: ")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(TRICKLE_SECONDS):
            for connection in self.connections:
                try:
                    connection.sendall(b".")
                except OSError:
                    pass  # cut off by the server: closed_by_server says so

    def all_cut_off(self) -> bool:
        return all(closed_by_server(connection) for connection in self.connections)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HTTP_TIMEOUT)
        for connection in self.connections:
            connection.close()


def answers(url: str) -> int | None:
    """The status of GET `url`, or None when the server closed the connection unanswered."""
    try:
        return get(url)[0]
    except (OSError, http.client.HTTPException):  # RemoteDisconnected, ConnectionResetError, timeout
        return None


def test_idle_and_trickling_clients_do_not_lock_others_out_of_the_page(tmp_path, served):
    """Clients that connect and send nothing (a browser's speculative connections) or trickle
    their request a byte at a time, more of them than there are threads to answer with:
    everyone else is still answered."""
    from crawlproc.serve.server import Limits

    limits = Limits()
    out = finished_out(tmp_path)
    server = served("serve", "-o", str(out), "--port", "0", name="serve")
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    tricklers = Tricklers(port, limits.answering + 4)  # first: each once held a thread for good
    idle = []
    try:
        for _ in range(limits.waiting - len(tricklers.connections) - 4):  # none dropped to make room
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT))
        assert wait_until(lambda: answers(server.url + "healthz") == 200, URL_TIMEOUT, "/healthz beside them")
        assert answers(server.url + "status.json") == 200 and answers(server.url) == 200
    finally:
        tricklers.close()
        for connection in idle:
            connection.close()
    assert server.stop() == 0


@contextmanager
def page_in_process(out: Path, **limits: float):
    """A StatusServer in this process on any free port, with the limits given: its URL."""
    from crawlproc.serve import Address
    from crawlproc.serve.board import LedgerBoard
    from crawlproc.serve.server import Limits, StatusServer, listening_socket, page_url
    from crawlproc.serve.view import StatusView

    sock, bound = listening_socket(Address("127.0.0.1", 0), "--port")
    server = StatusServer(sock, StatusView(out, LedgerBoard()), limits=Limits(**limits))
    server.start()
    try:
        yield page_url(bound)
    finally:
        server.close()


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline(tmp_path):
    """The whole request must come within request_seconds of the connection: a byte now and
    then does not keep a client in."""
    deadline = 1.0
    with page_in_process(tmp_path / "out", request_seconds=deadline) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        started = time.monotonic()
        tricklers = Tricklers(port, 1)
        try:
            wait_until(tricklers.all_cut_off, URL_TIMEOUT, "the trickling client to be cut off")
            assert time.monotonic() - started >= deadline  # not before its deadline
        finally:
            tricklers.close()
        assert answers(url + "healthz") == 200  # and the server goes on


def test_clients_waiting_for_their_request_hold_no_thread_and_the_oldest_makes_room(tmp_path):
    """More trickling clients than threads to answer with: others are answered; with `waiting`
    connections still sending their request, a new one drops the oldest of them. The deadline
    is far off, so nothing else closes any of them."""
    with page_in_process(tmp_path / "out", waiting=4, answering=1, request_seconds=RUN_TIMEOUT) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        tricklers = Tricklers(port, 2)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)]
        try:
            assert answers(url + "healthz") == 200  # the 4th waiting connection: room for it
            assert not any(closed_by_server(connection) for connection in (*tricklers.connections, *idle))
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT))  # 4 waiting
            assert answers(url + "healthz") == 200  # a 5th: the oldest goes
            oldest, *others = tricklers.connections + idle
            wait_until(lambda: closed_by_server(oldest), HTTP_TIMEOUT, "the oldest to be dropped")
            assert not any(closed_by_server(connection) for connection in others)
        finally:
            tricklers.close()
            for connection in idle:
                connection.close()


def test_an_answer_the_client_does_not_read_is_cut_off_at_its_deadline():
    """Writing an answer takes at most answer_seconds in all, from its first write on."""
    from crawlproc.serve.handler import DeadlineWriter

    ours, client = socket.socketpair()  # the client never reads: the buffers fill, then sendall waits
    with ours, client:
        now = [100.0]
        writer = DeadlineWriter(ours, 1.0, clock=lambda: now[0])
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")  # the headers: in the buffer at once
        now[0] += 1.5
        with pytest.raises(TimeoutError):
            writer.write(b"the body")  # late: the deadline counts from the first write

        writer = DeadlineWriter(ours, 1.0)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            for _ in range(64):  # 64 MB: more than any socket buffer holds
                writer.write(bytes(1 << 20))
        assert time.monotonic() - started >= 1.0


# -- watch -----------------------------------------------------------------------------------

def page_processes(coordinator_pid: int, url: str) -> list:
    """The coordinator's children that listen on the page's port."""
    import psutil

    port = int(url.rstrip("/").rsplit(":", 1)[1])
    try:
        children = psutil.Process(coordinator_pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_the_page_has_a_process_of_its_own_that_ends_with_the_run(gates, served):
    """No request, ledger read or import of the page runs in the coordinator: the page process
    serves it, and ends when the run ends, even one killed with -9."""
    import psutil

    run = served(*gates.run_args("--serve", "0"), name="run")
    assert status_json(run.url)["out"] == str(gates.out)
    [page] = wait_until(lambda: page_processes(run.proc.pid, run.url), URL_TIMEOUT, "the page process")
    coordinator_threads = psutil.Process(run.proc.pid).threads()
    os.kill(run.proc.pid, signal.SIGKILL)  # the coordinator alone: its workers wait at the gate
    run.proc.wait(timeout=RUN_TIMEOUT)

    def page_ended() -> bool:
        try:
            return page.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(page_ended, RUN_TIMEOUT, "the page process to end with its coordinator")
    assert len(coordinator_threads) == 1  # nothing of the page ran in the coordinator


def test_a_process_with_other_threads_starts_the_page_as_a_new_interpreter(tmp_path):
    """Forking a process with other threads could copy a held lock (a notebook using the API):
    the page process is then a new interpreter, fed the same way."""
    from crawlproc.serve import Address
    from crawlproc.serve.page_process import PageProcess

    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(RUN_TIMEOUT,), daemon=True)
    other.start()
    try:
        page = PageProcess(Address("127.0.0.1", 0), tmp_path / "out")
    finally:
        release.set()
    try:
        assert page._process is not None  # not forked
        assert wait_until(lambda: get(page.url + "healthz")[0] == 200, URL_TIMEOUT, "the page to answer")
        snapshot = {"done": 7, "failed": 1, "retried": 0, "running": 0, "scanned": 8, "scan_finished": True,
                    "pending_left": 0, "stopping": False, "executor": None, "workers": [], "watch": None,
                    "source": "run", "at": 1e9, "final": False, "durations": [[1] * 12, 8, 0.5]}
        page.send(snapshot)
        live = wait_until(lambda: status_json(page.url)["live"], URL_TIMEOUT, "the snapshot on the page")
        assert live["done"] == 7 and status_json(page.url)["task_durations"]["count"] == 8
    finally:
        page.close()
    assert page._process.returncode == 0


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_the_run_waits_for_its_page_process_to_end_and_no_longer(monkeypatch, pidfd):
    """Closing the page waits for its process to end (no process is left behind), wakes as soon
    as it has, and kills a page process that does not end in time; on a kernel without pidfd
    too."""
    from crawlproc.children import wait_for_exit
    from crawlproc.serve import page_process

    if not pidfd:
        def no_pidfd(pid: int) -> int:
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(page_process.os, "pidfd_open", no_pidfd)
    end_r, ends = os.pipe()  # the child ends once our end is closed
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ends)
            os.read(end_r, 1)
        finally:
            os._exit(0)
    os.close(end_r)
    assert not wait_for_exit(pid, 0.05)  # still going
    os.close(ends)
    assert wait_for_exit(pid, RUN_TIMEOUT)
    os.waitpid(pid, 0)

    stuck = os.fork()
    if stuck == 0:
        try:
            while True:
                signal.pause()
        finally:
            os._exit(0)
    page_process._reap(stuck, 0.05)  # not ending: killed, then reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(stuck, os.WNOHANG)


def test_watch_shows_its_queue_and_lag(tmp_path, served):
    data = make_tree(tmp_path / "data", {"a.txt": "one\n"})
    os.utime(data / "a.txt", (0, 0))  # settled long ago: the catch-up processes it
    watch = served("watch", str(data), "-o", str(tmp_path / "out"), "--settle", "300", "--no-progress",
                   "--serve", "0", name="watch")
    wait_until(lambda: status_json(watch.url)["counts"]["done"] == 1, RUN_TIMEOUT, "the catch-up")
    with open(data / "growing.txt", "w") as growing:  # open: no close event, so it waits to settle
        growing.write("still writing\n")
        growing.flush()
        live = wait_until(lambda: (lambda live: live if live["watch"]["queue_depth"] == 1 and
                                   live["watch"]["lag_s"] > 0 else None)(status_json(watch.url)["live"]),
                          URL_TIMEOUT, "the open file in the watcher's queue")
        assert live["source"] == "watch"
        samples = metrics(watch.url)
        assert samples["crawlproc_watch_queue_depth"] == 1 and samples["crawlproc_watcher_lag_seconds"] > 0
    # Closed after writing: it settles at once and becomes a task.
    wait_until(lambda: status_json(watch.url)["counts"]["done"] == 2, RUN_TIMEOUT, "growing.txt processed")
    assert wait_until(lambda: status_json(watch.url)["live"]["watch"]["queue_depth"] == 0, URL_TIMEOUT,
                      "an empty queue")
    assert watch.stop() == 0


# -- pieces, in-process --------------------------------------------------------------------------

def test_parse_address():
    from crawlproc.errors import UsageError
    from crawlproc.serve import Address, parse_address

    assert parse_address("8080") == Address("127.0.0.1", 8080)
    assert parse_address("0") == Address("127.0.0.1", 0)
    assert parse_address("0.0.0.0:9000") == Address("0.0.0.0", 9000)
    assert parse_address("[::1]:9000") == Address("::1", 9000)
    assert str(Address("::1", 9000)) == "[::1]:9000"
    for bad in ("", "x", "65536", "host:", ":80", " :80", "[ ]:80", "1.2.3.4:port"):
        with pytest.raises(UsageError):
            parse_address(bad)


def test_live_board_publishes_at_most_every_half_second_and_keeps_the_run_going():
    from crawlproc.serve.board import LiveBoard, RelayedBoard

    class Coordinator:  # what the board asks of a coordinator: its live view, and its done times
        done = 0
        on_done_times = None

        def live_view(self) -> dict:
            if self.done < 0:
                raise RuntimeError("broken view")
            return {"done": self.done, "failed": 0}

    clock = [100.0]
    page = RelayedBoard()
    sent = []

    def send(snapshot: dict) -> None:  # as the page process gets it: through JSON
        sent.append(snapshot)
        page.receive(json.loads(json.dumps(snapshot)))

    board = LiveBoard("run", send, every=0.5, clock=lambda: clock[0], wall=lambda: clock[0] + 1e9)
    coordinator = Coordinator()
    board.follow(coordinator)
    seen = []
    hook = board.progress_hook(seen.append)
    for turn in range(10):  # ten turns within 0.45 s: one snapshot
        clock[0] = 100.0 + turn * 0.05
        coordinator.done = turn
        coordinator.on_done_times([0.002] * turn)
        hook({"final": False})
    assert len(seen) == 10 and len(sent) == 1 and page.current["done"] == 0
    clock[0] = 100.5
    hook({})
    assert page.current["done"] == 9 and len(page.current["history"]) == 2
    assert page.durations().count == 45 and page.durations().cumulative[-1] == 45
    snapshot = page.current
    with pytest.raises(TypeError):
        snapshot["done"] = 1  # read-only: the server's threads read it without a lock
    coordinator.done = -1
    clock[0] += 1
    hook({"final": True})  # a broken view is logged once; the run's hook carries on
    assert page.current is snapshot and len(seen) == 12


def test_history_thins_and_rate_follows_the_recent_stretch():
    from crawlproc.serve.board import History
    from crawlproc.serve.view import eta_seconds, recent_rate

    history = History(limit=8)
    for second in range(20):
        points = history.add(float(second), 10 * second)
    assert len(points) <= 8 and points[-1] == (19.0, 190) and points == tuple(sorted(points))
    assert recent_rate(points) == 10.0
    assert recent_rate(((0.0, 0), (100.0, 0), (110.0, 50))) == 5.0  # the last 30 s only
    assert recent_rate(((5.0, 3),)) is None
    assert eta_seconds(10.0, 100) == 10.0 and eta_seconds(None, 5) is None and eta_seconds(0.0, 0) == 0.0


def test_the_run_counts_its_task_times_into_prometheus_buckets():
    from crawlproc.serve.board import DurationHistogram

    histogram = DurationHistogram((0.01, 1.0, 5.0))
    assert histogram.read() == ((0, 0, 0), 0, 0.0)
    histogram.add([0.003, 2.0, 0.01])  # "le": a time equal to a bound is in that bound's bucket
    histogram.add([])
    histogram.add([7.0])
    durations = histogram.read()
    assert durations.cumulative == (2, 2, 3) and durations.count == 4
    assert durations.sum == pytest.approx(9.013)


# -- in a real browser -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,1000")


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium driven by selenium, with a fresh profile."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); scripts/test "
                    "installs them with apt-get when it runs as root")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(URL_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def shown_counts(driver) -> dict[str, int] | None:
    """The counts the page shows, as numbers (None while it shows none yet)."""
    from selenium.webdriver.common.by import By

    texts = {state: driver.find_element(By.ID, f"count-{state}").text
             for state in ("pending", "running", "done", "failed", "gone")}
    if any(not text.replace(",", "").isdigit() for text in texts.values()):
        return None
    return {state: int(text.replace(",", "")) for state, text in texts.items()}


def test_the_page_in_a_browser_follows_the_run_and_ends_as_status_says(gates, served, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    run = served(*gates.run_args("--retries", "0", "--serve", "0"), name="run")
    browser.get(run.url)
    # Held at the first gate: nothing done, and the workers show the tasks they wait in.
    first = wait_until(lambda: shown_counts(browser), URL_TIMEOUT, "counts on the page")
    assert first["done"] == 0 and first["failed"] == 0
    wait_until(lambda: ".txt" in browser.find_element(By.ID, "workers").text, URL_TIMEOUT, "a worker's task")
    gates.first.touch()
    # Held at the last gate: the counts shown have moved on, and are what `status --json` says.
    wait_until(lambda: (shown_counts(browser) or {}).get("done") == FILES, RUN_TIMEOUT, "12 done on the page")
    wait_until(lambda: shown_counts(browser) == status_cli(gates.out)["counts"], URL_TIMEOUT,
               "the page's counts to be status --json's")
    # (read in one script: the page redraws its tables each second)
    wait_until(lambda: SCRIPT_NAME in browser.execute_script(
        "return [...document.querySelectorAll('#failures td.path')].map((td) => td.textContent)"),
        URL_TIMEOUT, "the failed file, shown as text")
    assert "ValueError" in browser.find_element(By.ID, "failures").text
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # the file's name made no element
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    screenshot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gates.last.touch()
    assert run.finish() == 1
    wait_until(lambda: browser.find_element(By.ID, "state").text == "disconnected", URL_TIMEOUT,
               "the page to see the run end")

    # The finished OUT, served from its ledger: the page ends where `status --json` does.
    after = served("serve", "-o", str(gates.out), "--port", "0", name="serve")
    browser.get(after.url)
    final = status_cli(gates.out)["counts"]
    assert final == {"pending": 0, "running": 0, "done": FILES + 1, "failed": 1, "gone": 0}
    wait_until(lambda: shown_counts(browser) == final, URL_TIMEOUT, "the final counts on the page")
    assert "finished (exit 1)" in browser.find_element(By.ID, "state").text
    assert after.stop() == 0
