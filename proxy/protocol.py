"""The base of the data plane's two protocols (listener.py's client connections, client.py's
upstream connections): aiohttp's `BaseProtocol`, whose flow control aiohttp's parsers and
`StreamReader` drive, with one cost taken off the hot path.

aiohttp's `StreamReader` calls `protocol.resume_reading()` whenever a read leaves its buffer
below the low-water mark, which is on every read of a small body, paused or not; aiohttp's
version then feeds the parser an empty chunk and asks the transport to resume. With nothing
paused, neither can do anything, so here it returns at once (about 2% of the instructions of a
proxied request).
"""

from __future__ import annotations

from aiohttp.base_protocol import BaseProtocol
from mypy_extensions import mypyc_attr

__all__ = ["FlowProtocol"]


# A regular class, not a native one, in the compiled build: a native class cannot derive from
# aiohttp's, which has __slots__. Its methods are compiled all the same; so are its subclasses'
# (ClientConnection, _Connection), which are regular classes for the same reason.
@mypyc_attr(native_class=False)
class FlowProtocol(BaseProtocol):
    def resume_reading(self, resume_parser: bool = True) -> None:
        if not self._reading_paused:
            return  # nothing paused: no parser backlog, and the transport is reading
        super().resume_reading(resume_parser)
