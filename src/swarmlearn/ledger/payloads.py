"""The shape of every transaction kind's payload, checked once before any rule reads it.

Strict: no type coercion ("3" is not 3, true is not 1), unknown fields refused (except where a kind
carries free-form data: a registration's extra info, a metrics report's values), and every string,
list and number a peer chooses has a bound, so that nothing a member declares can grow the state or
stretch a wait without limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from swarmlearn import pki
from swarmlearn.errors import Rejected

# Bounds on what one payload may carry (the SN's message limit bounds the whole transaction too).
MAX_NAME = 128
MAX_TEXT = 8192
MAX_PEM = 16384
MAX_LIST = 1024
# Ceilings on contract limits: what any creator may allow at most.
MAX_MIN_PEERS_CEILING = 1024
MAX_BLOB_BYTES_CEILING = 1 << 40
MAX_METRICS_BYTES_CEILING = 64 << 10

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PEM)]
Digest = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Names = Annotated[list[Name], Field(min_length=1, max_length=MAX_LIST)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
RoleName = Literal[pki.ROLES]
# A check-in's weight is node weightage (at most 100) x samples since the last sync: far below this.
MAX_WEIGHT = float(1 << 40)


class Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


MinPeersLimit = Annotated[int, Field(ge=1, le=MAX_MIN_PEERS_CEILING)]
BlobBytesLimit = Annotated[int, Field(ge=1, le=MAX_BLOB_BYTES_CEILING)]
MetricsBytesLimit = Annotated[int, Field(ge=64, le=MAX_METRICS_BYTES_CEILING)]


class LimitsChange(Payload):
    """Contract limits as a creator gives them: what is left out keeps its value (for a new
    contract: the default of model.ContractLimits)."""

    max_min_peers: MinPeersLimit | None = None
    max_blob_bytes: BlobBytesLimit | None = None
    max_metrics_bytes: MetricsBytesLimit | None = None

    def given(self) -> dict:
        return self.model_dump(exclude_none=True)


# ------------------------------------------------------------------------------ identities and CAs

class Registration(Payload):
    """A node enters the ledger carrying its certificate; role and name are read from that
    certificate, `node_id` must repeat its name. Other keys are kept as the node's info."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    node_id: Name
    address: Annotated[str, StringConstraints(max_length=MAX_NAME)] = ""
    cert: Pem

    @model_validator(mode="after")
    def _declares_no_identity(self) -> Registration:
        # Identity is read from the certificate: a registration that declares any of it is refused
        # rather than stored beside the real one, where a reader could take it for the truth.
        declared = [k for k in DECLARED_IDENTITY if k in (self.model_extra or {})]
        if declared:
            raise ValueError(f"declares {', '.join(declared)}: a node's role and organization are read from its "
                             f"certificate, never from a payload")
        return self


DECLARED_IDENTITY = ("role", "org", "cert_fp", "subject", "spiffe_id")


class CAGrant(Payload):
    cert: Pem
    org: Name
    roles: Annotated[list[RoleName], Field(min_length=1, max_length=6)]


class Genesis(Payload):
    swarm_id: Name
    protocol: int = 0  # missing: a ledger from before protocols were recorded
    cas: Annotated[list[CAGrant], Field(min_length=1, max_length=64)]
    default_contract: Name
    default_taskrunner: Name
    default_limits: LimitsChange = LimitsChange()
    created: float = 0.0
    sn: Registration


class TrustCA(CAGrant):
    pass


class MapCert(Payload):
    cert: Pem
    role: RoleName
    name: Name


class RevokeCert(Payload):
    cert_fp: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    reason: Text = ""


# ------------------------------------------------------------------------------ contracts and rounds

class ContractChange(Payload):
    """contract_create and contract_update: a name, and optionally its peers, limits and merge method
    (protocol 4: every member then merges with it)."""

    name: Name
    peers: Names | None = None
    limits: LimitsChange | None = None
    merge_method: Name | None = None


class Named(Payload):
    """Kinds that name one contract, task or task runner."""

    name: Name


class ClientDP(Payload):
    """Client-level differential privacy of a secure_mean contract's rounds: each node clips its update
    to L2 norm `clip`, and the survivors' noise sums to `noise_multiplier` x the weighted sum's
    sensitivity; ε is reported at `delta`."""

    clip: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, le=0.01, allow_inf_nan=False)] = 1e-5


class SessionJoin(Payload):
    contract: Name
    node: Name
    min_peers: Annotated[int, Field(ge=1, le=MAX_MIN_PEERS_CEILING)] = 1
    weightage: Annotated[float, Field(gt=0, le=100)] = 1.0
    merge_method: Name = "mean"
    client_dp: ClientDP | None = None  # protocol 4, with secure_mean only


