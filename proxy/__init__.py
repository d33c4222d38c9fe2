"""traffic-shaper: a transparent, streaming reverse proxy for canary rollouts."""

__version__ = "0.1.0"
