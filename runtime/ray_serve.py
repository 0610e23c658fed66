"""Serve a detector on Ray Serve: ``ufad serve det.onnx --replicas 2 --port 8000``.

    POST /score     {"inputs": [[...]]} or {"npy_b64": "..."}, optional "threshold"
                    -> {"results": [one ``ufad score --json`` record per input]}
    GET  /health    -> {"status": "ok", "model": ..., "graph_sha256": ...}
    GET  /metadata  -> what ``ufad inspect --json`` prints

Each replica holds one ``AnomalySession`` (it verifies the file's integrity, and its
signature with ``verify_key``, when it starts). Requests are batched dynamically
(``@serve.batch``); answers are bit-identical to scoring each request alone
(``serve_requests.score_requests``). A bad request gets HTTP 400 (413 when too large) with
the runtime's own message, never a 500.

On a cluster configured by file (KubeRay RayService), point ``import_path`` at
``ufad.runtime.ray_serve:build_app`` with ``args: {model: /path/det.onnx, ...}``
(docs/scale.md).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from .errors import InputError, UfadError, python_style
from .ray_support import import_ray, model_file
from .serve_requests import TooLarge, parse_score_request, score_requests
from .session import AnomalySession, read_model_bytes

APP_NAME = "ufad"
MAX_BATCH = 32          # requests merged into one batch
BATCH_WAIT_S = 0.002    # how long a batch waits to fill: a small share of a batch's cost


def _render(name: str, value: Any) -> str:
    """Option references in a client's error: the one a client cannot pass is the server's flag."""
    if (name, value) == ("range_check", "off"):
        return "--no-range-check (a flag of ufad serve)"
    return python_style(name, value)


def _error(e: UfadError, status: int):
    return _json({"error": e.render(_render)}, status)


def _json(obj: Any, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(obj, default=str), status_code=status, media_type="application/json")


class DetectorServer:
    """One Serve replica (wrapped by ``serve.deployment`` in ``deployment``)."""

    def __init__(self, model: bytes, name: str, shown_path: str, provider: str = "cpu",
                 threads: int | None = None, verify_key: Any = None, range_check: str = "error"):
        self.sess = AnomalySession(model_file(model, name), provider=provider, threads=threads,
                                   verify_key=verify_key, range_check=range_check)
        self.range_check = range_check
        meta = self.sess.describe()
        meta["file"] = shown_path  # the path the server was started with, as `ufad inspect` shows it
        self.metadata = json.loads(json.dumps(meta, default=str))
        self.health = {"status": "ok", "model": shown_path, "method": self.sess.info.method,
                       "graph_sha256": self.sess.metadata.get("ufad.graph_sha256"),
                       "provider": self.sess.provider}

    async def __call__(self, request):
        path = "/" + request.url.path.strip("/").rsplit("/", 1)[-1]
        routes = {"/score": "POST", "/health": "GET", "/metadata": "GET"}
        if path not in routes:
            return _json({"error": f"no route {request.url.path}; use POST /score, GET /health or GET /metadata"}, 404)
        if request.method != routes[path]:
            return _json({"error": f"{path} takes {routes[path]}, not {request.method}"}, 405)
        if path == "/health":
            return _json(self.health)
        if path == "/metadata":
            return _json(self.metadata)
        try:
            x, threshold = parse_score_request(await request.body(), self.sess.input_spec, self.range_check)
        except TooLarge as e:
            return _error(e, 413)
        except UfadError as e:
            return _error(e, 400)
        try:
            results = await self.score_batch((x, threshold))
        except InputError as e:  # refused by the runtime after all: still the user's input
            return _error(e, 400)
        return _json({"results": results})

    async def score_batch(self, requests):
        # replaced per replica by a @serve.batch wrapper (see ``deployment``)
        return (await self._score(requests if isinstance(requests, list) else [requests]))[0]

    async def _score(self, requests):
        # onnxruntime releases the GIL: scoring in a thread keeps the replica's event loop
        # reading the next requests into the next batch meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, score_requests, self.sess, requests)


def deployment(replicas: int = 1, replica_cpus: float = 1.0, max_batch: int = MAX_BATCH):
    """The Serve deployment class (Ray is imported here, only when serving)."""
    ray = import_ray("serve")
    serve = ray.serve

    class UfadDetector(DetectorServer):
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=BATCH_WAIT_S)
        async def score_batch(self, requests):
            return await self._score(list(requests))

    UfadDetector.__name__ = UfadDetector.__qualname__ = "UfadDetector"
    return serve.deployment(
        UfadDetector, name="UfadDetector", num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # enough requests in flight per replica for a batch to fill
        max_ongoing_requests=max(2 * max_batch, 8))


def application(model: str | Path, *, replicas: int = 1, replica_cpus: float = 1.0, provider: str = "cpu",
                threads: int | None = None, verify_key: Any = None, range_check: str = "error",
                max_batch: int = MAX_BATCH):
    """The Serve application for ``model``: the file is checked here first (a bad file or key
    fails in one line, before any replica starts), then its bytes go to every replica."""
    if replicas.__class__ is not int or replicas < 1:
        raise InputError(f"replicas must be an integer >= 1, got {replicas!r}")
    AnomalySession(model, provider="cpu", verify_key=verify_key, range_check=range_check)
    data = read_model_bytes(model)
    key = Path(verify_key).read_bytes() if isinstance(verify_key, (str, Path)) else verify_key
    return deployment(replicas, replica_cpus, max_batch).bind(
        data, Path(model).name, str(model), provider=provider,
        threads=threads or max(1, int(replica_cpus)), verify_key=key, range_check=range_check)


def build_app(args: dict[str, Any]):
    """Application builder for Serve config files (KubeRay RayService ``import_path``):
    ``args`` = ``{"model": path, "replicas": 2, "replica_cpus": 1, "provider": "cpu", ...}``."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise InputError("the Serve config's args need model: the path of the .onnx file")
    return application(model, **args)
