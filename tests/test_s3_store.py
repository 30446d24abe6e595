"""A store on an object store, over S3's real protocol: a local S3-compatible server (moto's
``ThreadedMotoServer``) runs inside the test, and `histoindex` reaches it through LanceDB/Lance with
nothing but the usual environment variables (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION). ingest → query → sql run through the real CLI on an
``s3://bucket/store`` URI; a writer killed or interrupted while its rows are on their way to S3
leaves nothing; and two writers committing the same version at once are kept apart by Lance's
conditional PUT (``If-None-Match: *``) on the version's manifest: one gets 412, re-applies its write
on top of the other's, and both land with no row repeated.

The server sits behind a small WSGI layer (``Wire``) that records every request and can hold the
ones a test names: that is how the test stops a writer mid-upload, and makes two commits collide,
deterministically."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import pytest

from histoindex.store import WEIGHTS, Store

from .conftest import run
from .test_crash_safety import (
    PATIENCE,
    Cli,
    Data,
    _stop_leftovers,  # noqa: F401  (autouse: no histoindex process outlives its test)
    assert_dataset_rows,
    assert_models_complete,
    assert_unchanged,
    ingest_args,
    make_data,
    snapshot,
    stop_when,
    tiny,
)

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the local S3 server")
boto3 = pytest.importorskip("boto3")

BUCKET = "histoindex"
KILL, INT = signal.SIGKILL, signal.SIGINT


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key
    query: str
    if_none_match: str | None
    status: int | None
    lance: bool  # sent by Lance (object_store), not by the test's own boto3 client


class Gate:
    """Holds the requests whose method and path match, each until released (or the gate opens)."""

    def __init__(self, methods: set[str], pattern: str):
        self.methods, self.regex = methods, re.compile(pattern)
        self.arrivals: list[tuple[str, threading.Event]] = []
        self.opened = False
        self._changed = threading.Condition()

    def hold(self, method: str, path: str) -> None:
        if method not in self.methods or not self.regex.search(path):
            return
        with self._changed:
            if self.opened:
                return
            release = threading.Event()
            self.arrivals.append((path, release))
            self._changed.notify_all()
        release.wait(PATIENCE)

    def arrived(self, n: int = 1) -> bool:
        with self._changed:
            return len(self.arrivals) >= n

    def wait(self, n: int, timeout: float = PATIENCE) -> list[str]:
        """The paths of the first ``n`` held requests, waiting for them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.arrivals) >= n, timeout):
                pytest.fail(f"{len(self.arrivals)} requests matching {self.regex.pattern!r} arrived, not {n}")
            return [path for path, _ in self.arrivals[:n]]

    def release(self, i: int) -> None:
        self.arrivals[i][1].set()

    def open(self) -> None:
        with self._changed:
            self.opened = True
            for _, release in self.arrivals:
                release.set()


class Wire:
    """WSGI middleware in front of moto: records every request and passes it through the gates."""

    def __init__(self, app):
        self.app = app
        self.requests: list[Request] = []
        self.gates: list[Gate] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        for gate in list(self.gates):
            gate.hold(method, path)
        statuses: list[int] = []

        def respond(status, headers, exc_info=None):
            statuses.append(int(status.split()[0]))
            return start_response(status, headers, exc_info)

        body = self.app(environ, respond)
        request = Request(
            method=method,
            path=path,
            query=environ.get("QUERY_STRING", ""),
            if_none_match=environ.get("HTTP_IF_NONE_MATCH"),
            status=statuses[0] if statuses else None,
            lance=not environ.get("HTTP_USER_AGENT", "").startswith("Boto3"),
        )
        with self._lock:
            self.requests.append(request)
        return body

    @contextmanager
    def holding(self, methods: set[str], pattern: str):
        gate = Gate(methods, pattern)
        self.gates.append(gate)
        try:
            yield gate
        finally:
            self.gates.remove(gate)
            gate.open()

    def lance_puts(self, pattern: str) -> list[Request]:
        regex = re.compile(pattern)
        with self._lock:
            return [r for r in self.requests if r.lance and r.method == "PUT" and regex.search(r.path)]


