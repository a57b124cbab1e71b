"""Container paths of a RUN_SWARM task mapped onto this host, per node: what the original's Docker mounts
did. A node's mount table, from its profile and the task's Body:

    /platform/swarm/usr   -> the SWOP's --usr-dir
    SharedContent Tgt     -> its Src
    PrivateContent        -> the node's privatedata src (when the profile gives one)
    WorkingDir            -> a scratch folder of the node in the workspace, when WorkingDir is not a
                             folder this SWOP allows on its host (the container's own folder, /tmp/test)

The ML process then sees those paths one of two ways (the profile's `pathmapping`; `auto` picks the
first that works):
- `mounts`: the program starts in a private mount namespace (`unshare --mount`, which needs root or a
  user namespace) where each source is bind-mounted on its target, shortest target first; the program
  sees exactly the original's paths, even ones written into its code. A target missing on this host is
  created there as an empty folder (a mount needs one) by the SWOP, which removes the folders it made
  once no node of its own uses them and no process's mount namespace mounts on them (removing a mount
  point unmounts it in every namespace, another SWOP's nodes included).
- `rewrite`: no namespace; the task's paths in the program's arguments and environment are rewritten
  to the host paths, and the scratch working folder holds symbolic links for the targets inside
  WorkingDir, so that `model/x.py` and `DATA_DIR=app-data` relative to WorkingDir still lead there.
"""

from __future__ import annotations

import functools
import posixpath
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CONTAINER_USR_DIR = "/platform/swarm/usr"
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class MountTable:
    """Container target -> host source, longest target first; `workdir` is the container WorkingDir."""

    mounts: tuple[tuple[str, str], ...]
    workdir: str

    def host_path(self, path: str) -> str:
        """`path` (absolute, in the container) on this host: under the longest target that holds it, the
        same place under that target's source; any other path is a host path already."""
        path = posixpath.normpath(path)
        for target, source in self.mounts:
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return str(Path(source) / posixpath.relpath(path, target)) if path != target else source
        return path

    def container_path(self, value: str) -> str:
        """An absolute or WorkingDir-relative path as the container saw it, normalized."""
        return posixpath.normpath(posixpath.join(self.workdir, value))

    def host_workdir(self) -> str:
        return self.host_path(self.workdir)

    def rewrite(self, value: str) -> str:
        """A task value (argument or environment variable) for a process that sees the host: an absolute
        path under a target becomes its host path; a relative one becomes absolute when, joined to
        WorkingDir, it lands under another target than WorkingDir's own (`app-data` -> the node's
        privatedata); `--opt=PATH` is rewritten after its `=`. Other text is left as it is."""
        if value.startswith("-") and "=" in value:
            option, _, rest = value.partition("=")
            return f"{option}={self.rewrite(rest)}" if rest else value
        if not value or "\n" in value or "://" in value:
            return value
        if value.startswith("/"):
            return self.host_path(value) if self._under_target(posixpath.normpath(value)) else value
        joined = self.container_path(value)
        inner = self._under_target(joined)
        if inner is not None and inner != self._under_target(self.workdir):
            return self.host_path(joined)
        return value

    def links(self) -> list[tuple[str, str]]:
        """(path relative to WorkingDir, host source) of each target strictly inside WorkingDir."""
        inside = []
        for target, source in self.mounts:
            if target != self.workdir and target.startswith(self.workdir.rstrip("/") + "/"):
                inside.append((posixpath.relpath(target, self.workdir), source))
        return sorted(inside)

    def mount_argv(self, argv: list[str]) -> list[str]:
        """`argv` run in a private mount namespace with every mount made, from WorkingDir."""
        steps = ["set -e"]
        for target, source in sorted(self.mounts, key=lambda m: (m[0].count("/"), m[0])):
            steps += [f"mkdir -p {shlex.quote(target)}",
                      f"mount --bind {shlex.quote(source)} {shlex.quote(target)}"]
        steps.append(f'cd {shlex.quote(self.workdir)} && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "; ".join(steps),
                "sh", *argv]

    def _under_target(self, path: str) -> str | None:
        for target, _ in self.mounts:
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return target
        return None


