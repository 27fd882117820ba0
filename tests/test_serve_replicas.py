"""Several `unnoise serve` replicas on one PostgreSQL queue (``--store``): failover when a replica is killed, a
database outage, and what crosses replicas (cancel, AUTOMATIC1111's interrupt of an ``n_iter`` request, event
streams, images). The replicas are real processes (the embedded default model, one thread each) behind nginx
(docs/nginx-replicas.conf) on loopback ports, or in-process servers for the quicker checks; PostgreSQL is a
throwaway cluster (tests/pg_cluster.py). Every wait has a generous bound: the machine has two shared cores."""

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from helpers import free_port, run_cli
from pg_cluster import running_cluster
from test_serve import (
    ROOT,
    ThreadServer,
    build_tiny_pipeline,
    events,
    parse_prometheus,
    png_parameters,
    post,
    start_process,
    stop_process,
    wait_ready,
)

from unnoise import Pipeline
from unnoise.serve.config import ServeConfig
from unnoise.serve.store import FINAL, open_store

LEASE_S = 3.0  # the replicas' --lease: a killed replica's jobs run elsewhere after about this long
# Recovery (the killed replica's jobs queued again or taken by the other) within a lease after the last renewal
# (renewals come every quarter lease), plus the half lease between two expiry checks of the other replica, plus
# slack for a loaded machine.
RECOVERY_BOUND_S = LEASE_S + LEASE_S / 2 + 5.0
STEPS = 10  # per job: a batch of 4 runs for about a second on one thread
NGINX_CONF = ROOT / "docs" / "nginx-replicas.conf"


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster()


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:  # never a skip: CI installs nginx (.ci/run)
        pytest.fail("nginx was not found: install Debian's package: apt-get install nginx-light")
    return found


