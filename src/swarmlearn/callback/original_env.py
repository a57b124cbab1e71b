"""The original product's SL_* environment variables, and what each means here. A model.py moved
from the original may run with its profile's slenvvars/envvars still set; the callback names, in
one line at start, those present and what became of them, so none is silently dropped."""

from __future__ import annotations

from collections.abc import Mapping

SL_VARIABLES = {
    "SL_REQUEST_CHANNEL": "ignored: the ML reaches its SL through SWARM_SL_ADDR (a socket), not FIFO pipes",
    "SL_RESPONSE_CHANNEL": "ignored: the ML reaches its SL through SWARM_SL_ADDR (a socket), not FIFO pipes",
    "SL_WAIT_FOR_FULL_QUORUM_SECONDS": "the SL's, not the ML's: `swarm sl --checkin-wait SECONDS`",
    "SL_LEADER_FAILURE_BASE_TIMEOUT": "the SL's, not the ML's: `swarm sl --leader-timeout SECONDS`",
    "SL_MAKE_ME_ADMIN": "unsupported: every SL of a round may lead it (the leader is chosen from the ledger)",
    "SL_RAM_INTENSIVE": "ignored: merges run in memory, tensor by tensor",
    # Every profile of the original's examples sets it (envvars), so every ML sees it.
    "SL_LOG_LEVEL": "ignored: SLs log at INFO; `swarm sl -v` (a SWOP's --sl-arg=-v) logs DEBUG",
}


def describe(environ: Mapping[str, str]) -> str | None:
    """One line naming each SL_* variable set in `environ` and its fate; None when there is none."""
    present = sorted(name for name in environ if name.startswith("SL_"))
    if not present:
        return None
    parts = [f"{name} {SL_VARIABLES.get(name, 'unknown to the original and to us: ignored')}" for name in present]
    return "original SL_* settings in this ML's environment: " + "; ".join(parts)
