from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchRequest(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: str
    def __init__(self, hash: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class MergedRequest(_message.Message):
    __slots__ = ("contract", "round", "wait_seconds")
    CONTRACT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    contract: str
    round: int
    wait_seconds: float
    def __init__(self, contract: _Optional[str] = ..., round: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("contract", "min_peers", "weightage", "merge_method")
    CONTRACT_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTAGE_FIELD_NUMBER: _ClassVar[int]
    MERGE_METHOD_FIELD_NUMBER: _ClassVar[int]
    contract: str
    min_peers: int
    weightage: float
    merge_method: str
    def __init__(self, contract: _Optional[str] = ..., min_peers: _Optional[int] = ..., weightage: _Optional[float] = ..., merge_method: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "contract", "latest_merged_round")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_FIELD_NUMBER: _ClassVar[int]
    LATEST_MERGED_ROUND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    contract: str
    latest_merged_round: int
    def __init__(self, node_id: _Optional[str] = ..., contract: _Optional[str] = ..., latest_merged_round: _Optional[int] = ...) -> None: ...

class SyncHeader(_message.Message):
    __slots__ = ("weight", "size", "final", "catch_up", "round", "hash", "participants", "leader", "seconds", "swarm_finished", "contributed")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SWARM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    weight: float
    size: int
    final: bool
    catch_up: bool
    round: int
    hash: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    leader: str
    seconds: float
    swarm_finished: bool
    contributed: bool
    def __init__(self, weight: _Optional[float] = ..., size: _Optional[int] = ..., final: _Optional[bool] = ..., catch_up: _Optional[bool] = ..., round: _Optional[int] = ..., hash: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., leader: _Optional[str] = ..., seconds: _Optional[float] = ..., swarm_finished: _Optional[bool] = ..., contributed: _Optional[bool] = ...) -> None: ...

class SyncPart(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SyncHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SyncHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ("round", "loss", "metric", "epoch", "step", "metric_name", "kind")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    metric: float
    epoch: float
    step: int
    metric_name: str
    kind: str
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., metric: _Optional[float] = ..., epoch: _Optional[float] = ..., step: _Optional[int] = ..., metric_name: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
