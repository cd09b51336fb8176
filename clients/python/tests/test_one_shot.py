"""The one-shot form of an external model through ``Client.lease(model=...)``, against the real
daemon (written in review against a bug it proved: the client sent no pid)."""

from __future__ import annotations

import os
from typing import Callable

from conftest import Daemon, wait_until


def test_a_model_lease_on_an_external_model_counts_the_apps_memory_once(
    start_daemon: Callable[..., Daemon]
) -> None:
    """``client.lease(model="clip")`` on an external model with no app attached is the daemon's
    one-shot form (README: ``POST /vramgate/leases {"model": "clip", "ttl": "30s", "pid":
    1234}``), where the holder's ``pid`` tells vramgate whose GPU memory is the model's. The
    client has no ``pid`` parameter and sends none (``Client.lease``), unlike ``attach``, which
    defaults it to ``os.getpid()``. So once the app loads the model, its memory is counted twice:
    as the model's reservation and again as foreign use, and the rest of the GPU shrinks by it."""
    daemon = start_daemon('[models.clip]\nbackend = "external"\nvram = "1000MiB"\n')
    client = daemon.client
    claim = daemon.sim_dir / "0" / str(os.getpid())
    with client.lease(model="clip", holder="one-shot-app"):
        claim.write_text("1000")  # the app puts CLIP on the GPU itself
        try:
            status = wait_until(
                lambda: (lambda s: s if any(p["pid"] == os.getpid() for p in s["devices"][0]["processes"]) else None)(
                    client.status()
                ),
                5,
                "the app's memory in the process list",
            )
            process = next(p for p in status["devices"][0]["processes"] if p["pid"] == os.getpid())
            assert process["model"] == "clip", (
                f"the one-shot holder's 1000 MiB count as foreign on top of clip's reservation: {process}"
            )
        finally:
            claim.unlink()