class SessionLeave(Payload):
    contract: Name
    node: Name


class SessionEvict(Payload):
    contract: Name
    node: Name
    reason: Text = ""


# X25519 public keys as base64 (32 bytes: 44 characters), a SHA-256 commitment as hex.
PublicKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
Commitment = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# A sealed or revealed Shamir share: base64 text of a few hundred bytes at most.
ShareText = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9+/=._:-]+$")]
Shares = Annotated[dict[Name, ShareText], Field(min_length=1, max_length=MAX_LIST)]


class RoundKeys(Payload):
    """A participant's fresh keys for one secure_mean round: `c` to seal shares, `s` to agree pairwise
    masks, `b` the commitment to its self-mask seed."""

    c: PublicKey
    s: PublicKey
    b: Commitment


class Checkin(Payload):
    contract: Name
    round: Count
    node: Name
    hash: Digest
    weight: Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]
    size: Count = 0
    final: bool = False
    # Protocol 4, secure_mean contracts only (and required there).
    keys: RoundKeys | None = None


class CloseRound(Payload):
    contract: Name
    round: Count
    participants: Names
    leader: Name


class Reelect(Payload):
    contract: Name
    round: Count
    failed: Name
    leader: Name


class Merged(Payload):
    contract: Name
    round: Count
    hash: Digest
    size: Count = 0
    dropped: Annotated[list[Name], Field(max_length=MAX_LIST)] = []


class RoundAbort(Payload):
    contract: Name
    round: Count
    reason: Text = ""
    failed: Name | None = None
    dropped: Annotated[list[Name], Field(max_length=MAX_LIST)] = []


class SecAggShares(Payload):
    """A participant's Shamir shares of its round secrets, each sealed for one participant (itself too)."""

    contract: Name
    round: Count
    node: Name
    shares: Shares


class SecAggMasking(Payload):
    """The leader fixes the masking set: the participants whose shares it saw in time."""

    contract: Name
    round: Count
    nodes: Names


class SecAggMasked(Payload):
    """A member of the masking set posts the hash and size of its masked input."""

    contract: Name
    round: Count
    node: Name
    hash: Digest
    size: Count


class SecAggSurvivors(Payload):
    """The leader names the members whose masked inputs it holds; the rest are recovered as dropped."""

    contract: Name
    round: Count
    nodes: Names


class SecAggReveal(Payload):
    """A survivor reveals, for each member of the masking set, one share: of its self-mask seed for a
    survivor, of its mask key for a dropped one."""

    contract: Name
    round: Count
    node: Name
    shares: Shares


MetricsKind = Literal["train", "validation"]


class Metrics(Payload):
    """A node's report about itself; the other keys are its metric values (numbers, strings, null),
    bounded in size by the contract's max_metrics_bytes. `kind` "train": `loss` is the mean training
    loss of the steps since the node's last sync of `round`; "validation": `metric` (named by
    `metric_name`, with the validation `loss` where known) is the merged model of `round` measured on
    the node's validation data. Reports of older callbacks carry no kind: read them as "train"."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    contract: Name
    node: Name
    kind: MetricsKind | None = None


# ------------------------------------------------------------------------------ tasks and task runners

class TaskCreate(Payload):
    name: Name
    type: Name
    author: Text = ""
    prereq: Name
    outcome: Text = ""
    body: dict[str, Any]


class TaskAppend(Payload):
    name: Name
    body: dict[str, Any]


class RunnerJoin(Payload):
    runner: Name
    capacity: Annotated[int, Field(ge=1, le=MAX_LIST)]


class RunnerAssign(Payload):
    runner: Name
    task: Name
    peers: Annotated[int, Field(ge=1, le=MAX_LIST)] | Literal["ALL"]
    # The original's `ASSIGN TASK ... TARGET <swop>`: only that SWOP of the runner may claim the peers.
    target: Name | None = None


class RunnerClaim(Payload):
    runner: Name
    generation: Count
    peers: Names


class RunnerPeerStatus(Payload):
    runner: Name
    generation: Count
    peer: Name
    status: Name
    exit_code: int | None = None
    detail: Text = ""


class RunnerOnly(Payload):
    runner: Name


# ------------------------------------------------------------------------------ checkpoints

class Checkpoint(Payload):
    """The SHA-256 of the snapshot of the state folded through entry `index` (ledger/snapshot.py)."""

    index: Count
    state_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def parse(model: type[Payload], kind: str, payload: dict) -> Payload:
    """The payload as `model`, or Rejected naming the first field that does not fit."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        raise Rejected(f"{kind}: field {where!r}: {err['msg']}") from None
