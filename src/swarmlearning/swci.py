"""The original's Python SWCI API (`from swarmlearning.swci import Swci`), driving our SWCI session.

The original's class is an HTTP client of a SWCI container in WEB mode. Here the SWCI runs inside
this process: each method runs the same command the original sends, through our command language
and session, against the SNs of the context, over mutual TLS with the certificate given as
`clientCert`/`clientPKey`/`clientCABundle` (a `swci` certificate from `swarm gen-cert`). So:

- `swciIp` and `port` name no server here; they are accepted and said so once in the log;
- a method returns the command's output lines, or [] when it failed, with `getErrors()` saying why,
  as the original does; a command that succeeds silently returns ["OK : <command>"];
- `uploadTaskDefintion(path)` has nothing to copy: the file is read where it is, and
  `createTaskFrom`/`registerTask` find it by its file name afterwards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

DEFAULT_TASKRUNNER = "defaulttaskbb.taskdb.sml.hpe"
DEFAULT_CONTRACT = "defaultbb.cqdb.sml.hpe"
SN_API_PORT = 30304
# Commands whose output changes rarely: kept between calls while enableCaching, as the original does.
_CACHED = ("get context info ", "get contract info ", "get task body ", "get task info ", "get taskrunner info ",
           "list contexts", "list contracts", "list tasks", "list taskrunners")
_LEVELS = {"CRITICAL": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING, "INFO": logging.INFO,
           "DEBUG": logging.DEBUG}


class Swci:
    def __init__(self, swciIp=None, port=30306, clientCert=None, clientPKey=None, clientCABundle=None, logger=None,
                 logLv=logging.WARNING, enableCaching=True, usrDir="."):
        from swarmlearn.pki import Identity
        from swarmlearn.swci.session import SwciSession

        self._logger = logger if isinstance(logger, logging.Logger) else logging.getLogger("swci-web")
        if not isinstance(logger, logging.Logger):
            self._logger.setLevel(logLv)
        if clientCert is None or clientPKey is None or clientCABundle is None:
            raise RuntimeError("give clientCert, clientPKey and clientCABundle: a swci certificate, its key and the CA "
                               "folder (or bundle) from `swarm gen-cert`; this SWCI runs in your process and talks to "
                               "the SNs over mutual TLS")
        if swciIp is not None:
            self._logger.info("swciIp %s and port %s are not used: the SWCI runs in this process", swciIp, port)
        self._session = SwciSession(Identity.load(Path(clientPKey), Path(clientCert), Path(clientCABundle)),
                                    Path(usrDir), out=self._logger.info, default_sn_port=SN_API_PORT)
        self._caching = enableCaching
        self._cache: dict[str, list[str]] = {}
        self._error: list[str] | None = None
        self._uploaded: dict[str, Path] = {}

    # ------------------------------------------------------------------------------ plumbing

    def setLogLevel(self, logLv):
        self._logger.setLevel(_LEVELS.get(str(logLv), logLv if isinstance(logLv, int) else logging.WARNING))

    def getErrors(self):
        return "\n".join(self._error) if self._error else None

    def clearCache(self):
        self._cache = {}

    def close(self):
        self._session.close()

    def _exec(self, text: str, cache: bool = False) -> list[str]:
        """Runs one SWCI command; its output lines, or [] with getErrors() set."""
        from swarmlearn.errors import SwarmError
        from swarmlearn.swci.script import parse_line

        cacheable = cache and self._caching and text.lower().startswith(_CACHED)
        if cacheable and text in self._cache:
            self._error = None
            return list(self._cache[text])
        lines: list[str] = []
        self._session.out = lines.append
        try:
            command = parse_line(text, 1, "swci")
            getattr(self._session, f"cmd_{command.name}")(**command.args)
        except SwarmError as exc:
            self._error = [f"ERROR : {exc}"]
            self._logger.error("ERROR : %s", exc)
            return []
        finally:
            self._session.out = self._logger.info
        result = [part.strip() for line in lines for part in line.splitlines()] or [f"OK : {text}"]
        if cacheable:
            self._cache[text] = result
        self._error = None
        return list(result)

    def _forget(self, *keys: str) -> None:
        for key in keys:
            self._cache.pop(key, None)

    # ------------------------------------------------------------------------------ the original's methods

    def ls(self, optStr=""):
        return self._exec("ls()" if not optStr else f"ls {optStr}")

    def pwd(self):
        return self._exec("pwd()")

    def sleep(self, sleepTime):
        return self._exec(f"sleep {sleepTime}")

    def cd(self, dirPath):
        return self._exec(f"cd {dirPath}")

    def getTaskRunnerStatus(self, trName):
        return self._exec(f"get taskrunner status {trName}")

    getTaskrunnerStatus = getTaskRunnerStatus  # as the original's docs spell it

    def getTaskRunnerPeerStatus(self, trName, idx):
        return self._exec(f"get taskrunner peer status {trName} {idx}")

    def getTrainingContractStatus(self, ctName):
        return self._exec(f"get contract status {ctName}")

    def listNodes(self):
        return self._exec("list nodes")

    def getContextInfo(self, ctxName=""):
        return self._exec(f"get context info {ctxName}".strip(), cache=True)

    def getTrainingContractInfo(self, ctName):
        return self._exec(f"get contract info {ctName}", cache=True)

    def getTaskRunnerInfo(self, trName):
        return self._exec(f"get taskrunner info {trName}", cache=True)

    def getTaskInfo(self, taskName):
        return self._exec(f"get task info {taskName}", cache=True)

    def getTaskBody(self, taskName):
        return self._exec(f"get task body {taskName}", cache=True)

    def listTrainingContracts(self):
        return self._exec("list contracts", cache=True)

    def listContexts(self):
        return self._exec("list contexts", cache=True)

    def listTaskRunners(self):
        return self._exec("list taskrunners", cache=True)

    def listTasks(self):
        return self._exec("list tasks", cache=True)

    def switchContext(self, ctxName):
        return self._exec(f"switch context {ctxName}")

    def createContext(self, ctxName, ip=None, port=SN_API_PORT, service=None):
        if ip is None and service is None:
            raise RuntimeError("For creating context either IP or Service name is mandatory!")
        text = f"create context {ctxName} with ip {ip} {int(port)}" if ip is not None else \
            f"create context {ctxName} with service {service}"
        result = self._exec(text)
        if result:
            self._forget("list contexts")
        return result

    def createTrainingContract(self, ctName):
        result = self._exec(f"create contract {ctName}")
        if result:
            self._forget("list contracts")
        return result

    def resetTaskRunner(self, trName=DEFAULT_TASKRUNNER):
        return self._exec(f"reset taskrunner {trName}")

    def resetTrainingContract(self, ctName=DEFAULT_CONTRACT):
        return self._exec(f"reset contract {ctName}")

    def uploadTaskDefintion(self, taskFilePath):
        path = Path(taskFilePath).resolve()
        if not path.is_file():
            raise RuntimeError(f"Task definition file not found : {path}")
        self._uploaded[path.name] = path
        return f"task definition {path} is read where it is (the SWCI runs in this process)"

    def createTaskFrom(self, yamlFileName):
        path = self._uploaded.get(str(yamlFileName), yamlFileName)
        result = self._exec(f"create task from {path}")
        if result:
            self._forget("list tasks")
        return result

    def deleteTask(self, taskName):
        result = self._exec(f"delete task {taskName}")
        if result:
            self._forget("list tasks", f"get task body {taskName}", f"get task info {taskName}")
        return result

    def finalizeTask(self, taskName):
        return self._exec(f"finalize task {taskName}")

    def registerTask(self, yamlFileName, finalize=True):
        from swarmlearn.errors import SwarmError
        from swarmlearn.swci.taskdef import load_taskdef

        result = self.createTaskFrom(yamlFileName)
        if not result:
            return result
        path = Path(self._uploaded.get(str(yamlFileName), yamlFileName))
        try:
            name = load_taskdef(path if path.is_absolute() else self._session.cwd / path).name
        except SwarmError as exc:
            self._error = [f"ERROR : {exc}"]
            return []
        if not finalize:
            return result
        return [f"Registered Task : {name}"] if self.finalizeTask(name) else []

    def assignTask(self, taskName, trName, peers):
        return self._exec(f"assign task {taskName} to {trName} with {int(peers)} peers")

    def isTaskDone(self, trName):
        """True when the runner's task ended (COMPLETE, FAILED or RESET) or it has none."""
        from swarmlearn.errors import SwarmError

        try:
            assignment = self._session._runner(trName)["assignment"]
        except SwarmError as exc:
            self._error = [f"ERROR : {exc}"]
            raise RuntimeError(self.getErrors()) from None
        return assignment is None or assignment["status"] != "RUNNING"

    def executeTask(self, taskName, tr=DEFAULT_TASKRUNNER, peers=1, pollWaitInSec=120, resetTROnSuccess=True):
        """Assigns, waits (polling every pollWaitInSec), prints the runner's and each SWOP's status, and
        resets the runner when the task completed."""
        result = self.assignTask(taskName, tr, peers)
        if not result:
            self._logger.error("Could not assign task %s on %s", taskName, tr)
            return result
        print(f"Assigned task {taskName} on {tr} for execution")
        while not self.isTaskDone(tr):
            print(f"Waiting for task {taskName} to complete")
            time.sleep(pollWaitInSec)
        report = self.getTaskRunnerStatus(tr)
        success = any(f"{taskName} COMPLETE" in line for line in report)
        for index in range(len(self._session._runner(tr).get("swops", {}))):
            report += ["=" * 40, *self.getTaskRunnerPeerStatus(tr, index)]
        for line in report:
            print(line)
        if resetTROnSuccess and success:
            self.resetTaskRunner(tr)

    def perfdata(self, trainingBlackboardName):
        return self._exec(f"perfdata {trainingBlackboardName}")

    def plotTopology(self, SNColour="#ADD8E6", SWOPColor="#33FF33", SLColor="#FFCCCB", attrs=()):
        """Draws the swarm's registered nodes (networkx and matplotlib), each node joined to the SN it
        registered with; `attrs` adds 'Port' or 'UUID' (the node id) to the labels."""
        import networkx as nx

        nodes = self._session._sn().query("nodes")["nodes"]
        colours = {"sn": SNColour, "swop": SWOPColor, "sl": SLColor}
        graph = nx.Graph()
        sns = [name for name, n in nodes.items() if n["role"] == "sn"]
        for name, n in sorted(nodes.items()):
            host, _, port = (n.get("address") or "").rpartition(":")
            label = f"{n['role'].upper()}\n{host or '-'}" + "".join(
                f"\n{port if a == 'Port' else name}" for a in attrs if a in ("Port", "UUID", "ContainerName"))
            graph.add_node(name, label=label, color=colours.get(n["role"], "#1f78b4"))
            if n["role"] != "sn" and sns:
                graph.add_edge(name, sns[0])
        pos = nx.spring_layout(graph, k=0.8, seed=1)
        nx.draw_networkx_nodes(graph, pos, node_color=[graph.nodes[v]["color"] for v in graph])
        nx.draw_networkx_edges(graph, pos, edge_color="black")
        nx.draw_networkx_labels(graph, pos, labels={v: graph.nodes[v]["label"] for v in graph})
        return graph


swci = Swci  # the original's docs name the class both ways
