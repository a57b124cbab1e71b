"""Typed errors. Library code raises these; only the CLI prints them and picks exit codes.

Every message is meant to be shown to a user as one line: what is wrong, where, and what to do.
"""


class SwarmError(Exception):
    """Base of every error swarmlearn raises on purpose."""


class ConfigError(SwarmError):
    """A file, flag or field the user gave is missing or malformed."""


class CertificateError(ConfigError):
    """A key, certificate or CA folder is missing, unreadable, expired or not trusted."""


class LedgerError(SwarmError):
    """The ledger on disk is unusable: corrupt, from another swarm, or not writable."""


class LedgerOutOfReach(LedgerError):
    """A shared ledger store cannot be reached from here (etcd without quorum, unreachable, or refusing
    our TLS): other SNs of the swarm may still reach it, so clients move on rather than give up."""


class Rejected(SwarmError):
    """The ledger refused a transaction; the message says why."""


class AlreadyRecorded(Rejected):
    """The very same signed transaction is already on the ledger (a retry, or a replay)."""

    def __init__(self, tx_id: str, index: int):
        super().__init__(f"transaction {tx_id[:12]} is already recorded at entry {index}; a replay adds nothing")
        self.tx_id = tx_id
        self.index = index


class HeadMoved(SwarmError):
    """A compare-and-set append lost: the ledger head was not the one expected."""


class SNUnavailable(SwarmError):
    """No Swarm Network node answered in time."""


class SNLimitReached(SwarmError):
    """The SN refused a call past one of its bounds (submit rate, watch streams, reply size); the
    message names the bound and what to do."""