@dataclass
class S3:
    endpoint: str
    client: object
    wire: Wire
    copies: list[str] = field(default_factory=list)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def copy(self, source: str, target: str) -> str:
        """A copy of the store under ``source`` (its objects, as they are), as ``s3://bucket/target``."""
        for key in self.keys(source):
            self.client.copy_object(Bucket=BUCKET, Key=target + key[len(source) :], CopySource={"Bucket": BUCKET, "Key": key})
        return self.uri(target)


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto) with one bucket; the AWS_* environment points LanceDB and Lance at
    it, in this process and in the `histoindex` processes the tests start."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    wire = Wire(server._server.app)  # the WSGI app the server thread calls for every request
    server._server.app = wire
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",  # a local server speaks plain HTTP
        "AWS_ACCESS_KEY_ID": "histoindex-test",
        "AWS_SECRET_ACCESS_KEY": "histoindex-test",
        "AWS_REGION": "us-east-1",
    }
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in [name for name in os.environ if name.startswith("AWS_")]:
                env.delenv(name)
            for name, value in settings.items():
                env.setenv(name, value)
            client = boto3.client(
                "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="histoindex-test", aws_secret_access_key="histoindex-test"
            )
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"1", IfNoneMatch="*")
            try:
                client.put_object(Bucket=BUCKET, Key="probe", Body=b"2", IfNoneMatch="*")
                pytest.skip("this moto does not honour conditional PUTs (If-None-Match)")
            except client.exceptions.ClientError as exc:
                assert exc.response["Error"]["Code"] == "PreconditionFailed"
            yield S3(endpoint=endpoint, client=client, wire=wire)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def data(sections) -> Data:
    return make_data(sections)


@pytest.fixture(scope="module")
def s3_store(s3, data) -> str:
    """`histoindex ingest` into an empty s3:// store: it trains a model (weights into the models
    table, on S3) and writes the dataset "train". Tests work on copies."""
    uri = s3.uri("base")
    run(*ingest_args(data, uri, "train"), *tiny())
    return uri


