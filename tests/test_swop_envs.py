"""A MAKE_USER_CONTAINER task builds an environment of its own, named after its image, with uv: the
task's pins installed there (the original's protobuf==3.15.6 shadows ours for its ML only), what the
SWOP already has (torch, our callback) found without a copy, and the SWOP's own environment untouched.
A pin this Python cannot install is reported with the closest one that can, and nothing half-built
stays. These build real environments from PyPI wheels (kept in uv's cache after the first time)."""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from swarmlearn.swop import envs
from swarmlearn.swop.policy import TaskPolicy
from swarmlearn.swop.profile import load_profile

FOREIGN = "spiffe://other/swci/swci-2"
OURS = "spiffe://test/swci/swci-1"


def build(tmp_path: Path, image: str, *pip_args: str) -> tuple[envs.TaskEnvironment, str]:
    env = envs.environment_for(tmp_path / "runs", image)
    log = tmp_path / "runs" / "build.log"
    return env, envs.build(env, list(pip_args), envs.run_logged(log), log)


def in_env(env: envs.TaskEnvironment, code: str) -> str:
    done = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_originals_pins_go_into_the_tasks_environment_and_shadow_the_swops_there_only(tmp_path):
    ours = version("protobuf")
    env, detail = build(tmp_path, "user-env-tf2.7.0-swop", "six==1.16.0", "protobuf==3.15.6", "torch", "pip")

    assert env.ready and env.root == tmp_path / "runs" / "envs" / "user-env-tf2.7.0-swop"
    assert "installed six==1.16.0 protobuf==3.15.6" in detail
    assert "from the SWOP's environment: torch" in detail and "pip " in detail  # found, not downloaded
    # (torch is found, not imported: that alone takes seconds)
    seen = in_env(env, "import google.protobuf, six, importlib.util as u, sys; print(google.protobuf.__version__,"
                       " six.__version__, u.find_spec('torch').origin.startswith(sys.prefix),"
                       " u.find_spec('swarmlearning') is not None, u.find_spec('swarmlearn.callback') is not None)")
    assert seen.split() == ["3.15.6", "1.16.0", "False", "True", "True"]
    assert version("protobuf") == ours  # the SWOP's own environment is as it was
    size = sum(f.stat().st_size for f in env.root.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 10 << 20, f"{size} bytes: torch or our dependencies were copied into the environment"


def test_a_pin_that_cannot_install_on_this_python_names_the_closest_that_can_and_leaves_nothing(tmp_path):
    with pytest.raises(envs.BuildFailed) as failed:
        build(tmp_path, "user-env-old-numpy", "six==1.16.0", "numpy==1.21.6")

    assert "numpy==1.21.6 cannot be installed on Python 3.11 here" in str(failed.value)
    assert "the closest version that can: numpy==1.23.2" in str(failed.value)
    assert not list((tmp_path / "runs" / "envs").iterdir())  # no half-built environment to reuse


def test_a_package_without_wheels_is_refused_with_the_way_out(tmp_path):
    env, _ = build(tmp_path, "user-env", "six==1.16.0")
    with pytest.raises(envs.BuildFailed, match="(?s)sklearn.*no usable wheels.*buildfromsource: true"):
        build(tmp_path, "user-env", "sklearn")
    # the environment built before stays whole and usable; the failed rebuild left no trace
    assert env.ready and in_env(env, "import six; print(six.__version__)") == "1.16.0"
    assert [p.name for p in (tmp_path / "runs" / "envs").iterdir()] == ["user-env"]


def test_image_names_become_folder_names_that_never_collide(tmp_path):
    plain = envs.environment_for(tmp_path, "user-env-tf2.7.0-swop")
    odd = envs.environment_for(tmp_path, "hpe/user env:1.0")
    other = envs.environment_for(tmp_path, "hpe/user_env:1.0")
    assert plain.root.name == "user-env-tf2.7.0-swop"
    assert odd.root.parent == tmp_path / "envs" and "/" not in odd.root.name and odd.root != other.root


def test_a_build_obeys_the_swops_task_authors_like_a_run(tmp_path):
    profile = tmp_path / "swop_profile.yaml"
    profile.write_text("groupname: local\nnodes:\n  - slnodedef:\n      idx: 0\n")
    from swarmlearn.pki import SwarmId

    policy = TaskPolicy.for_swop(load_profile(profile), SwarmId("test", "swop", "swop-1"), tmp_path, tmp_path / "r")
    body = {"BuildContext": "sl-cli-lib", "BuildType": "INLINE", "BuildSteps": ["RUN pip3 install six==1.16.0"]}
    assert policy.refusal("MAKE_USER_CONTAINER", body, OURS, OURS) is None
    why = policy.refusal("MAKE_USER_CONTAINER", body, FOREIGN, OURS)
    assert why.startswith(f"it was created by {FOREIGN}, who is not among this SWOP's task authors")
