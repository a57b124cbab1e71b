"""The shape of every transaction kind's payload, checked once before any rule reads it.

Strict: no type coercion ("3" is not 3, true is not 1), unknown fields refused (except where a kind
carries free-form data: a registration's extra info, a metrics report's values), and every string,
list and number a peer chooses has a bound, so that nothing a member declares can grow the state or
stretch a wait without limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

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
RoleName = Literal["sn", "sl", "swop", "swci", "ui", "admin"]


class Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Limits(Payload):
    max_min_peers: Annotated[int, Field(ge=1, le=MAX_MIN_PEERS_CEILING)] = 16
    max_blob_bytes: Annotated[int, Field(ge=1, le=MAX_BLOB_BYTES_CEILING)] = 4 << 30
    max_metrics_bytes: Annotated[int, Field(ge=64, le=MAX_METRICS_BYTES_CEILING)] = 16 << 10


# ------------------------------------------------------------------------------ identities and CAs

class Registration(Payload):
    """A node enters the ledger carrying its certificate; role and name are read from that
    certificate, `node_id` must repeat its name. Other keys are kept as the node's info."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    node_id: Name
    address: Annotated[str, StringConstraints(max_length=MAX_NAME)] = ""
    cert: Pem


class CAGrant(Payload):
    cert: Pem
    org: Name
    roles: Annotated[list[RoleName], Field(min_length=1, max_length=6)]


class Genesis(Payload):
    swarm_id: Name
    cas: Annotated[list[CAGrant], Field(min_length=1, max_length=64)]
    default_contract: Name
    default_taskrunner: Name
    default_limits: Limits = Limits()
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

class ContractCreate(Payload):
    name: Name
    peers: Names | None = None
    limits: Limits | None = None


class ContractUpdate(Payload):
    name: Name
    peers: Names | None = None
    limits: Limits | None = None


class ContractName(Payload):
    name: Name


class SessionJoin(Payload):
    contract: Name
    node: Name
    min_peers: Annotated[int, Field(ge=1, le=MAX_MIN_PEERS_CEILING)] = 1
    weightage: Annotated[float, Field(gt=0, le=100)] = 1.0
    merge_method: Name = "mean"


class SessionLeave(Payload):
    contract: Name
    node: Name


class SessionEvict(Payload):
    contract: Name
    node: Name
    reason: Text = ""


class Checkin(Payload):
    contract: Name
    round: Count
    node: Name
    hash: Digest
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    size: Count = 0
    final: bool = False


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


class Metrics(Payload):
    """A node's report about itself; the other keys are its metric values (numbers, strings, null),
    bounded in size by the contract's max_metrics_bytes."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    contract: Name
    node: Name


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


class TaskName(Payload):
    name: Name


class RunnerName(Payload):
    name: Name


class RunnerJoin(Payload):
    runner: Name
    capacity: Annotated[int, Field(ge=1, le=MAX_LIST)]


class RunnerAssign(Payload):
    runner: Name
    task: Name
    peers: Annotated[int, Field(ge=1, le=MAX_LIST)] | Literal["ALL"]


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


def parse(model: type[Payload], kind: str, payload: dict) -> Payload:
    """The payload as `model`, or Rejected naming the first field that does not fit."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        raise Rejected(f"{kind}: field {where!r}: {err['msg']}") from None
