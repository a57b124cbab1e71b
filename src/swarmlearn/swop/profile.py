"""The SWOP profile YAML: which SL+ML node pairs one operator spawns on its host, in HPE Swarm
Learning's shape.

    groupname  : demo
    taskrunner : defaulttaskbb.taskdb.sml.hpe
    resourcemgr : {mgrtype: DOCKER, accessinfo: {accesstype: FROMENV}}
    apisrv : {locator: {host: ~, port: ~, service: api-service}}
    envvars : [SL_LOG_LEVEL : INFO]
    nodes :
      - slnodedef :
          idx : 0
          identity : [{attribute: {aType: KEY, mType: BIND, src: <PROJECT-CERTS>/sl-1-key.pem}}]
          slhostname : sl1
          slport : ~
          usrhostname : user1
          usrenvvars : [SCRATCH_DIR : "user1", NODE_ID: "n1"]

`apisrv` may also list several SNs (ours), which the SLs move between when one stops answering:

    apisrv : [{ip: 10.0.0.1, port: 30304}, {ip: 10.0.0.2, port: ~}]   # port ~: that of SWOP's first SN

Keys that only make sense for containers are accepted; `notes()` says in one line each what we do
with them. Placeholders such as `<PROJECT>` are left in the strings: `swarm run` fills them in.

Ours, optional: what this SWOP agrees to run (swop/policy.py decides; a refused task ends FAILED with
the reason before any process starts).

    taskauthors  : [spiffe://acme/swci/*]  # who may create AND assign its tasks, by certificate identity
                                           # (never the taskdef's Author); `*` = any name. Default: the
                                           # swci and admin identities of the SWOP's own organization
    entrypoints  : [python3, /usr/bin/Rscript]  # programs a RUN_SWARM task may run; a python name means
                                           # the SWOP's own Python. Default: only that Python
    allowedpaths : [/data/shared]          # folders besides --usr-dir and the workspace (and each node's
                                           # privatedata) that task paths may lie in; relative: to --usr-dir
    allowbuild   : true                    # MAKE_USER_CONTAINER may pip-install (default true)
    buildfromsource : false                # a build may compile sdists (default: wheels only, so that
                                           # no package code runs on this host while it installs)
    pathmapping  : auto                    # how ML processes see the task's container paths: mounts
                                           # (a private mount namespace), rewrite, or auto (mounts where
                                           # the OS allows them); see swop/paths.py
    pipoptions   : [--index-url]           # pip options a build may use; default none: only plain
                                           # requirements such as `torch==2.3` or `peft>=0.12`

`taskauthors` and `entrypoints` replace their defaults; `allowedpaths` adds to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from swarmlearn import pki
from swarmlearn.defaults import DEFAULT_TASKRUNNER, SL_FS_PORT
from swarmlearn.errors import ConfigError
from swarmlearn.yamlfile import EnvVars, KeyValues, YamlModel, line_of, located_error, validate

MountType = Literal["BIND", "VOLUME"]
AttributeType = Literal["KEY", "CERT", "CAPATH", "CACERT", "SPIFFE_SOCKETPATH"]

# `taskauthors` entries: a SPIFFE id of a task-writing role, `*` standing for a whole name.
AUTHOR_PATTERN = re.compile(rf"spiffe://{pki.ORG_PATTERN.pattern}/(swci|admin)/(\*|(?i:{pki.NAME_PATTERN.pattern}))")
# `entrypoints` entries that mean "the SWOP's own Python".
PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")

# Node keys that configure a container (labels, networks, the SL file service's container); we run
# local processes, so they are accepted and reported by notes().
_CONTAINER_ONLY = ("slfsservice", "sllabels", "slnetworkopts", "usrlabels", "usrnetworkopts")


def _tilde_means_default(cls: type[YamlModel], value: Any, info: ValidationInfo) -> Any:
    """`key: ~` means the key's default (`slport : ~` in the original's files), not "no value"."""
    return cls.model_fields[info.field_name].get_default(call_default_factory=True) if value is None else value


class AccessInfo(YamlModel):
    accesstype: Literal["FROMENV"] = "FROMENV"


class ResourceMgr(YamlModel):
    """How nodes are started. PROCESS is ours; the original's DOCKER is accepted and also runs processes."""

    mgrtype: Literal["PROCESS", "DOCKER"] = "PROCESS"
    accessinfo: AccessInfo | None = None


class Locator(YamlModel):
    """Where the SN API is. A `~` part means that of the SN that SWOP was started with."""

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    service: str | None = None  # a container service name in the original; not used here


