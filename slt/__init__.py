"""slt: strong-lottery-ticket search with edge-popup inside random sparse source networks."""

__version__ = "0.1.0"
