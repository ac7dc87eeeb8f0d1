"""A real imgrec server for tests: uvicorn on a free loopback port, in a background thread.

``running_server(classifier, config)`` yields the base URL and the ``Server`` object (its
classifier, batcher and metrics), and stops the server afterwards. The fixtures ``tiny_run`` and
``classifier`` (conftest.py) use them.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console


def train_tiny_run(root: Path) -> Path:
    """A test_resnet trained 2 epochs at 32 px on 3 synthetic classes (about 10 s): a real model directory."""
    from imgrec.data.synth import SynthSpec, write_synth_dataset
    from imgrec.engine.tasks.classify import train

    data = write_synth_dataset(root / "data", SynthSpec(classes=3, train_per_class=24, val_per_class=12, seed=4, min_side=40, max_side=64), workers=1)
    return Path(
        train(
            data=str(data), out=str(root / "run"), model="test_resnet", epochs=2, batch_size=8, device="cpu", precision="fp32",
            workers=0, tensorboard=False, console=Console(file=io.StringIO()),
            # the recipe of earlier imgrec versions, fixed: the serving tests' tolerances were set on this model
            base_lr=1e-3, warmup_epochs=1.0, data_config={"img_size": 32, "scale": (0.08, 1.0), "crop_pct": 0.95},
        )  # fmt: skip
    )


@contextlib.contextmanager
def running_server(
    classifier, config=None, *, api_keys=None, ssl: tuple[str, str] | None = None, grpc: bool = False, **app_options
) -> Iterator[tuple[str, object]]:
    """A real uvicorn server on a free port in a thread: (base URL, the app's Server); ``ssl`` = (key
    file, certificate file); ``grpc``: gRPC too, on a free port (the Server's ``grpc_port``);
    ``app_options``: create_app's others (repository, failed, loader)."""
    import uvicorn

    from imgrec.serve import create_app

    app = create_app(classifier, config, api_keys=api_keys, grpc={"host": "127.0.0.1", "port": 0} if grpc else None, **app_options)
    tls = {"ssl_keyfile": ssl[0], "ssl_certfile": ssl[1]} if ssl else {}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on", **tls))
    thread = threading.Thread(target=server.run, name="imgrec-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl else 'http'}://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
