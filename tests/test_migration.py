"""A user of the original product brings an example over: its taskdefs, SWOP profile, SWCI init script
and model.py as they are (tests/original/<family>/, written in the original's shapes), and only the
launch commands change. Each family runs end to end through a real SN, SWOP and SWCI on this host and
ends with every node holding the same final model.

What the user does, as the original's README has it: copy the example into workspace/, make the
certificates into workspace/<family>/cert, replace <CURRENT-PATH> with sed, put each node's data
where the profile's privatedata says (here: a small synthetic mnist.npz, made locally), then start
SN, SWOP and SWCI. What changes are the launch commands (README, "Migrating from HPE Swarm Learning"):
the SWOP's --usr-dir is the example's folder, the SWCI uses the admin certificate (the scripts end
with RESET CONTRACT of the default contract), and the mnist family goes through the original's own
run-sn/run-swop/run-swci flags, Docker's included.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SWARM, Procs, identity_args, start_sn
from swarmlearn.pki import CertLayout, generate_host_certs

ORIGINAL = Path(__file__).parent / "original"
COMPAT = [sys.executable, "-m", "swarmlearn.compat_cli"]
# Tests need no quorum wait at each SL's check-in: a flag of ours, passed through by run-swop as well.
FAST_SL = ["--sl-arg=--checkin-wait", "--sl-arg=1"]


def workspace(tmp_path: Path, family: str, nodes: int) -> tuple[Path, CertLayout]:
    """The family's example as its user sets it up (see the module docstring); returns
    workspace/<family> and its certificates."""
    root = tmp_path / "workspace" / family
    shutil.copytree(ORIGINAL / family, root)
    certs = CertLayout(root / "cert", 1)
    generate_host_certs(certs.root, 1, org=family.replace("-", ""), nodes=[f"user{i}" for i in range(1, nodes + 1)])
    for yaml in [*root.glob("swop/*.yaml"), *root.glob("swci/taskdefs/*.yaml")]:
        yaml.write_text(yaml.read_text().replace("<CURRENT-PATH>", str(tmp_path)))
    return root, certs


def write_mnist_npz(folder: Path, seed: int, train: int = 48, test: int = 16) -> None:
    """An mnist.npz in the original's layout (uint8 28x28 images, int labels) that a tiny net learns
    from: each digit is a bright band at its own height over noise."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            x[i, 2 * label + 4:2 * label + 6, :] = 255
        return x, labels.astype(np.uint8)

    (x_train, y_train), (x_test, y_test) = images(train), images(test)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def assert_same_tensors(models: list[dict[str, np.ndarray]]) -> None:
    assert models[0] and all(set(m) == set(models[0]) for m in models), [sorted(m) for m in models]
    for name, first in models[0].items():
        for other in models[1:]:
            assert other[name].shape == first.shape and np.array_equal(other[name], first), name


def node_logs(runs: Path, task: str, nodes: int) -> str:
    return "\n".join((runs / task / f"user{i}" / "ml.log").read_text() for i in range(1, nodes + 1))


