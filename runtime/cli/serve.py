"""``ufad serve``: an HTTP JSON API for a detector on Ray Serve (needs ``ufad[ray]``)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click


def _interrupt(signum, frame):
    # SIGTERM (a supervisor, a container stop) ends the server as cleanly as Ctrl-C
    raise KeyboardInterrupt


@click.command("serve")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="Replicas (one AnomalySession each).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--address", default=None, help="An existing Ray cluster (host:port); default: a local one.")
@click.option("--replica-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs reserved per replica (and its onnxruntime threads).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Requests merged into one batch (@serve.batch).")
@click.option("--proxy-location", type=click.Choice(["HeadOnly", "EveryNode"]), default="HeadOnly", show_default=True,
              help="Where Ray Serve runs HTTP proxies.")
@click.option("--no-range-check", is_flag=True,
              help="Score image values far outside the model's input range instead of refusing them.")
@click.option("--verify-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ed25519 public key (PEM): refuse MODEL unless it carries a valid signature by it.")
def serve_command(model, replicas, port, host, address, replica_cpus, provider, max_batch, proxy_location,
                  no_range_check, verify_key):
    """Serve MODEL over HTTP: POST /score, GET /health, GET /metadata. Ctrl-C stops it."""
    from ..ray_serve import APP_NAME, application
    from ..ray_support import connected, import_ray

    app = application(model, replicas=replicas, replica_cpus=replica_cpus, provider=provider,
                      verify_key=verify_key, range_check="off" if no_range_check else "error",
                      max_batch=max_batch)
    serve = import_ray("serve").serve
    with connected(address, part="serve"):
        # Only now: ray.init installs its own SIGTERM handlers (a native one that prints a stack
        # dump and aborts 3 s later, in the middle of the cleanup below, leaving Ray's agent
        # processes running; and a Python one that exits without it).
        signal.signal(signal.SIGTERM, _interrupt)
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        click.echo(f"serving {model} with {replicas} replica{'s' * (replicas > 1)} at http://{host}:{port} "
                   "(POST /score, GET /health, GET /metadata); Ctrl-C stops", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            # remove only this application: a shared cluster may serve others. With none
            # left, stop Serve too, or the next `ufad serve` would find its proxies still on
            # this port and its own --host / --port ignored.
            serve.delete(APP_NAME)
            if not serve.status().applications:
                serve.shutdown()
    click.echo("stopped", err=True)
