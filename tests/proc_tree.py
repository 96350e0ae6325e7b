"""A fake ``/proc`` for the job attribution tests: ``/proc/<pid>/{cgroup,environ,comm}`` files
under a temporary folder, shaped as the kernel writes them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# A cgroup v1 host's file for a process outside any job (the shape of a real one, 12 lines).
V1_PLAIN = """12:pids:/system.slice/sshd.service
11:hugetlb:/
10:cpuset:/
9:memory:/system.slice/sshd.service
8:devices:/system.slice/sshd.service
7:freezer:/
6:net_cls,net_prio:/
5:blkio:/system.slice/sshd.service
4:perf_event:/
3:cpu,cpuacct:/system.slice/sshd.service
2:rdma:/
1:name=systemd:/system.slice/sshd.service
0::/system.slice/sshd.service
"""


def v1_slurm(job: str, step: str = "0", uid: int = 1000, prefix: str = "slurm") -> str:
    """cgroup v1 with proctrack/cgroup: the slurm hierarchy on freezer, memory, devices, cpuset."""
    path = f"/{prefix}/uid_{uid}/job_{job}/step_{step}/task_0"
    return (f"12:pids:/system.slice/slurmd.service\n11:hugetlb:/\n10:cpuset:{path}\n9:memory:{path}\n"
            f"8:devices:{path}\n7:freezer:{path}\n6:net_cls,net_prio:/\n5:blkio:/system.slice/slurmd.service\n"
            "4:perf_event:/\n3:cpu,cpuacct:/system.slice/slurmd.service\n2:rdma:/\n"
            "1:name=systemd:/system.slice/slurmd.service\n0::/system.slice/slurmd.service\n")


def v2_slurm(job: str, step: str = "0") -> str:
    """cgroup v2 (unified) with Slurm's cgroup/v2 plugin."""
    return f"0::/system.slice/slurmstepd.scope/job_{job}/step_{step}/user/task_0\n"


def k8s_cgroupfs(uid: str, qos: str | None = "burstable", container: str = "0123abcd" * 8) -> str:
    level = f"/{qos}" if qos else ""
    return f"0::/kubepods{level}/pod{uid}/{container}\n"


def k8s_systemd(uid: str, qos: str | None = "burstable", runtime: str = "cri-containerd") -> str:
    u = uid.replace("-", "_")
    if qos:
        slices = f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
    else:
        slices = f"/kubepods.slice/kubepods-pod{u}.slice"
    return f"0::{slices}/{runtime}-{'89abcdef' * 8}.scope\n"


def environ(env: Mapping[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())


class ProcTree:
    """Processes under ``root`` (pass ``root`` as ``proc_root``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def add(self, pid: int, cgroup: str | None = V1_PLAIN, env: Mapping[str, str] | None = None,
            comm: str = "python3") -> Path:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        if cgroup is not None:
            (d / "cgroup").write_text(cgroup)
        (d / "environ").write_bytes(environ(env or {"PATH": "/usr/bin", "HOME": "/home/u"}))
        (d / "comm").write_text(comm + "\n")
        return d

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
