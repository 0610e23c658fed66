"""Ray for ``ufad score --ray`` and ``ufad serve``: imported only here and only when called, so
the runtime core stays numpy + onnxruntime (``ufad[ray]`` is an optional extra).

    ray = import_ray("serve")              # the module, or DependencyError naming the extra
    with connected(address) as started:    # an existing cluster, or a local instance
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ClusterError, DependencyError

INSTALL = "pip install 'ufad[ray]'"


def import_ray(part: str = "data") -> Any:
    """The ``ray`` module with ``ray.data`` or ``ray.serve`` importable, or a DependencyError."""
    try:
        import ray

        if part == "data":
            import ray.data  # noqa: F401
        elif part == "serve":
            import ray.serve  # noqa: F401
    except ImportError as e:
        what = "`ufad score --ray`" if part == "data" else "`ufad serve`"
        raise DependencyError(f"{what} needs the ray extra ({e.name or e} is missing): {INSTALL}") from None
    return ray


@contextlib.contextmanager
def connected(address: str | None = None, *, part: str = "data") -> Iterator[bool]:
    """Ray connected for the ``with`` block; yields whether this call started it.

    ``address`` is an existing cluster (``host:port``, ``ray://host:10001`` or ``auto``).
    Without one, Ray's own rule applies: ``RAY_ADDRESS`` when set (as inside a KubeRay RayJob),
    else a cluster started on this machine with ``ray start``, else a new local instance. A
    Ray already initialised in this process (a caller inside a Ray job) is used as it is."""
    ray = import_ray(part)
    if ray.is_initialized():
        yield False
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
    if address:
        kwargs["address"] = address
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host in ("localhost", "::1") or host.startswith("127."):
            # a cluster on loopback registers its nodes as 127.0.0.1: so must this driver,
            # or Ray looks for a node at the machine's own address and finds none
            kwargs["_node_ip_address"] = "127.0.0.1"
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    # Ray Data logs each execution at INFO and our disabling of its progress bars as a warning.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError) as e:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
            f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}); start it with "
            "`ray start --head`, or leave out the address to start a local instance."
        ) from None
    try:
        yield True
    finally:
        ray.shutdown()


def model_file(data: bytes, name: str) -> Path:
    """Write a detector's bytes (sent through the object store) to a private temporary file
    named like the original, for an AnomalySession on a worker to load and verify."""
    folder = Path(tempfile.mkdtemp(prefix="ufad-model-"))
    path = folder / Path(name).name
    path.write_bytes(data)
    return path


def unwrap(err: BaseException) -> BaseException:
    """The user's error inside a Ray task error (a UfadError raised on a worker), else ``err``."""
    from .errors import UfadError

    cause = getattr(err, "cause", None)
    while cause is not None and not isinstance(cause, UfadError):
        cause = getattr(cause, "cause", None)
    return cause if isinstance(cause, UfadError) else err
