"""Wire constants and defaults that several components must agree on, in one module that imports
nothing: ports, the names genesis creates, heartbeat cadence, the SL's round timing, and what an SL
and its ML process agree on. The SwarmCallback reads it without loading gRPC's TLS stack or
cryptography into the user's training process.

Values a single component owns stay in that component (the SN's rate limits in sn/server.py, the
ledger's payload bounds in ledger/payloads.py); what lives here is read by two or more."""

# Ports: the SN's API (every SL, SWOP, SWCI and UI calls it) and an SL's peer-to-peer tensor port.
SN_API_PORT = 30304
SL_FS_PORT = 30305
# An SN's own etcd member (`swarm sn --ledger etcd` without --etcd-endpoints): its peer port, which other
# members reach (HPE's SN peer-to-peer port, --sn-p2p-port), and its client port, which SNs reach.
SN_P2P_PORT = 30303
ETCD_CLIENT_PORT = 2379

# Where a swarm's ledger lives in an etcd cluster (`swarm sn --ledger etcd --etcd-prefix`): one swarm per prefix.
ETCD_PREFIX = "/swarmlearn"

# Names genesis creates, so that a swarm works before any SWCI script has made its own.
DEFAULT_CONTRACT = "defaultbb.cqdb.sml.hpe"
DEFAULT_TASKRUNNER = "defaulttaskbb.taskdb.sml.hpe"

# The folder in an SL's data dir where it keeps each contract's latest merged model; a SWOP that
# cleans up after a task leaves it, so that the task run again resumes from it.
KEPT_MODELS_DIR = "merged"

# Every SL and SWOP tells the SN it is alive this often; peers judge liveness from these beats.
HEARTBEAT_EVERY = 1.0
# How long a process waits for an SN at start-up before giving up.
SN_CONNECT_TIMEOUT = 20.0

# The SL's round timing (sl/round.py `Timeouts`; `swarm sl` options show the same values).
CHECKIN_WAIT = 3.0
LEADER_BASE = 10.0
LEADER_BYTES_PER_SECOND = 20e6
STALE_AFTER = 5.0
WAITING_LOG_EVERY = 10.0
ELECTION_GRACE = 1.0

# The most bytes of blobs (check-ins, merged models) an SL keeps to serve; beyond it the oldest go
# (the newest is always kept).
BLOB_STORE_BYTES = 2 << 30

# Tensors travel in chunks of 1 MiB; the biggest single message we accept is a chunk plus framing.
CHUNK = 1 << 20
MAX_MESSAGE = CHUNK + (64 << 10)

# An ML channel on TCP (`swarm sl --ml-addr HOST:PORT`) serves only callers that present the SL's
# secret: the SL prints it as SWARM_SL_TOKEN=... in its ready line, the SWOP passes it to the ML's
# environment, and the callback sends it as this gRPC metadata key on every call.
TOKEN_ENV = "SWARM_SL_TOKEN"
TOKEN_METADATA = "swarm-sl-token"