def mount_table(body: dict, *, usr_dir: Path, private_src: str | None, scratch: Path,
                confined: Callable[[Path], bool]) -> MountTable:
    """A node's mount table for a RUN_SWARM `body` (see the module docstring). `confined` says whether a
    path lies in the folders this SWOP allows: a WorkingDir there is used as it is."""
    pairs: dict[str, str] = {CONTAINER_USR_DIR: str(usr_dir)}
    for item in body.get("SharedContent") or []:
        if item.get("Src") and item.get("Tgt"):
            pairs[_target(str(item["Tgt"]), "SharedContent Tgt")] = str(item["Src"])
    if body.get("PrivateContent") and private_src:
        pairs[_target(str(body["PrivateContent"]), "PrivateContent")] = str(private_src)
    given = body.get("WorkingDir")
    workdir = posixpath.normpath(str(given)) if given else CONTAINER_USR_DIR
    table = MountTable(_longest_first(pairs), workdir)
    if table._under_target(workdir) is None and container_only(Path(workdir), confined):
        pairs[_target(workdir, "WorkingDir")] = str(scratch)
        table = MountTable(_longest_first(pairs), workdir)
    return table


def container_only(path: Path, confined: Callable[[Path], bool]) -> bool:
    """Whether `path` names a folder of the original's container rather than of this host: outside the
    allowed folders and absent here (or an empty folder: a mount point left by a node before). An
    existing host folder outside the allowed ones (/etc, /home) stays what it is, and is refused."""
    if confined(path):
        return False
    try:
        return not path.exists() or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))
    except OSError:
        return False


def prepare_rewritten_workdir(table: MountTable) -> None:
    """For `rewrite`: the links inside a scratch WorkingDir that stand for the targets under it."""
    root = Path(table.host_workdir())
    root.mkdir(parents=True, exist_ok=True)
    for relative, source in table.links():
        link = root / relative
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=True)


def missing_sources(table: MountTable, scratch: Path) -> list[str]:
    """Sources of the table that are not on this host (the scratch folder is made, not missing)."""
    return [source for _, source in table.mounts if Path(source) != scratch and not Path(source).exists()]


@functools.cache
def namespace_refusal() -> str | None:
    """Why bind mounts in a private mount namespace cannot be made here (None: they can). Probed once
    by making one, as the ML processes will."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed (util-linux)"
    probe = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             "mount --bind /tmp /tmp 2>&1"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --mount could not run ({exc})"
    if done.returncode != 0:
        return f"unshare --mount is not permitted ({(done.stdout + done.stderr).strip().splitlines()[-1:]})"
    return None


def _target(path: str, what: str) -> str:
    normal = posixpath.normpath(path)
    if not normal.startswith("/") or normal == "/":
        raise ValueError(f"{what} {path!r} must be an absolute folder other than /")
    return normal


def _longest_first(pairs: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items(), key=lambda kv: (-len(kv[0]), kv[0])))


def described(table: MountTable) -> str:
    """One log line's worth: `target -> source` for each mount."""
    return ", ".join(f"{t} -> {s}" for t, s in sorted(table.mounts))


def make_mount_points(table: MountTable) -> list[Path]:
    """Creates the targets (and their parents) missing on this host; returns the folders it made,
    parents first."""
    made = []
    for target, _ in sorted(table.mounts, key=lambda m: m[0].count("/")):
        missing = [p for p in [*reversed(Path(target).parents), Path(target)] if not p.exists()]
        for folder in missing:
            folder.mkdir(exist_ok=True)
            made.append(folder)
    return made


def mount_point_chain(table: MountTable) -> set[Path]:
    """Every target and its parents: the folders a node of this table may hold as mount points."""
    return {p for target, _ in table.mounts for p in [Path(target), *Path(target).parents]}


def remove_mount_points(folders: list[Path]) -> list[Path]:
    """Removes those of `folders` that are empty and a mount point in no process's namespace, deepest
    first; returns the ones removed."""
    in_use = _mount_points_in_use()
    removed = []
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if any(m == folder or folder in m.parents for m in in_use):
            continue
        try:
            folder.rmdir()  # only an empty folder: anything a program wrote there stays
        except OSError:
            continue
        removed.append(folder)
    return removed


def _mount_points_in_use() -> set[Path]:
    """Mount points of every mount namespace this process can see (/proc/<pid>/mountinfo, field 5,
    with its octal escapes undone)."""
    points: set[Path] = set()
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue  # the process ended, or is not ours to read
        for line in lines:
            fields = line.split()
            if len(fields) > 4:
                points.add(Path(fields[4].encode().decode("unicode_escape")))
    return points