def test_ingest_query_sql_on_s3(s3, s3_store, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the store may land locally
    monkeypatch.setenv("COLUMNS", "400")  # rich: one table row per version in `versions`
    base = Store(s3_store)
    (record,) = base.models()
    n_spots = base.table("spots").count_rows()
    assert n_spots > 0
    assert sorted({key.split("/")[1] for key in s3.keys("base")}) == ["models.lance", "predictions.lance", "spots.lance", "tiles.lance"]
    assert_models_complete(s3_store)  # the weights load from the models table on S3
    assert_dataset_rows(s3_store, "train", n_spots)

    uri = s3.copy("base", "pipeline")
    out = tmp_path / "pred.parquet"
    result = run("query", data.slide, "--tissue", "breast", "--spots", data.h5ad, "--out", out, "--db", uri)
    assert f"spots@2, predictions@2 → {out}" in result.stdout
    store = Store(uri)
    predictions = store.table("predictions").to_arrow()
    assert predictions.num_rows == pq.read_table(out).num_rows == n_spots
    assert set(predictions.column("spots_version").to_pylist()) == {2}

    def sql(statement: str) -> list[dict]:
        return json.loads(run("sql", statement, "--db", uri, "--format", "json").stdout)

    assert sql("SELECT dataset, count(*) AS n, count(DISTINCT spot_id) AS ids FROM spots GROUP BY dataset") == [
        {"dataset": "train", "n": n_spots, "ids": n_spots}
    ]
    assert sql("SELECT count(*) AS n, count(DISTINCT gene) AS genes FROM predictions_long") == [
        {"n": n_spots * len(record.cfg.genes), "genes": len(record.cfg.genes)}
    ]
    (model,) = sql("SELECT * FROM models")
    assert model["model_id"] == record.model_id and WEIGHTS not in model
    assert "ingest-train-v2" in run("versions", "--db", uri).stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.parquet"]

    # every commit Lance made was a conditional PUT of the next manifest: S3 itself refuses a second
    # writer of the same version, so no lock or DynamoDB table is needed
    manifests = s3.wire.lance_puts(r"\.lance/_versions/[^/]+\.manifest$")
    assert manifests and all(r.if_none_match == "*" and r.status == 200 for r in manifests), manifests


def test_ingest_stopped_while_uploading_its_rows_leaves_nothing(s3, s3_store, data):
    """SIGKILL and Ctrl-C, each on its own copy, while the server holds the upload of the new rows."""
    prefixes = {KILL: "stop-kill", INT: "stop-int"}
    uris = {sig: s3.copy("base", prefix) for sig, prefix in prefixes.items()}
    before = {sig: snapshot(uri) for sig, uri in uris.items()}
    with s3.wire.holding({"PUT", "POST"}, rf"^/{BUCKET}/stop-(kill|int)/spots\.lance/data/") as gate:
        clis = {sig: Cli(*ingest_args(data, uri, "other")) for sig, uri in uris.items()}

        def uploading(sig):
            return lambda: any(path.startswith(f"/{BUCKET}/{prefixes[sig]}/") for path, _ in gate.arrivals)

        stop_when(*((cli, uploading(sig), sig) for sig, cli in clis.items()), what="its rows on their way to S3")
    # the held uploads went through once the writers were gone: objects no version refers to
    for sig, uri in uris.items():
        assert not clis[sig].saw(r"^wrote ")
        assert_unchanged(uri, before[sig])
        n = Store(uri).table("spots").count_rows()
        result = run(*ingest_args(data, uri, "other"))  # and the same ingest again lands whole
        assert f"other: {n} spots, spots@3" in result.stdout
        assert_dataset_rows(uri, "other", n)
        assert_dataset_rows(uri, "train", n)


def test_two_writers_committing_the_same_version_on_s3_both_land(s3, s3_store, data):
    """Two `histoindex ingest` processes of the same dataset; the server holds the first one's
    commit (its PUT of the next manifest) until the second one tries the same, then lets the first
    through and the second after it: S3 answers the second 412, and Lance re-applies that write on
    the first one's version."""
    uri = s3.copy("base", "race")
    before = snapshot(uri)
    n = before["spots"][1].num_rows
    with s3.wire.holding({"PUT"}, rf"^/{BUCKET}/race/spots\.lance/_versions/[^/]+\.manifest$") as gate:
        writers = [Cli(*ingest_args(data, uri, "other")) for _ in range(2)]
        first, second = gate.wait(2)
        assert first == second, "both writers commit the same next version"
        gate.release(0)
        deadline = time.monotonic() + PATIENCE
        while not s3.wire.lance_puts(re.escape(first) + "$"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.open()
        outcomes = [(w.finish(), w.stdout, w.stderr) for w in writers]

    commits = s3.wire.lance_puts(r"/race/spots\.lance/_versions/[^/]+\.manifest$")
    assert [(r.path, r.status) for r in commits if r.path == first] == [(first, 200), (first, 412)], commits
    failed = [stderr for rc, _, stderr in outcomes if rc != 0]
    for stderr in failed:  # the one other outcome allowed: a clear "retry", nothing written
        assert "the store changed while writing other" in stderr and "retry" in stderr, stderr
    assert len(failed) <= 1
    versions = [v["version"] for v in Store(uri).versions()["spots"]]
    assert versions == [1, 2, 3, 4][: 4 - len(failed)]
    assert_dataset_rows(uri, "other", n)  # the re-applied merge updated the first one's rows: none repeated
    assert_dataset_rows(uri, "train", n)
    print(f"manifest PUTs of the race: {[(r.path.rsplit('/', 1)[-1], r.status) for r in commits]}; {len(failed)} writer(s) told to retry")
