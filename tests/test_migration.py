"""A user of the original product brings an example over: its taskdefs, SWOP profile, SWCI init script
and model.py as they are (tests/original/<family>/, written in the original's shapes), and only the
launch commands change. Each family runs end to end through a real SN, SWOP and SWCI on this host and
ends with every node holding the same final model.

What the user does, as the original's README has it: copy the example into workspace/, make the
certificates into workspace/<family>/cert, replace <CURRENT-PATH> with sed, put each node's data
where the profile's privatedata says (here: a small synthetic mnist.npz, made locally), then start
SN, SWOP and SWCI. What changes are the launch commands (README, "Migrating from HPE Swarm Learning"):
the SWOP's --usr-dir is the example's folder, the SWCI uses the admin certificate (the scripts end
with RESET CONTRACT of the default contract), and the mnist and reverse-proxy families go through the
original's own run-sn/run-swop/run-swci flags, Docker's included.

Every family of the original's example set has its files here, in its shapes and quirks; those not run
end to end are read and checked (fast), or refused with the reason the README's migration guide gives.
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
    of that name exists on this host (a SWOP's bind mounts make one while its nodes run)."""
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


# ------------------------------------------------------------------ every family's files, read and checked

FAMILIES = ["mnist", "mnist-pyt", "mnist-pyt-gpu", "cifar10", "fraud-detection", "nih", "huggingface",
            "huggingface-peft", "reverse-proxy", "spire", "breakhis", "cancer-pred", "cataract-detection",
            "nail-disease"]
# What a user fills in with sed before starting, as the original's READMEs say.
PLACEHOLDERS = {"<CURRENT-PATH>": "/home/user/swarm-learning", "<HOST-IP>": "127.0.0.1"}


def filled_in(path: Path, tmp_path: Path) -> Path:
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    copy = tmp_path / path.relative_to(ORIGINAL)
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text)
    return copy


