"""swarmlearn: Swarm Learning — peers train locally and merge parameters through a shared, signed ledger."""

__version__ = "0.1.0"
