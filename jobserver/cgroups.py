"""Per-job cgroups: the kernel's own measure of one job's whole process tree (its peak
memory), and a memory limit the kernel enforces on it.

``JobCgroups.detect()`` finds where this server may create child cgroups of its own
memory cgroup:

cgroup v1 (the ``memory`` controller mounted on its own, as on hybrid hosts)
    ``<our memory cgroup>/jobserver/<job id>/`` with ``memory.limit_in_bytes``.  Creating
    a child cgroup needs write access to ours (root, or a delegated directory).
cgroup v2
    ``<our cgroup>/jobserver/<job id>/`` with ``memory.max``, which needs ``+memory`` in
    ``cgroup.subtree_control`` of our cgroup and of ``jobserver/``.  The kernel refuses
    that while this process sits in our cgroup itself ("no internal processes"), so v2
    works only in a delegated subtree where the server runs in a leaf of its own (e.g. a
    systemd unit with ``Delegate=yes`` that starts the server in a sub-cgroup).

Anything else (no memory controller, read-only ``/sys/fs/cgroup``, not root) gives None and
the scheduler falls back to sampling each job tree's RSS.

The job joins its cgroup itself: ``child.py`` writes its own pid to the ``cgroup.procs``
path it is given before it imports any task code, so nothing the task starts can run
outside the limit (a pid written by the server after the spawn could lose that race).
After the job, ``remove`` kills whatever is still in the cgroup (a grandchild that left
the process group with ``setsid`` included) and removes the directory.

Every job gets one where they can be made (its ``peak`` is the exact figure learned
requests use, however short the job); nothing here decides which job gets a limit: the
scheduler does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("jobserver.cgroups")

PARENT_NAME = "jobserver"


@dataclass(frozen=True)
class JobCgroup:
    """One job's cgroup directory."""

    path: Path
    version: str  # "cgroup v1" | "cgroup v2"

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in here because of the limit."""
        if self.version == "cgroup v2":
            return _read_keyed(self.path / "memory.events", "oom_kill") or 0
        # v1: "oom_kill N" in memory.oom_control since Linux 4.13; before that, failcnt
        # (times the limit was hit) is the best sign we have.
        kills = _read_keyed(self.path / "memory.oom_control", "oom_kill")
        if kills is not None:
            return kills
        return 1 if (_read_int(self.path / "memory.failcnt") or 0) > 0 else 0

    def peak(self) -> int | None:
        """The kernel's own high-water mark of the cgroup's memory, bytes."""
        name = "memory.peak" if self.version == "cgroup v2" else "memory.max_usage_in_bytes"
        return _read_int(self.path / name)

    def usage(self) -> int | None:
        """What the cgroup holds now that the kernel cannot just drop, bytes: its usage
        less the inactive page cache (what a shared-page-blind RSS sum cannot tell)."""
        if self.version == "cgroup v2":
            current, cache = "memory.current", "inactive_file"
        else:
            current, cache = "memory.usage_in_bytes", "total_inactive_file"
        used = _read_int(self.path / current)
        if used is None:
            return None
        return max(0, used - (_read_keyed(self.path / "memory.stat", cache) or 0))

    def remove(self) -> bool:
        """Kill what is left inside, then remove the directory; False if it is still busy
        (processes take a moment to exit): call again later."""
        for pid in _read_pids(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


class JobCgroups:
    """Creates per-job cgroups under one parent directory."""

    def __init__(self, parent: Path, version: str) -> None:
        self.parent = parent
        self.version = version

    def describe(self) -> str:
        return f"{self.version} at {self.parent}"

    @classmethod
    def detect(
        cls, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
    ) -> JobCgroups | None:
        """Where per-job memory cgroups can be made, or None (then: sampling)."""
        try:
            text = (proc_root / "self" / "cgroup").read_text()
        except OSError:
            return None
        v1_path, v2_path = None, None
        for line in text.splitlines():
            parts = line.strip().split(":", 2)
            if len(parts) != 3:
                continue
            hierarchy, controllers, path = parts
            if hierarchy == "0" and controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = (controllers, path)
        if v1_path is not None:
            controllers, path = v1_path
            for name in (controllers, "memory"):
                mount = cgroup_root / name
                if (mount / "memory.limit_in_bytes").is_file():
                    own = _inside(mount, path)
                    return cls._try(own / PARENT_NAME, "cgroup v1", own)
            return None
        if v2_path is not None:
            own = _inside(cgroup_root, v2_path)
            if "memory" in (_read_text(own / "cgroup.controllers") or "").split():
                return cls._try(own / PARENT_NAME, "cgroup v2", own)
        return None

    @classmethod
    def _try(cls, parent: Path, version: str, own: Path) -> JobCgroups | None:
        try:
            parent.mkdir(exist_ok=True)
            if version == "cgroup v2":
                for directory in (own, parent):
                    (directory / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            log.info("per-job cgroups unavailable (%s: %s); memory limits are sampled", parent, exc)
            return None
        return cls(parent, version)

    def create(self, job_id: str, memory_limit: int | None = None) -> JobCgroup | None:
        """A fresh cgroup for ``job_id``, limited to ``memory_limit`` bytes (None: only
        measured); None (and a log line) if the kernel refuses."""
        path = self.parent / job_id
        group = JobCgroup(path, self.version)
        try:
            if path.exists():  # left by an earlier attempt of the same job
                group.remove()
            path.mkdir()
            if memory_limit is None:
                pass
            elif self.version == "cgroup v2":
                (path / "memory.max").write_text(str(memory_limit))
                with contextlib.suppress(OSError):  # no swap controller: nothing to cap
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(memory_limit))
        except OSError as exc:
            log.warning(
                "job %s: cannot create its cgroup %s (%s); sampling instead", job_id, path, exc
            )
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return group


def _inside(mount: Path, path: str) -> Path:
    parts = [part for part in PurePosixPath(path).parts if part not in ("/", "..")]
    directory = mount.joinpath(*parts)
    # Inside a container without a cgroup namespace the host path is not mounted here.
    return directory if directory.is_dir() else mount


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    for line in (_read_text(path) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            with contextlib.suppress(ValueError):
                return int(fields[1])
    return None


def _read_pids(path: Path) -> list[int]:
    return [int(line) for line in (_read_text(path) or "").split() if line.isdigit()]
