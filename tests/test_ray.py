"""The Ray tier: ``ufad score --ray`` and ``ufad serve`` on a real 2-node Ray cluster that the
test starts on loopback (``ray start --head`` + a second ``ray start --address``, one CPU
each), scoring the committed small MNIST detector (tests/runtime/data/mnist_small.onnx).

The 200k inputs are 40 files of 5000 drawn from a pool of 2048 distinct MNIST-shaped uint8
images (real digits, noisy digits, Fashion-MNIST items, noise), each file in its own order,
so every row is checked against the local ``AnomalySession`` score of exactly its input.
Skips (with the reason) where Ray is not installed: ``pip install 'ufad[ray]'``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cluster   # its own tier: pytest -m cluster (CI runs it after the default run)

pytest.importorskip("ray", reason="the Ray tier needs the ray extra: pip install 'ufad[ray]'")
pytest.importorskip("pyarrow", reason="the Ray tier needs pyarrow: pip install 'ufad[ray]'")

import pyarrow.parquet as pq  # noqa: E402

from ufad.runtime import AnomalySession, InputError, OutputError  # noqa: E402
from ufad.runtime.inputs import check_batch  # noqa: E402
from ufad.runtime.ray_batch import score_dataset  # noqa: E402

DATA = Path(__file__).resolve().parent / "runtime" / "data"
MODEL = DATA / "mnist_small.onnx"
N_FILES, PER_FILE = 40, 5000
UFAD = [sys.executable, "-m", "ufad.runtime.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> None:
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster():
    """A 2-node Ray cluster on 127.0.0.1 (head + worker node, 1 CPU each): its address."""
    # Loopback only, no token: the cluster lives as long as this module and nobody else sees it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    # A short folder of its own: Ray puts its sockets under it, and an AF_UNIX path may hold 107
    # bytes (pytest-xdist's per-worker basetemp, /tmp/pytest-of-root/pytest-N/popen-gw0/ray0/..., goes over).
    temp = Path(tempfile.mkdtemp(prefix="ufad-ray-"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(200 * 2 ** 20),
              "--disable-usage-stats"]
    try:
        _ray(["start", "--head", "--port", str(port), "--include-dashboard", "false",
              "--temp-dir", str(temp), *common], env)
        _ray(["start", "--address", address, *common], env)
        yield address
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pool() -> np.ndarray:
    """2048 distinct MNIST-shaped uint8 images: real digits, noisy digits, Fashion-MNIST, noise."""
    rng = np.random.default_rng(0)
    d, f = np.load(DATA / "digits.npy"), np.load(DATA / "fashion.npy")
    sigma = 0.15 * np.abs(rng.normal(0, 1, (1536, 1, 1, 1)))
    noisy = np.clip(d[rng.integers(0, len(d), 1536)] + sigma * rng.normal(0, 1, (1536, 1, 28, 28)), 0, 1)
    p = np.concatenate([d, noisy, f, rng.random((128, 1, 28, 28)), np.full((64, 1, 28, 28), 0.5)])
    return np.round(p * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 .npy files x 5000 inputs; per file, which pool image each input is."""
    folder = tmp_path_factory.mktemp("inputs")
    pool = _pool()
    rng = np.random.default_rng(1)
    picks = {}
    for i in range(N_FILES):
        ix = rng.integers(0, len(pool), PER_FILE)
        path = folder / f"part{i:02d}.npy"
        np.save(path, pool[ix])
        picks[str(path)] = ix
    return folder, pool, picks


@pytest.fixture(scope="module")
def reference(dataset):
    """Local AnomalySession scores of every pool image (batches of 1024, as the job runs)."""
    _, pool, _ = dataset
    res = AnomalySession(MODEL, provider="cpu").run(pool, batch_size=1024)
    assert 0.1 < res.is_anomaly.mean() < 0.9  # both verdicts occur: comparing them means something
    return res