@pytest.mark.slow
def test_mnist_pyt_runs_as_the_original_wrote_it_on_three_nodes(procs: Procs, tmp_path):
    root, certs = workspace(tmp_path, "mnist-pyt", 3)
    for i in (1, 2, 3):
        write_mnist_npz(root / f"user{i}" / "data-and-scratch" / "app-data", seed=i)
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    runs = root / "runs"
    procs.workspaces.append(runs)
    # The SWOP's --usr-dir is the example's folder, not its swop/ (where the profile is found): the task
    # shares workspace/mnist-pyt/model, and a SWOP runs only tasks whose paths lie in its --usr-dir.
    swop = procs.swarm("swop", "--sn-ip", host, "--sn-api-port", port, "--usr-dir", str(root),
                       "--profile-file-name", "swop_profile.yaml", *identity_args(certs, "swop"), *FAST_SL)
    swop.wait_for_line("SWOP swop-1 ready")

    # sn1 is named by the SN's own node registry: the SWCI is told where one SN is. It runs with the
    # admin certificate: the script ends with RESET CONTRACT of the default contract, an admin's right.
    done = subprocess.run([*SWARM, "swci", "--usr-dir", str(root / "swci"), "--init-script-name", "swci-init",
                           "--sn-ip", host, "--sn-api-port", port, *identity_args(certs, "admin")],
                          capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stdout + done.stderr + swop.output
    assert f"SN at {host}:{port} is up (sn1)" in done.stdout
    assert "swarm_mnist_task COMPLETE" in done.stdout and "merged" in done.stdout
    # the build made the image's environment (nothing to install: the SWOP has torch, protobuf...), the
    # run task's ML ran in it, its SLs listened where sl1..sl3 resolve, and its SLs found the SN as sn1
    assert f"its ML runs in environment user-env-pyt1.5-swop ({runs / 'envs' / 'user-env-pyt1.5-swop'}" in swop.output
    assert "slhostip sl1 is 127.0.0.1" in swop.output and "SN sn1 is 127.0.0.1" in swop.output
    logs = node_logs(runs, "swarm_mnist_task", 3)
    assert "Saved the trained model - " in logs  # the example's swarmCallback.logger lines
    assert "SL_LOG_LEVEL ignored: SLs log at INFO" in logs  # the profile's envvars, named where they land
    import torch

    finals = [torch.load(root / f"user{i}" / "data-and-scratch" / "scratch" / "mnist_pyt" / "saved_model.pt",
                         weights_only=True) for i in (1, 2, 3)]
    assert_same_tensors([{k: v.numpy() for k, v in m.items()} for m in finals])


def keras_weights(path: Path) -> dict[str, np.ndarray]:
    """The layers' arrays in a .keras file's weights (a zip holding model.weights.h5), by their path in it;
    the optimizer's own state (Adam's moments) is each node's, never merged."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    out: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:
        h5.visititems(lambda name, item: out.__setitem__(name, item[()])
                      if isinstance(item, h5py.Dataset) and name.startswith("layers/") else None)
    return out


def original_identity(certs: CertLayout, component: str) -> list[str]:
    """The run-* scripts' identity flags, written as the original's scripts write them."""
    return [f"--key={certs.key(component)}", f"--cert={certs.cert(component)}", f"--capath={certs.capath}"]


@pytest.mark.slow
def test_mnist_keras_with_its_protobuf_pin_runs_from_the_original_launch_scripts(procs: Procs, tmp_path):
    root, certs = workspace(tmp_path, "mnist", 2)
    for i in (1, 2):
        write_mnist_npz(root / f"user{i}" / "app-data", seed=10 + i)
    (root / "hosts").write_text("# the original's container names on this host\n127.0.0.1 sn1\n")
    home = {"SWARMLEARN_HOME": str(tmp_path / "home")}
    docker = ["--rm", "--network=host-1-net", "--apls-ip=127.0.0.1"]
    sn = procs.start([*COMPAT, "run-sn", *docker, "--name=sn1", "--host-ip=127.0.0.1", "--sentinel", "--sn-api-port=0",
                      *original_identity(certs, "sn")], env=home)
    line = sn.wait_for_line("SN ready on ")
    port = line.split("SN ready on ")[1].split()[0].rsplit(":", 1)[1]
    runs = root / "runs"
    procs.workspaces.append(runs)
    swop = procs.start([*COMPAT, "run-swop", *docker, "--name=swop1", f"--usr-dir={root}",
                        "--profile-file-name=swop_profile.yaml", "--sn-ip=127.0.0.1", f"--sn-api-port={port}",
                        *original_identity(certs, "swop"), "-e", "KERAS_BACKEND=torch", *FAST_SL], env=home)
    swop.wait_for_line("SWOP swop-1 ready", timeout=60)

    done = subprocess.run([*COMPAT, "run-swci", *docker, "--name=swci1", f"--usr-dir={root / 'swci'}",
                           "--init-script-name=swci-init", f"--sn-api-port={port}", *original_identity(certs, "admin")],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, **home})

    assert done.returncode == 0, done.stdout + done.stderr + swop.output
    assert "run-swci: accepted and ignored: --rm" in done.stderr
    assert f"SN at 127.0.0.1:{port} is up (sn1)" in done.stdout
    assert "swarm_mnist_task COMPLETE" in done.stdout
    # the pin went into the task's environment, which the ML ran in; the SWOP's own kept its protobuf
    env = runs / "envs" / "user-env-tf2.7.0-swop"
    assert "installed protobuf==3.15.6" in swop.output
    assert f"its ML runs in environment user-env-tf2.7.0-swop ({env}" in swop.output
    seen = subprocess.run([str(env / "bin" / "python"), "-c", "import google.protobuf as p; print(p.__version__)"],
                          capture_output=True, text=True, timeout=60)
    assert seen.stdout.strip() == "3.15.6", seen.stderr
    import google.protobuf

    assert google.protobuf.__version__ != "3.15.6"
    logs = node_logs(runs, "swarm_mnist_task", 2)
    assert "Saved the trained model - " in logs
    assert_same_tensors([keras_weights(root / f"user{i}" / "app-data" / "scratch" / "mnist_tf.keras") for i in (1, 2)])


def test_the_originals_cd_to_its_container_usr_dir_lands_in_the_swci_usr_dir(certs, tmp_path):
    """`cd /platform/swarm/usr` (every example's init script) is the --usr-dir, whether or not a folder
    of that name exists on this host (a SWOP's bind mounts leave an empty one)."""
    from swarmlearn.pki import Identity
    from swarmlearn.swci.session import SwciSession

    usr = tmp_path / "swci"
    (usr / "taskdefs").mkdir(parents=True)
    said: list[str] = []
    session = SwciSession(Identity.load(certs.key("swci"), certs.cert("swci"), certs.capath), usr, out=said.append)
    session.cmd_cd("/platform/swarm/usr/taskdefs")
    assert session.cwd == (usr / "taskdefs").resolve()
    session.cmd_cd("/platform/swarm/usr")
    assert session.cwd == usr.resolve() and not said


def test_the_reverse_proxy_examples_sn_service_names_the_sn_for_swop_and_swci():
    from swarmlearn.compat_cli import translate

    for script in ("run-swop", "run-swci"):
        assert translate(script, ["--sn-api-service=api.sn-1.swarm:30304"]).args == ["--sn-ip", "api.sn-1.swarm:30304"]
