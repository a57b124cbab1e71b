"""The original's Python SWCI API, as its users' notebooks call it, driving a real SN and SWOP."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import start_sn
from swarmlearning.swci import Swci, swci
from test_swop_swci import make_project, start_swop

PULL_TASK = """\
Name: pull_env
TaskType: PULL_IMAGE
Author: demo
Prereq: ROOTTASK
Outcome: user-env
Body:
    Tag: latest
"""


def client(certs, folder: Path) -> Swci:
    return Swci("swci1", port=30306, clientCert=str(certs.cert("swci")), clientPKey=str(certs.key("swci")),
                clientCABundle=str(certs.capath), logLv=logging.INFO, usrDir=str(folder))


def test_without_certificates_it_says_what_to_give():
    with pytest.raises(RuntimeError, match="give clientCert, clientPKey and clientCABundle: a swci certificate"):
        swci("swci1")


def test_a_notebook_creates_a_context_registers_and_executes_a_task(procs, certs, tmp_path, capsys):
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    start_swop(procs, certs, sn, make_project(tmp_path, certs))
    (tmp_path / "defs").mkdir()
    (tmp_path / "defs" / "pull_env.yaml").write_text(PULL_TASK)
    s = client(certs, tmp_path)
    try:
        assert s.createContext("testContext", host, port=int(port)) == [f"context testContext: SN at {host}:{port}"]
        assert s.switchContext("nope") == [] and "no context nope" in s.getErrors()
        assert s.switchContext("testContext") == ["OK : switch context testContext"] and s.getErrors() is None
        assert s.listContexts() == [f"* testContext  {host}:{port}"]
        assert s.createTrainingContract("testContract")
        assert any(line.startswith("testContract") for line in s.listTrainingContracts())
        assert "task definition" in s.uploadTaskDefintion(tmp_path / "defs" / "pull_env.yaml")
        assert s.registerTask("pull_env.yaml") == ["Registered Task : pull_env"]
        assert any(line.startswith("pull_env  PULL_IMAGE  finalized") for line in s.listTasks())
        assert s.isTaskDone("defaulttaskbb.taskdb.sml.hpe")  # nothing assigned yet
        s.executeTask("pull_env", peers=3, pollWaitInSec=0.2)
        printed = capsys.readouterr().out
        assert "Assigned task pull_env on defaulttaskbb.taskdb.sml.hpe for execution" in printed
        assert "swop-1 of defaulttaskbb.taskdb.sml.hpe: task pull_env COMPLETE, 3 peers started by it" in printed
        assert s.getTaskRunnerStatus("defaulttaskbb.taskdb.sml.hpe") == ["defaulttaskbb.taskdb.sml.hpe: idle"]
        assert s.resetTrainingContract("testContract") == ["OK : reset contract testContract"]
        # The original's default contract is ours too; resetting it is for an admin here.
        assert s.resetTrainingContract() == [] and "only an admin may reset the default contract" in s.getErrors()
        assert s.ls() and s.pwd() == [str(tmp_path.resolve())]
    finally:
        s.close()
