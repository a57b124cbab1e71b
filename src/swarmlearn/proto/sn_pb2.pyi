from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedTx(_message.Message):
    __slots__ = ("tx", "signature")
    TX_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    tx: bytes
    signature: bytes
    def __init__(self, tx: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("index", "hash")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    index: int
    hash: str
    def __init__(self, index: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("head_index", "head_hash", "sn_node_id")
    HEAD_INDEX_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SN_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    head_index: int
    head_hash: str
    sn_node_id: str
    def __init__(self, head_index: _Optional[int] = ..., head_hash: _Optional[str] = ..., sn_node_id: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("section", "contract", "from_index")
    SECTION_FIELD_NUMBER: _ClassVar[int]
    CONTRACT_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    section: str
    contract: str
    from_index: int
    def __init__(self, section: _Optional[str] = ..., contract: _Optional[str] = ..., from_index: _Optional[int] = ...) -> None: ...

class QueryReply(_message.Message):
    __slots__ = ("head_index", "state_json")
    HEAD_INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    head_index: int
    state_json: bytes
    def __init__(self, head_index: _Optional[int] = ..., state_json: _Optional[bytes] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("from_index", "batch")
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    from_index: int
    batch: int
    def __init__(self, from_index: _Optional[int] = ..., batch: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("index", "hash", "body", "following")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    index: int
    hash: str
    body: bytes
    following: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    def __init__(self, index: _Optional[int] = ..., hash: _Optional[str] = ..., body: _Optional[bytes] = ..., following: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("index", "size", "checkpoint", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    size: int
    checkpoint: LedgerEntry
    data: bytes
    def __init__(self, index: _Optional[int] = ..., size: _Optional[int] = ..., checkpoint: _Optional[_Union[LedgerEntry, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinClusterRequest(_message.Message):
    __slots__ = ("peer_url", "ledger_cert")
    PEER_URL_FIELD_NUMBER: _ClassVar[int]
    LEDGER_CERT_FIELD_NUMBER: _ClassVar[int]
    peer_url: str
    ledger_cert: bytes
    def __init__(self, peer_url: _Optional[str] = ..., ledger_cert: _Optional[bytes] = ...) -> None: ...

class ClusterMember(_message.Message):
    __slots__ = ("id", "name", "peer_urls", "client_urls", "is_learner")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_URLS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_URLS_FIELD_NUMBER: _ClassVar[int]
    IS_LEARNER_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    peer_urls: _containers.RepeatedScalarFieldContainer[str]
    client_urls: _containers.RepeatedScalarFieldContainer[str]
    is_learner: bool
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., peer_urls: _Optional[_Iterable[str]] = ..., client_urls: _Optional[_Iterable[str]] = ..., is_learner: _Optional[bool] = ...) -> None: ...

class JoinClusterReply(_message.Message):
    __slots__ = ("member_id", "cluster_id", "members")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    member_id: int
    cluster_id: int
    members: _containers.RepeatedCompositeFieldContainer[ClusterMember]
    def __init__(self, member_id: _Optional[int] = ..., cluster_id: _Optional[int] = ..., members: _Optional[_Iterable[_Union[ClusterMember, _Mapping]]] = ...) -> None: ...