class Nginx:
    """docs/nginx-replicas.conf with this test's ports and a temporary folder, in the foreground."""

    def __init__(self, port: int, upstreams: list[int]):
        self.port, self.dir = port, Path(tempfile.mkdtemp(prefix="unnoise-nginx-"))
        conf = NGINX_CONF.read_text().replace("/tmp/unnoise-nginx", str(self.dir))
        servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstreams)
        conf, count = re.subn(r"(        server 127\.0\.0\.1:800[12];\n)+", servers, conf)
        assert count == 1, "the example's upstream block changed: update this test"
        conf = conf.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{port};")
        (self.dir / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen([nginx_binary(), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.process.stderr.read()
            with contextlib.suppress(requests.ConnectionError):
                requests.get(f"{self.base}/health", timeout=5)
                return
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


class Replica:
    """``python -m unnoise.serve --store URL`` on its own port: start, kill, start again."""

    def __init__(self, url: str, *extra: str):
        self.url, self.extra, self.port = url, extra, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["--store", self.url, "--threads", "1", "--no-warmup", "--lease", str(LEASE_S), "--max-batch", "4",
                "--max-queue", "64", *self.extra]  # fmt: skip
        self.process = start_process(args, self.port)

    def wait_ready(self) -> None:
        wait_ready(self.base, timeout=120, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture(scope="module")
def replicas(cluster):
    """Two replicas on one database and nginx round-robin in front: (replicas, nginx, database URL)."""
    url = cluster.create_database(f"r_{uuid.uuid4().hex[:10]}")
    pair = [Replica(url), Replica(url)]
    for replica in pair:
        replica.start()
    nginx = None
    try:
        for replica in pair:
            replica.wait_ready()
        nginx = Nginx(free_port(), [r.port for r in pair])
        yield pair, nginx, url
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in pair:
            replica.stop()


def get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, timeout=30, **kwargs)


def final_jobs(base: str, ids: list[str], timeout: float, tolerate_503: bool = False) -> dict[str, dict]:
    """{id: job} once every job is finished, polled through ``base``; each job's first finished answer, and a
    later answer must never differ from it (one outcome as the client sees it)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(ids):
        assert time.monotonic() < deadline, f"{len(ids) - len(seen)} jobs unfinished after {timeout} s"
        for job_id in ids:
            response = get(f"{base}/v1/jobs/{job_id}")
            if response.status_code == 503 and tolerate_503:
                continue
            assert response.status_code == 200, response.text
            job = response.json()
            if job["status"] in FINAL:
                assert seen.setdefault(job_id, job) == job, f"job {job_id} was reported twice, differently"
        time.sleep(0.2)
    return seen


# -- acceptance 1: failover ------------------------------------------------------------------------------------------


def test_a_killed_replica_s_jobs_run_on_the_other_once_each(replicas):
    """40 jobs through nginx; the first replica is SIGKILLed while the store shows it holding jobs (frozen with
    SIGSTOP while that is checked, so it cannot finish them meanwhile), and restarted later. Every job succeeds
    once, its image downloads from either replica, nothing is lost or doubled, and the killed replica's jobs are
    back in the queue (or taken) within ``RECOVERY_BOUND_S`` of the kill."""
    (a, b), nginx, url = replicas
    submitted = []
    for i in range(40):
        response = post(nginx.base, "/v1/jobs", {"prompt": f"a digit {i % 10}", "steps": STEPS, "seed": 1000 + i})
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    assert len(set(submitted)) == 40
    for replica in (a, b):  # round-robin: both replicas took submissions
        metrics = get(f"{replica.base}/metrics").text
        assert re.search(r'unnoise_http_requests_total\{route="/v1/jobs",status="202"\} ([1-9]\d*)', metrics)

    store = open_store(url)
    try:

        def held_by(replica: Replica) -> set[str]:
            records, _ = store.page(100, 0, "running")
            return {r["id"] for r in records if r["worker"].split("/")[-2] == str(replica.process.pid)}

        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the first replica never held a job"
            a.process.send_signal(signal.SIGSTOP)
            lost = held_by(a)
            if lost:
                break
            a.process.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        a.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.process.wait(30)
        while held_by(a):  # what it held goes back to the queue when its lease runs out
            assert time.monotonic() - killed < RECOVERY_BOUND_S + 30, "the killed replica's jobs were never recovered"
            time.sleep(0.1)
        recovery = time.monotonic() - killed
        print(f"\nfailover: {len(lost)} jobs held by the killed replica, recovered {recovery:.2f} s after the kill "
              f"(lease {LEASE_S} s, bound {RECOVERY_BOUND_S} s)")  # fmt: skip
        assert recovery <= RECOVERY_BOUND_S

        a.start()  # restarted later: it serves again beside the other
        a.wait_ready()
        done = final_jobs(nginx.base, submitted, timeout=240)
        assert {job["status"] for job in done.values()} == {"succeeded"}
        records = {job_id: store.get(job_id) for job_id in submitted}
        assert store.counts()["succeeded"] == 40 and sum(store.counts().values()) == 40  # none lost, none added
        assert all(len(record["images"]) == 1 for record in records.values())
        assert all(records[job_id]["attempts"] == 2 for job_id in lost)  # run again after the kill
        for i, job_id in enumerate(submitted):
            pngs = {get(f"{replica.base}/v1/images/{job_id}/0.png").content for replica in (a, b)}
            assert len(pngs) == 1 and png_parameters(pngs.pop())["seed"] == 1000 + i
        assert final_jobs(nginx.base, submitted, timeout=60) == done  # still the same outcome
    finally:
        store.close()


# -- acceptance 2: a database outage ---------------------------------------------------------------------------------


def test_a_database_outage_refuses_new_work_and_loses_nothing(replicas, cluster):
    """PostgreSQL stopped for a few seconds while jobs run: both replicas report not ready, every API answers 503
    with Retry-After in its error shape, and every job accepted before completes afterwards."""
    (a, b), nginx, _ = replicas
    accepted = [post(nginx.base, "/v1/jobs", {"prompt": "a three", "steps": STEPS, "seed": i}).json()["id"]
                for i in range(12)]  # fmt: skip
    deadline = time.monotonic() + 60
    while get(f"{nginx.base}/v1/jobs", params={"status": "running"}).json()["total"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster.stop("fast")
    try:
        for replica in (a, b):
            deadline = time.monotonic() + 30
            while (ready := get(f"{replica.base}/ready")).status_code != 503:
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.1)
            assert ready.json()["status"] == "store_unavailable" and int(ready.headers["Retry-After"]) >= 1
        for path, body in (("/v1/jobs", {"prompt": "x", "steps": 2}), ("/v1/images/generations", {"prompt": "x"}),
                           ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})):  # fmt: skip
            response = post(nginx.base, path, body)
            assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1, response.text
            error = response.json()
            assert error["error"]["code"] == "store_unavailable" and error["detail"] == error["error"]["message"]
        time.sleep(2.0)  # a few seconds down in all
    finally:
        cluster.start()
    for replica in (a, b):
        replica.wait_ready()
    done = final_jobs(nginx.base, accepted, timeout=240, tolerate_503=True)
    assert [done[job_id]["status"] for job_id in accepted] == ["succeeded"] * 12
    assert post(nginx.base, "/v1/jobs", {"prompt": "after", "steps": 2}).status_code == 202


# -- what crosses replicas (in-process servers on one database) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "serve-tiny-model")


@pytest.fixture(scope="module")
def pair(cluster, tiny_model):
    """Two in-process servers (the tiny model, one pipeline each) on one fresh database; (servers, url)."""
    url = cluster.create_database(f"p_{uuid.uuid4().hex[:10]}")
    servers = []
    try:
        for _ in range(2):
            config = ServeConfig(model=Path("unused"), store=url, lease_s=LEASE_S, warmup=False, safety=False,
                                 max_steps=100000, max_batch=1)  # fmt: skip
            server = ThreadServer(config, pipe=Pipeline.from_pretrained(tiny_model))
            servers.append(server.__enter__())
        yield servers, url
    finally:
        for server in servers:
            server.__exit__(None, None, None)


@contextlib.contextmanager
def held_at_first_step(servers: list[ThreadServer], prompt: str | None = None):
    """Each server's sampler runs (those of ``prompt`` only, if given) wait after their first step until ``release``
    is set (``reached`` counts the runs waiting): a cancel lands at a known step whatever the machine's speed."""
    reached, release, lock = [], threading.Event(), threading.Lock()
    pipes = [server.app.state.engine.pipe for server in servers]

    def holding(generate):
        def held_generate(requests, callback=None):
            if prompt is not None and all(r.prompt != prompt for r in requests):
                return generate(requests, callback)

            def held(i, total, sigma, preview):
                stop = callback(i, total, sigma, preview)
                if i == 0:
                    with lock:
                        reached.append(1)
                    release.wait(60)
                return stop

            return generate(requests, held)

        return held_generate

    for pipe in pipes:
        pipe.generate = holding(pipe.generate)
    try:
        yield reached, release
    finally:
        release.set()
        for pipe in pipes:
            del pipe.generate


def wait_for(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def stopping(server: ThreadServer, job_id: str) -> bool:
    """The server's worker has learned that the job is to stop, if it runs it (through its lease renewal)."""
    engine = server.app.state.engine
    job = engine._jobs.get(job_id)
    return job is None or job_id not in engine._held or job.stop is not None


def test_cancel_reaches_the_job_on_another_replica(pair):
    servers, url = pair
    store = open_store(url)
    try:
        with held_at_first_step(servers) as (reached, release):
            job = post(servers[0].base, "/v1/jobs", {"prompt": "a long one", "steps": 1000}).json()
            wait_for(lambda: store.get(job["id"])["steps_done"] == 1, what="the job's first step was not recorded")
            worker = store.get(job["id"])["worker"]
            running, other = sorted(servers, key=lambda s: s.app.state.engine.worker_id != worker)
            response = requests.delete(f"{other.base}/v1/jobs/{job['id']}", timeout=30)  # not where it runs
            assert response.status_code == 202 and response.json()["cancel_step"] == 1, response.text
            wait_for(lambda: stopping(running, job["id"]), what="the cancel never reached the replica")
            stream = Background(lambda: list(events(other.base, job["id"])))  # streamed where it does not run
            release.set()
            streamed = stream.result()
        name, done = streamed[-1]
        assert name == "done" and done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
        assert (done["cancel_step"], done["progress"]["step"]) == (1, 1)
        for server in servers:
            assert get(f"{server.base}/v1/jobs/{job['id']}").json() == done
        assert requests.delete(f"{other.base}/v1/jobs/{job['id']}", timeout=30).status_code == 409
    finally:
        store.close()


def test_interrupt_stops_an_n_iter_request_on_every_replica(pair):
    """AUTOMATIC1111's n_iter=3 with one job per claim: one job runs on each replica, one waits; an interrupt sent
    to either replica stops both at their next step and drops the third (their request's group), and the request
    answers 200 with no images, as AUTOMATIC1111 does."""
    servers, url = pair
    store = open_store(url)
    try:
        with held_at_first_step(servers) as (reached, release):
            body = {"prompt": "a one", "steps": 1000, "n_iter": 3, "seed": 5}
            call = Background(lambda: post(servers[0].base, "/sdapi/v1/txt2img", body))
            wait_for(lambda: len(reached) == 2, what="the request's jobs did not run on both replicas")
            running = store.ids("running", api="a1111")
            assert {store.get(job_id)["worker"] for job_id in running} == {
                s.app.state.engine.worker_id for s in servers}  # fmt: skip
            gauges = parse_prometheus(get(f"{servers[1].base}/metrics").text)  # the queue's, from the database
            assert (gauges["unnoise_queue_depth"], gauges["unnoise_store_running_jobs"]) == (1, 2)
            assert (gauges["unnoise_running_jobs"], gauges["unnoise_store_up"]) == (1, 1)
            assert requests.post(f"{servers[1].base}/sdapi/v1/interrupt", timeout=30).json() == {}
            for server in servers:
                wait_for(lambda s=server: all(stopping(s, j) for j in running), what="an interrupt was missed")
            release.set()
            answer = call.result()
        assert answer.status_code == 200 and answer.json()["images"] == [], answer.text
        records = [store.get(job_id) for job_id in answer.headers["X-Job-Id"].split(",")]
        assert [(r["status"], r["error_code"]) for r in records] == [("cancelled", "interrupted")] * 3
        assert sorted((r["started"] is not None, r["steps_done"]) for r in records) == [(False, 0), (True, 1),
                                                                                        (True, 1)]  # fmt: skip
    finally:
        store.close()


def test_a_synchronous_request_is_answered_by_its_replica_when_another_runs_it(pair):
    """OpenAI's generations on a replica whose worker is busy: the other replica runs the job, and the request's
    replica answers with its images (read back from the store)."""
    servers, url = pair
    store = open_store(url)
    try:
        with held_at_first_step(servers, prompt="hold") as (reached, release):
            blocker = post(servers[0].base, "/v1/jobs", {"prompt": "hold", "steps": 1000}).json()["id"]
            wait_for(lambda: reached, what="the blocker never ran")
            busy = next(s for s in servers if s.app.state.engine.worker_id == store.get(blocker)["worker"])
            body = {"prompt": "a two", "steps": 3, "seed": 21, "response_format": "b64_json"}
            response = post(busy.base, "/v1/images/generations", body)
            assert response.status_code == 200, response.text
            record = store.get(response.headers["X-Job-Id"])
            assert record["worker"] != busy.app.state.engine.worker_id and record["status"] == "succeeded"
            png = base64.b64decode(response.json()["data"][0]["b64_json"])
            assert png == get(f"{busy.base}/v1/images/{record['id']}/0.png").content
            assert png_parameters(png)["seed"] == 21
            assert requests.delete(f"{busy.base}/v1/jobs/{blocker}", timeout=30).status_code == 202
            release.set()
        wait_for(lambda: store.get(blocker)["status"] == "cancelled", what="the blocker was not cancelled")
    finally:
        store.close()


class Background(threading.Thread):
    """``fn()`` in a thread; ``result()`` joins it and returns (or raises) what it did."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as error:  # noqa: BLE001 - re-raised by result()
            self.error = error

    def result(self, timeout: float = 120.0):
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.value


def test_every_api_answers_503_with_retry_after_while_the_database_is_down(pair, cluster):
    servers, url = pair
    finished = post(servers[0].base, "/v1/jobs", {"prompt": "before", "steps": 2}).json()["id"]
    final_jobs(servers[1].base, [finished], timeout=60)
    cluster.stop("fast")
    try:
        base = servers[1].base
        checks = [
            ("post", "/v1/jobs", {"prompt": "x", "steps": 2}),
            ("post", "/v1/images/generations", {"prompt": "x", "steps": 2}),
            ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2}),
            ("get", f"/v1/jobs/{finished}", None),
            ("get", "/v1/jobs", None),
            ("get", f"/v1/images/{finished}/0.png", None),
            ("delete", f"/v1/jobs/{finished}", None),
        ]
        for method, path, body in checks:
            response = requests.request(method, f"{base}{path}", json=body, timeout=30)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Retry-After"] == "5"
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("store_unavailable", "server_error"), path
            assert "database" in error["message"] and response.json()["detail"] == error["message"]
        ready = get(f"{base}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "store_unavailable"
        metrics = get(f"{base}/metrics").text
        assert "unnoise_queue_depth NaN" in metrics
    finally:
        cluster.start()
    deadline = time.monotonic() + 60
    while get(f"{servers[1].base}/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    png = get(f"{servers[1].base}/v1/images/{finished}/0.png")
    assert png.status_code == 200 and png_parameters(png.content)["steps"] == 2


# -- the command line ------------------------------------------------------------------------------------------------


def test_store_and_db_together_are_refused(capsys, tmp_path):
    from unnoise.cli import main

    status, _, err = run_cli(main, capsys, "serve", "--store", "postgresql://u@localhost/jobs", "--db",
                             tmp_path / "jobs.sqlite3")  # fmt: skip
    assert status == 2 and "argument --store: not allowed with argument --db" in err
    status, _, err = run_cli(main, capsys, "serve", "--store", str(tmp_path / "jobs.sqlite3"))
    assert status == 2 and "argument --store: store=" in err and "expected a postgresql:// URL" in err
    status, _, err = run_cli(main, capsys, "serve", "--store", "postgresql://u@localhost/jobs", "--lease", "0")
    assert status == 2 and "argument --lease: lease_s=0.0 is not allowed" in err


def test_cmd_flags_hide_the_store_password():
    config = ServeConfig(store="postgresql://unnoise:s3cret@db.internal:5432/jobs")
    assert config.store_shown == "postgresql://unnoise:***@db.internal:5432/jobs"
    assert ServeConfig().store_shown is None and ServeConfig(store="postgresql://u@h/db").store_shown.endswith("@h/db")