class ApiServer(YamlModel):
    locator: Locator | None = None


class SnEndpoint(YamlModel):
    """One SN of a list under apisrv. `port: ~` means the port of the first SN that SWOP was started with."""

    ip: str
    port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("ip")
    @classmethod
    def _one_host(cls, ip: str) -> str:
        from swarmlearn.sn.client import sn_address_parts  # here: loading a profile needs no grpc until then

        try:
            parts = sn_address_parts(ip, "ip")
        except ConfigError:
            parts = []
        if len(parts) != 1 or parts[0][1] is not None:
            raise ValueError(f"{ip!r} is not one IP or host name; write the address alone (an IPv6 one in "
                             f"brackets) and its port under port:")
        return ip


_API_SERVER = TypeAdapter(ApiServer)
_SN_LIST = TypeAdapter(list[SnEndpoint])


class IdentityAttribute(YamlModel):
    """One identity file or folder of the SL node: `src` on this host (joined with `subPath` if given)."""

    a_type: AttributeType = Field(alias="aType")
    m_type: MountType = Field(alias="mType")
    src: str
    tgt: str | None = None  # the path inside the original's container; processes read `src` directly
    sub_path: str | None = Field(default=None, alias="subPath")

    @property
    def path(self) -> Path:
        return Path(self.src) / self.sub_path if self.sub_path else Path(self.src)


class _Entry(YamlModel):
    """A list entry written as a one-key map, `- attribute: {...}` or `- slnodedef: {...}`."""

    @model_validator(mode="before")
    @classmethod
    def _wrapped(cls, data: Any) -> Any:
        # Leaving out the one key is the usual slip; say that once instead of one "unknown key" per key.
        (key,) = cls.model_fields
        if isinstance(data, dict) and data and key not in data:
            raise PydanticCustomError("not_wrapped", f'write this entry as "- {key}:" with its keys indented under it')
        return data


class IdentityEntry(_Entry):
    attribute: IdentityAttribute


class PrivateData(YamlModel):
    """The node's private data folder, seen by its ML process."""

    src: str
    m_type: MountType = Field(alias="mType")


class SlNodeDef(YamlModel):
    """One SL+ML node pair of this host."""

    idx: int = Field(ge=0)
    identity: list[IdentityEntry] = []
    slhostname: str | None = None
    slhostip: str | None = None
    slport: int = Field(default=SL_FS_PORT, ge=0, le=65535)  # 0: the OS picks a free port
    slfsservice: Any = None
    sllabels: Any = None
    slnetworkopts: Any = None
    privatedata: PrivateData | None = None
    slenvvars: EnvVars = {}
    usrhostname: str | None = None
    usrlabels: Any = None
    usrnetworkopts: Any = None
    usrcontaineropts: KeyValues = {}  # only `gpus` means something here; see gpu_devices()
    usrenvvars: EnvVars = {}

    @field_validator("identity", "slport", mode="before")
    @classmethod
    def _tilde_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        return _tilde_means_default(cls, value, info)

    @field_validator("usrcontaineropts")
    @classmethod
    def _gpus_readable(cls, opts: dict[str, Any]) -> dict[str, Any]:
        if "gpus" in opts:
            _cuda_devices(opts["gpus"])  # raises ValueError now rather than when the node starts
        return opts

    @property
    def node_id(self) -> str:
        """The node's name in the swarm: its ML host name, else its SL host name, else node<idx>."""
        return self.usrhostname or self.slhostname or f"node{self.idx}"

    def identity_file(self, a_type: AttributeType) -> Path | None:
        """The file (or folder, for CAPATH) given for `a_type`, or None when the profile gives none."""
        for entry in self.identity:
            if entry.attribute.a_type == a_type:
                return entry.attribute.path
        return None

    def gpu_devices(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for the ML process from `usrcontaineropts: gpus` ("device=0,1" -> "0,1");
        None when every visible GPU may be used (`all`, or no `gpus`)."""
        return _cuda_devices(self.usrcontaineropts["gpus"]) if "gpus" in self.usrcontaineropts else None


def _cuda_devices(gpus: Any) -> str | None:
    """Docker's `--gpus` value -> CUDA_VISIBLE_DEVICES: `all` -> None, `2` -> "0,1", `device=0,1` -> "0,1"."""
    text = gpus.strip().strip("'\"").strip() if isinstance(gpus, str) else gpus
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, int) and not isinstance(text, bool):
        return ",".join(str(i) for i in range(text))
    if isinstance(text, str) and text.lower() == "all":
        return None
    if isinstance(text, str) and text.startswith("device="):
        devices = [d.strip() for d in text.removeprefix("device=").split(",")]
        if devices and all(re.fullmatch(r"[A-Za-z0-9-]+", d) for d in devices):
            return ",".join(devices)
    raise ValueError(f'gpus must be all, a count, or "device=0,1" (GPU indexes or UUIDs), got {gpus!r}')


