"""A Python client for vramgate, the daemon that arbitrates GPU memory between local AI models.

    from vramgate import Client

    client = Client()                     # $VRAMGATE_URL, else http://127.0.0.1:9777
    client.load("whisper")                # blocks until ready
    with client.lease(vram="2GiB", holder="ffmpeg") as lease:
        ...                               # 2 GiB on GPU lease.device are yours
    for event in client.events():
        print(event["type"])

Standard library only.
"""

from .client import DEFAULT_URL, Client
from .errors import DaemonUnreachable, VramgateError
from .streams import Attachment, EventStream, Lease

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DEFAULT_URL",
    "VramgateError",
    "DaemonUnreachable",
    "Lease",
    "Attachment",
    "EventStream",
    "__version__",
]