def _read(out: Path) -> dict[str, np.ndarray]:
    if out.suffix == ".parquet":
        t = pq.read_table(out)
        cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in
                ("source", "pred", "label", "score", "is_anomaly", "error")}
        cols["index"] = np.asarray(t.column("index").to_pylist(), object)  # empty (None) on whole-file errors
        ls = t.column("layer_scores").combine_chunks()
        cols["layer_scores"] = np.stack([ls.field(j).to_numpy(zero_copy_only=False)
                                         for j in range(ls.type.num_fields)], axis=1)
        return cols
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {k: np.asarray([r[k] for r in rows], object) for k in rows[0]}


def _check_rows(rows: dict[str, np.ndarray], picks: dict[str, np.ndarray], ref, skip: set[str] = frozenset()):
    """Every input of every file in ``picks`` (but ``skip``) has exactly one row, equal to the
    local score of its input: pred and verdict identical, scores within 1e-5 relative."""
    ok = rows["error"] == ""
    src, idx = rows["source"][ok], rows["index"][ok].astype(np.int64)
    assert sorted(set(src)) == sorted(set(picks) - set(skip))
    keys = np.asarray([f"{s}#{i}" for s, i in zip(src, idx)])
    assert len(np.unique(keys)) == len(keys) == sum(len(v) for k, v in picks.items() if k not in skip)
    pool_i = np.empty(len(src), np.int64)
    for s in set(src):
        m = src == s
        pool_i[m] = picks[s][idx[m]]
    np.testing.assert_array_equal(rows["pred"][ok].astype(np.int64), ref.pred[pool_i])
    np.testing.assert_array_equal(rows["is_anomaly"][ok].astype(bool), ref.is_anomaly[pool_i])
    np.testing.assert_allclose(rows["score"][ok].astype(np.float32), ref.score[pool_i], rtol=1e-5, atol=0)
    if "layer_scores" in rows and rows["layer_scores"].dtype != object:
        np.testing.assert_allclose(rows["layer_scores"][ok], ref.layer_scores[pool_i], rtol=1e-5, atol=0)
    assert list(rows["label"][ok][:5]) == [str(p) for p in ref.pred[pool_i][:5]]