class NodeEntry(_Entry):
    slnodedef: SlNodeDef


class SwopProfile(YamlModel):
    """One SWOP's profile: its task runner, the SN API it talks to, and the nodes it spawns."""

    groupname: str
    taskrunner: str = DEFAULT_TASKRUNNER
    policyuri: str | None = None
    resourcemgr: ResourceMgr = ResourceMgr()
    network: str | None = None
    apls: Any = None  # the original's licence server: accepted, ignored
    apisrv: ApiServer | list[SnEndpoint] | None = None  # the original's locator, or several SNs
    envvars: EnvVars = {}
    nodes: list[NodeEntry]
    dns: Any = None
    # Ours: what this SWOP agrees to run (see the module docstring and swop/policy.py).
    taskauthors: list[str] | None = None  # None: own organization's swci/* and admin/*
    entrypoints: list[str] | None = None  # None: the SWOP's own Python only
    allowedpaths: list[str] = []
    allowbuild: bool = True
    buildfromsource: bool = False
    pipoptions: list[str] = []
    pathmapping: Literal["auto", "mounts", "rewrite"] = "auto"

    @field_validator("taskrunner", "resourcemgr", "allowedpaths", "allowbuild", "buildfromsource", "pipoptions",
                     "pathmapping", mode="before")
    @classmethod
    def _tilde_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        return _tilde_means_default(cls, value, info)

    @field_validator("apisrv", mode="before")
    @classmethod
    def _one_or_several_sns(cls, value: Any, info: ValidationInfo) -> Any:
        # Validated here, each form on its own, so that a mistake is reported once, in the form written
        # (a union would also report it as a failed match of the other form).
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise ValueError("the list names no SN; write - {ip: IP, port: PORT} entries, or leave apisrv out")
            return _SN_LIST.validate_python(value, context=info.context)
        return _API_SERVER.validate_python(value, context=info.context)

    @field_validator("taskauthors")
    @classmethod
    def _spiffe_patterns(cls, authors: list[str] | None) -> list[str] | None:
        return _each_item(authors, AUTHOR_PATTERN.fullmatch,
                          lambda a: f"{a!r} is not a task author; write spiffe://<organization>/swci/<name> (or "
                                    f"admin for the role; * for any name): the identity in the signer's certificate")

    @field_validator("entrypoints")
    @classmethod
    def _programs(cls, programs: list[str] | None) -> list[str] | None:
        return _each_item(programs, lambda p: PYTHON_NAME.fullmatch(p) or Path(p).is_absolute(),
                          lambda p: f"{p!r}: name a program by its absolute path (e.g. /usr/bin/Rscript), or "
                                    f"python3 for the SWOP's own Python")

    @field_validator("allowedpaths")
    @classmethod
    def _folders(cls, folders: list[str]) -> list[str]:
        return _each_item(folders, str.strip, lambda f: "name a folder (an empty path would allow nothing useful)")

    @field_validator("pipoptions")
    @classmethod
    def _options(cls, options: list[str]) -> list[str]:
        return _each_item(options, lambda o: re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", o),
                          lambda o: f"{o!r} is not a pip option; write it as pip spells it, e.g. --index-url")

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, nodes: list[NodeEntry]) -> list[NodeEntry]:
        if not nodes:
            raise ValueError('the profile lists no nodes; add "- slnodedef:" entries')
        return nodes

    @model_validator(mode="after")
    def _distinct_nodes(self, info: ValidationInfo) -> SwopProfile:
        # Two nodes with one idx or one name would share a data folder and a place in the swarm.
        problems = []
        reported: set[tuple[int, int, str]] = set()  # a name taken from slhostname or idx: report it once
        for what, key, fix in (
            ("idx", lambda n: ("idx", n.idx), "give each node its own idx"),
            ("node name", _name_key, "give each node its own usrhostname"),
            ("slhostname", lambda n: ("slhostname", n.slhostname), "give each node its own slhostname"),
        ):
            first: dict[Any, int] = {}
            for j, node in enumerate(self.slnodedefs):
                field, value = key(node)
                if value is None:
                    continue
                i = first.setdefault(value, j)
                if i == j or (i, j, field) in reported:
                    continue
                reported.add((i, j, field))
                here = ("nodes", i, "slnodedef", key(self.slnodedefs[i])[0])
                problems.append((("nodes", j, "slnodedef", field),
                                 f"{what} {value!r} is also used by nodes[{i}] ({line_of(info, here)}); {fix}",
                                 value))
        if problems:
            raise located_error(problems, type(self).__name__)
        return self

    @property
    def slnodedefs(self) -> list[SlNodeDef]:
        return [entry.slnodedef for entry in self.nodes]

    def sn_addresses(self, swop_sns: list[str]) -> list[str]:
        """The SNs ("HOST:PORT") its SLs talk to: apisrv's list, or its locator, with `~` parts taken from
        the SNs that SWOP was started with (`swop_sns`, at least one)."""
        first_port = int(swop_sns[0].rsplit(":", 1)[1])
        if isinstance(self.apisrv, list):
            return _distinct(f"{sn.ip}:{sn.port or first_port}" for sn in self.apisrv)
        locator = self.apisrv.locator if self.apisrv and self.apisrv.locator else Locator()
        if locator.host is not None:
            return [f"{locator.host}:{locator.port or first_port}"]
        if locator.port is not None:
            return _distinct(f"{sn.rsplit(':', 1)[0]}:{locator.port}" for sn in swop_sns)
        return list(swop_sns)

    def notes(self) -> list[str]:
        """One line per setting we accept but do not act on as the original did."""
        notes = []
        if self.resourcemgr.mgrtype == "DOCKER":
            notes.append("resourcemgr DOCKER: no Docker engine is used; nodes run as local processes")
        if self.apls is not None:
            notes.append("apls: there is no licence server; ignored")
        if self.policyuri:
            notes.append("policyuri: there is no policy service; ignored")
        if self.network:
            notes.append(f"network {self.network}: nodes share this host's network; ignored")
        if self.dns is not None:
            notes.append("dns: nodes use this host's name resolution; ignored")
        locator = self.apisrv.locator if isinstance(self.apisrv, ApiServer) else None
        if locator is not None and locator.service:
            notes.append(f"apisrv.locator.service {locator.service}: a container service name; ignored, the SLs "
                         f"reach the SN at apisrv's host and port (~: the SWOP's own SN)")
        nodes = self.slnodedefs
        ignored = sorted({key for n in nodes for key in _CONTAINER_ONLY if getattr(n, key) not in (None, {}, [])}
                         | {f"usrcontaineropts.{k}" for n in nodes for k in n.usrcontaineropts if k != "gpus"})
        if ignored:
            notes.append(f"container settings ignored (nodes are processes): {', '.join(ignored)}")
        if any(e.attribute.m_type == "VOLUME" for n in nodes for e in n.identity) or \
                any(n.privatedata and n.privatedata.m_type == "VOLUME" for n in nodes):
            notes.append("mType VOLUME: there are no Docker volumes; src is read as a path on this host")
        for node in nodes:
            for a_type in ("SPIFFE_SOCKETPATH", "CACERT"):
                if node.identity_file(a_type) is not None and (a_type == "SPIFFE_SOCKETPATH"
                                                              or node.identity_file("CAPATH") is None):
                    notes.append(f"node {node.node_id}: identity {a_type} {node.identity_file(a_type)} is not "
                                 f"read; its SL uses KEY/CERT/CAPATH files, else gen-cert's sl-{node.node_id}-"
                                 f"{{key,cert}}.pem beside the SWOP's certificate and the SWOP's CA folder")
        return notes


def _name_key(node: SlNodeDef) -> tuple[str, str]:
    """The key a node's name comes from, and the name (see SlNodeDef.node_id)."""
    field = "usrhostname" if node.usrhostname else "slhostname" if node.slhostname else "idx"
    return field, node.node_id


def _distinct(items) -> list[str]:
    return list(dict.fromkeys(items))


def load_profile(path: str | Path) -> SwopProfile:
    """Read and validate a SWOP profile; ConfigError (file:line: key.path: what; fix) when it is wrong."""
    return validate(SwopProfile, path)


def _each_item(items: list[str] | None, ok: Callable[[str], Any], why: Callable[[str], str]) -> list[str] | None:
    """`items` as they are, or one located error listing every item that is not `ok`, with `why`."""
    problems = [((i,), why(item), item) for i, item in enumerate(items or []) if not ok(item)]
    if problems:
        raise located_error(problems)
    return items
