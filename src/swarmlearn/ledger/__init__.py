"""The ledger: an append-only, hash-chained log of signed transactions and the state folded from it."""

from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, Signer, Tx, canonical_json
from swarmlearn.ledger.state import LedgerState, fold
from swarmlearn.ledger.store import LedgerStore

__all__ = [
    "GENESIS_PREV_HASH",
    "Entry",
    "LedgerState",
    "LedgerStore",
    "Signer",
    "Tx",
    "canonical_json",
    "fold",
]