def _scorer_pids() -> list[int]:
    """Processes of the job's scoring actors (Ray titles them after the UDF)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"MapBatches(Scorer)" in cmd:
                pids.append(int(p.name))
    return pids


def test_200k_inputs_equal_local_scoring_with_a_worker_killed_mid_job(cluster, dataset, reference, tmp_path):
    """The first two bars in one job (each is 30 s here): 200k inputs in 40 files, one row
    each equal to local scoring, although one of the two workers is SIGKILLed mid-job."""
    folder, _, picks = dataset
    out = tmp_path / "audit.parquet"
    result: dict = {}

    def job():
        try:
            result["summary"] = score_dataset(MODEL, folder, out, address=cluster, progress=False)
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    tmp = tmp_path / f".{out.name}.tmp{os.getpid()}"
    deadline = time.monotonic() + 120
    # mid-job: rows are being written and the actors are running
    while time.monotonic() < deadline and not (tmp.exists() and tmp.stat().st_size > 0 and len(_scorer_pids()) == 2):
        time.sleep(0.05)
    victims = _scorer_pids()
    assert t.is_alive() and len(victims) == 2, "the job ended before a worker could be killed"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(timeout=240)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert time.monotonic() > killed_at
    assert victims[0] not in _scorer_pids()
    rows = _read(out)
    summary = result["summary"]
    assert len(rows["source"]) == N_FILES * PER_FILE == summary["rows"] == summary["inputs"]
    _check_rows(rows, picks, reference)
    flagged = int(rows["is_anomaly"].sum())
    assert summary["flagged"] == flagged and summary["error_rows"] == 0 and summary["workers"] == 2
    assert sum(summary["flagged_per_class"].values()) == flagged
    assert summary["score_quantiles"]["0.5"] == pytest.approx(float(np.median(rows["score"])), rel=1e-3)
    assert json.loads((tmp_path / "audit.summary.json").read_text())["rows"] == N_FILES * PER_FILE
    # re-running into the same OUT is refused unless told to overwrite
    with pytest.raises(OutputError, match="already exist"):
        score_dataset(MODEL, folder, out, address=cluster, progress=False)


def test_a_corrupt_file_gives_one_error_row_and_the_rest_is_scored(cluster, dataset, reference, tmp_path):
    folder, _, picks = dataset
    mixed = tmp_path / "inputs"
    mixed.mkdir()
    names = sorted(picks)
    bad = mixed / Path(names[17]).name
    for n in names:
        if n != names[17]:
            (mixed / Path(n).name).symlink_to(n)
    bad.write_bytes(Path(names[17]).read_bytes()[:100_000])  # header intact, data cut short
    renamed = {str(mixed / Path(n).name): v for n, v in picks.items()}
    out = tmp_path / "audit.jsonl"
    proc = subprocess.run([*UFAD, "score", str(MODEL), str(mixed), "--ray", cluster, "-o", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "195001 rows" in proc.stderr and "1 error row from 1 source" in proc.stderr
    rows = _read(out)
    assert len(rows["source"]) == (N_FILES - 1) * PER_FILE + 1
    errors = np.flatnonzero(rows["error"] != "")
    assert len(errors) == 1
    e = errors[0]
    assert rows["source"][e] == str(bad) and str(bad) in rows["error"][e] and "truncated" in rows["error"][e]
    assert rows["index"][e] is None and rows["score"][e] is None
    _check_rows(rows, renamed, reference, skip={str(bad)})


def test_npz_parquet_images_and_refused_inputs(cluster, tmp_path):
    """Every source kind, and inputs the runtime refuses: one row each, equal to local scoring."""
    sess = AnomalySession(MODEL, provider="cpu")
    d = np.load(DATA / "digits.npy")
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "a.npz", x=d[:100])
    x = d[100:150].copy()
    x[7] *= 255  # 0..255 pixels: refused by the range rule, alone
    np.save(src / "b.npy", x)
    import pyarrow as pa

    flat = d[150:250].reshape(100, -1)
    col = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), 784)
    pq.write_table(pa.table({"id": np.arange(100), "pixels": col}), src / "c.parquet", row_group_size=40)
    expected = {str(src / "a.npz"): d[:100], str(src / "b.npy"): x, str(src / "c.parquet"): d[150:250]}
    try:
        from PIL import Image

        Image.fromarray((d[250, 0] * 255).astype(np.uint8)).save(src / "d.png")
        expected[str(src / "d.png")] = None
    except ImportError:
        pass
    (src / "e.npz").write_bytes(b"PK not a zip")
    out = tmp_path / "o.parquet"
    summary = score_dataset(MODEL, src, out, address=cluster, progress=False)
    rows = _read(out)
    assert len(rows["source"]) == 100 + 50 + 100 + ("PIL" in sys.modules) + 1 == summary["rows"]
    err = rows["error"] != ""
    assert sorted(zip(rows["source"][err], rows["index"][err].tolist())) == sorted(
        [(str(src / "b.npy"), 7), (str(src / "e.npz"), None)])
    assert "far outside the model's range" in rows["error"][err][rows["source"][err] == str(src / "b.npy")][0]
    for path, arr in expected.items():
        m = (rows["source"] == path) & ~err
        got_idx = rows["index"][m].astype(int)
        if arr is None:
            from ufad.runtime import load_inputs

            arr = load_inputs([path], sess.input_spec)[0][0]
        keep = np.array([i for i in range(len(arr)) if not (path.endswith("b.npy") and i == 7)])
        assert sorted(got_idx) == list(keep)
        local = sess.run(arr[keep] if len(arr) > 1 else arr)
        order = np.argsort(got_idx)
        np.testing.assert_array_equal(rows["pred"][m][order], local.pred)
        np.testing.assert_array_equal(rows["is_anomaly"][m][order], local.is_anomaly)
        np.testing.assert_allclose(rows["score"][m][order], local.score, rtol=1e-5, atol=1e-4)


# --- ufad serve -------------------------------------------------------------------------------

def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(cluster):
    port = _free_port()
    proc = subprocess.Popen([*UFAD, "serve", str(MODEL), "--replicas", "2", "--port", str(port),
                             "--address", cluster], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while True:
        try:
            if _get(url + "/health")["status"] == "ok":
                break
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ufad serve did not come up: " + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_serve_8_clients_x_200_mixed_requests_equal_local_scoring(server):
    sess = AnomalySession(MODEL, provider="cpu")
    pool = _pool()
    sizes = (1, 1, 2, 3, 4, 8, 16, 17, 24, 40)
    thresholds = (None, None, None, 1.0, 5.5, float("inf"))

    def client(c: int) -> list[tuple[np.ndarray, float | None, int, dict]]:
        rng = np.random.default_rng(100 + c)
        got = []
        for k in range(200):
            x = pool[rng.integers(0, len(pool), sizes[rng.integers(len(sizes))])]
            thr = thresholds[rng.integers(len(thresholds))]
            if k % 4 == 0 and len(x) <= 4:
                body = {"inputs": (x.astype(np.float32) / 255).tolist()}
                x = x.astype(np.float32) / 255
            else:
                buf = io.BytesIO()
                np.save(buf, x)
                body = {"npy_b64": base64.b64encode(buf.getvalue()).decode()}
            if thr is not None:
                body["threshold"] = thr if np.isfinite(thr) else 1e39  # JSON has no inf: beyond float32
            status, answer = _post(server + "/score", json.dumps(body).encode())
            got.append((x, 1e39 if thr is not None and not np.isfinite(thr) else thr, status, answer))
        return got

    with ThreadPoolExecutor(8) as ex:
        answers = [a for part in ex.map(client, range(8)) for a in part]
    assert len(answers) == 1600
    n_inputs = 0
    for x, thr, status, answer in answers:
        assert status == 200, answer
        local = sess.run(x, threshold=thr).records()
        for rec in local:
            rec["provider"] = sess.provider
        assert answer["results"] == local  # every field, bit for bit
        n_inputs += len(x)
    assert n_inputs > 10_000


def test_serve_refuses_bad_requests_with_the_runtimes_message(server):
    sess = AnomalySession(MODEL, provider="cpu")
    d = np.load(DATA / "digits.npy")
    with pytest.raises(InputError) as shape_err:
        check_batch(np.zeros((2, 3, 28, 28), np.float32), sess.input_spec)
    cases = [
        (b"{not json", 400, "request body is not JSON"),
        (json.dumps({"inputs": np.zeros((2, 3, 28, 28)).tolist()}).encode(), 400, str(shape_err.value)),
        (json.dumps({"inputs": (d[:2] * 255).tolist()}).encode(), 400, "far outside the model's range"),
        (json.dumps({"inputs": [[1, 2], [3]]}).encode(), 400, "cannot be read as an array"),
        (json.dumps({"inputs": d[:1].tolist(), "threshold": "high"}).encode(), 400, "threshold must be a number"),
        (json.dumps({"npy_b64": "%%%"}).encode(), 400, "not valid base64"),
        (json.dumps({"npy_b64": base64.b64encode(b"\x93NUMPY garbage").decode()}).encode(), 400, "not a .npy"),
        (json.dumps({"image": 1}).encode(), 400, 'one of "inputs"'),
    ]
    for body, status, message in cases:
        got, answer = _post(server + "/score", body)
        assert got == status and message in answer["error"], (body[:60], got, answer)
    meta = _get(server + "/metadata")
    inspect = subprocess.run([*UFAD, "inspect", str(MODEL), "--json"], capture_output=True, text=True, timeout=60)
    assert meta == json.loads(inspect.stdout)
    assert _get(server + "/health")["graph_sha256"] == sess.metadata["ufad.graph_sha256"]


def test_serve_stops_cleanly_on_sigterm():
    """A container stop or a supervisor sends SIGTERM: ``ufad serve`` on its own local Ray
    deletes its application and shuts Ray down (exit 0, "stopped"), as on Ctrl-C. Ray's native
    handler, installed by ray.init, used to take the signal: a stack dump, then an abort (exit
    134) 3 s into the cleanup, with Ray's agent processes left running."""
    port = _free_port()
    proc = subprocess.Popen([*UFAD, "serve", str(MODEL), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:            # up and serving (/health answers before Serve's run returns)
        lines.append(line)
        if line.startswith("serving "):
            break
    else:
        pytest.fail("ufad serve did not come up: " + "".join(lines))
    assert _get(f"http://127.0.0.1:{port}/health")["status"] == "ok"
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ufad serve did not stop within 90 s of SIGTERM")
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("stopped") and "SIGTERM received" not in out, out
