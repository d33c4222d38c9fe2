"""traffic-shaper: a transparent, streaming reverse proxy for canary rollouts."""

from . import native

__version__ = "0.1.0"

native.use()  # before any module of the data path is imported: compiled, or from source
