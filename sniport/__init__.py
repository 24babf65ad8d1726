"""sniport: many sites on one port, routed by the TLS server name."""

__version__ = "0.1.0"
