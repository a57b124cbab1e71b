"""`swarm ui`: a read-only web dashboard that follows the ledger live with one Watch stream.

view.py folds the entries into a bounded, in-memory view (no I/O); follow.py feeds it from the SN(s)
and verifies the chain received, at most once a minute; pages.py renders the view as HTML; app.py
serves it (Starlette + uvicorn) with server-sent events and, beyond loopback, HTTPS and a token."""