def launch_flags(script: Path) -> list[str]:
    """The flags of a `./scripts/bin/run-sl \\` command in one of the original's shell scripts."""
    import shlex

    words = shlex.split(script.read_text().replace("\\\n", " "), comments=True)
    return words[words.index("./scripts/bin/run-sl") + 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_taskdefs_profiles_and_init_script_are_read_as_the_original_wrote_them(family, tmp_path):
    from swarmlearn.compat_cli import CompatError, translate
    from swarmlearn.swci.script import parse_script
    from swarmlearn.swci.taskdef import load_taskdef
    from swarmlearn.swop.profile import load_profile

    folder = ORIGINAL / family
    taskdefs = sorted(folder.glob("swci/taskdefs/*.yaml"))
    profiles = sorted(folder.glob("swop/*.yaml"))
    assert taskdefs and profiles and (folder / "swci" / "swci-init").is_file(), f"{family}: a file is missing"
    tasks = {load_taskdef(filled_in(t, tmp_path)).name: load_taskdef(filled_in(t, tmp_path)) for t in taskdefs}
    commands = parse_script(filled_in(folder / "swci" / "swci-init", tmp_path))
    # every task the script creates is one of the family's taskdefs
    created = {Path(c.args["file"]).stem for c in commands if c.name == "create_task"}
    assert created and created <= {t.stem for t in taskdefs}, created
    assert {c.name for c in commands} >= {"create_context", "wait_for_taskrunner", "reset_contract"} or \
        {c.name for c in commands} >= {"create_context_service", "wait_for_taskrunner", "reset_contract"}
    notes = [note for p in profiles for note in load_profile(filled_in(p, tmp_path)).notes()]
    assert any("resourcemgr DOCKER" in n for n in notes), notes
    assert all(t.name for t in tasks.values())
    for script in sorted(folder.glob("launch/run-sl-*")):
        flags = launch_flags(script)
        if family == "spire":  # SPIRE identities are refused at once, pointing at gen-cert's certificates
            with pytest.raises(CompatError, match="--socket-path is not supported.*swarm gen-cert"):
                translate("run-sl", flags)
            continue
        launch = translate("run-sl", flags)
        assert "--sn-ip" in launch.args and "--sl-fs-port" in launch.args
        assert any(i.startswith("--ml-image") and "not a container" in i for i in launch.ignored), launch.ignored


def test_gpu_profiles_name_their_device_flags_as_ignored_and_gpus_become_cuda_devices(tmp_path):
    from swarmlearn.swop.profile import load_profile

    profile = load_profile(filled_in(ORIGINAL / "mnist-pyt-gpu" / "swop" / "swop_profile.yaml", tmp_path))
    nodes = profile.slnodedefs
    assert [n.gpu_devices() for n in nodes] == [None, "0,1", None]  # all, device=0,1, none given
    (ignored,) = [n for n in profile.notes() if n.startswith("container settings ignored")]
    assert all(f"usrcontaineropts.{flag}" in ignored for flag in ("device", "group-add", "privileged")), ignored
    assert nodes[2].usrenvvars["HIP_VISIBLE_DEVICES"] == "0"  # passed to the ML as written


def test_spire_profiles_say_the_agent_socket_is_not_read_and_which_certificates_are(tmp_path):
    from swarmlearn.swop.profile import load_profile

    notes = load_profile(filled_in(ORIGINAL / "spire" / "swop" / "swop1_profile.yaml", tmp_path)).notes()
    spiffe = [n for n in notes if "SPIFFE_SOCKETPATH" in n]
    assert len(spiffe) == 2 and all("sl-ml-" in n and "is not read" in n for n in spiffe), notes


# ------------------------------------------------------------------ three more families, end to end

def run_through_swop_and_swci(procs: Procs, tmp_path: Path, certs: CertLayout,
                              root: Path) -> tuple[subprocess.CompletedProcess, str]:
    """SN, SWOP (--usr-dir the example's folder) and SWCI (admin certificate) as in the mnist-pyt test;
    returns the SWCI's run and the SWOP's output."""
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    procs.workspaces.append(root / "runs")
    (profile,) = [p.name for p in root.glob("swop/*.yaml")]
    swop = procs.swarm("swop", "--sn-ip", host, "--sn-api-port", port, "--usr-dir", str(root),
                       "--profile-file-name", profile, *identity_args(certs, "swop"), *FAST_SL)
    swop.wait_for_line("SWOP swop-1 ready")
    done = subprocess.run([*SWARM, "swci", "--usr-dir", str(root / "swci"), "--init-script-name", "swci-init",
                           "--sn-ip", host, "--sn-api-port", port, *identity_args(certs, "admin")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr + swop.output
    return done, swop.output


@pytest.mark.slow
def test_reverse_proxy_names_the_sn_by_its_service_for_swop_and_swci(procs: Procs, tmp_path):
    """The reverse-proxy example reaches the SN as `api.sn-1.swarm` (its DNS server and nginx did the
    rest): run-swop and run-swci take --sn-api-service, the script says `wait for service` and `create
    context ... with service`, and the name is in the example's hosts file instead of a DNS server."""
    root, certs = workspace(tmp_path, "reverse-proxy", 2)
    shutil.copytree(ORIGINAL / "mnist-pyt" / "model", root / "model")
    for i in (1, 2):
        write_mnist_npz(root / f"user{i}" / "app-data", seed=20 + i)
    (root / "hosts").write_text("# what the example's bind9 server was told (add-dns)\n127.0.0.1 api.sn-1.swarm\n")
    home = {"SWARMLEARN_HOME": str(tmp_path / "home")}
    sn = start_sn(procs, certs, tmp_path / "sn")
    port = sn.address.rsplit(":", 1)[1]
    runs = root / "runs"
    procs.workspaces.append(runs)
    proxy = ["--dns=172.18.0.2", "--network=swarm-net", "--sn-api-service=api.sn-1.swarm", f"--sn-api-port={port}"]
    swop = procs.start([*COMPAT, "run-swop", *proxy, "--name=swop-1", f"--usr-dir={root}",
                        "--profile-file-name=swop1_profile.yaml", *original_identity(certs, "swop"), *FAST_SL],
                       env=home)
    swop.wait_for_line("SWOP swop-1 ready", timeout=60)
    done = subprocess.run([*COMPAT, "run-swci", *proxy, "--name=swci-1", f"--usr-dir={root / 'swci'}",
                           "--init-script-name=swci-init", *original_identity(certs, "admin")],
                          capture_output=True, text=True, timeout=240, env={**os.environ, **home})

    assert done.returncode == 0, done.stdout + done.stderr + swop.output
    assert "SN api.sn-1.swarm is 127.0.0.1 (hosts file)" in swop.output
    assert "apisrv.locator.service api.sn-1.swarm" in swop.output  # named as ignored: the SWOP's SN is used
    assert "swarm_mnist_task COMPLETE" in done.stdout
    import torch

    finals = [torch.load(root / f"user{i}" / "app-data" / "scratch" / "mnist_pyt" / "saved_model.pt", weights_only=True)
              for i in (1, 2)]
    assert_same_tensors([{k: v.numpy() for k, v in m.items()} for m in finals])


def write_transactions(folder: Path, seed: int, rows: int = 64) -> None:
    """train.csv and test.csv in the fraud example's layout (features, then Class): fraud is a large
    first feature."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", rows), ("test.csv", rows // 4)):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        y = (x[:, 0] > 0.5).astype(np.float32)
        np.savetxt(folder / name, np.column_stack([x, y]), delimiter=",", fmt="%.5f",
                   header=",".join([*(f"V{i}" for i in range(1, 9)), "Class"]), comments="")


@pytest.mark.slow
def test_fraud_detection_keras_trains_on_tabular_data_with_casted_string_arguments(procs: Procs, tmp_path):
    root, certs = workspace(tmp_path, "fraud-detection", 2)
    for i in (1, 2):
        write_transactions(root / f"data-and-scratch{i}" / "app-data", seed=30 + i)
    done, swop_output = run_through_swop_and_swci(procs, tmp_path, certs, root)

    assert "swarm_fd_task COMPLETE" in done.stdout
    logs = node_logs(root / "runs", "swarm_fd_task", 2)
    assert "Saved the trained model - " in logs
    assert_same_tensors([keras_weights(root / f"data-and-scratch{i}" / "scratch" / "fraud-detection.keras")
                         for i in (1, 2)])


@pytest.mark.slow
def test_huggingface_trainer_fine_tunes_a_tiny_bert_and_saves_the_same_model_everywhere(procs: Procs, tmp_path):
    root, certs = workspace(tmp_path, "huggingface", 2)
    for i in (1, 2):
        rng = np.random.default_rng(40 + i)
        tokens = rng.integers(1, 64, (32, 12))
        (root / f"user{i}").mkdir()
        np.savez(root / f"user{i}" / "tokens.npz", input_ids=tokens, labels=(tokens < 32).sum(axis=1) > 6)
    done, swop_output = run_through_swop_and_swci(procs, tmp_path, certs, root)

    assert "run_hf_task COMPLETE" in done.stdout
    assert "Saved the trained model - " in node_logs(root / "runs", "run_hf_task", 2)
    from safetensors.numpy import load_file

    assert_same_tensors([load_file(root / f"user{i}" / "scratch" / "final" / "model.safetensors") for i in (1, 2)])


def test_mount_points_a_swop_made_are_removed_once_no_namespace_mounts_on_them(tmp_path):
    """A SWOP makes the container paths missing on this host (/tmp/test) as mount points and removes
    them after its nodes; never while a mount namespace (another SWOP's node) still mounts on one."""
    from swarmlearn.swop.paths import MountTable, make_mount_points, mount_point_chain, remove_mount_points

    source = tmp_path / "data"
    source.mkdir()
    target = tmp_path / "container" / "tmp" / "test"
    table = MountTable(mounts=((str(target), str(source)),), workdir=str(target))
    made = make_mount_points(table)
    assert made == [tmp_path / "container", tmp_path / "container" / "tmp", target]
    assert set(made) <= mount_point_chain(table)
    # another node's namespace holds a bind mount on the target until told to go
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                               f"mount --bind {source} {target} && echo mounted && read line"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mounted"
        assert remove_mount_points(made) == [] and target.is_dir()
    finally:
        holder.communicate("go\n", timeout=10)
    assert remove_mount_points(made) == list(reversed(made))
    assert not (tmp_path / "container").exists() and source.is_dir()


def test_the_oldest_mnist_pyt_scripts_short_forms_wait_for_and_create_context_without_ip():
    from swarmlearn.errors import ConfigError
    from swarmlearn.swci.script import parse_line, parse_script

    commands = parse_script(ORIGINAL / "mnist-pyt-gpu" / "swci" / "swci-init")
    assert [(c.name, c.args) for c in commands[1:3]] == [
        ("wait_for_ip", {"ip": "172.1.1.1"}), ("create_context", {"name": "test", "ip": "172.1.1.1"})]
    with pytest.raises(ConfigError, match="names no host"):
        parse_line("wait for taskrunner", 7, "swci-init")
