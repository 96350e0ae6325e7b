"""Job attribution: GPU pids -> Slurm jobs / Kubernetes pods through /proc, and the [jobs] config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentd.config import ConfigError, load_config
from collectors.jobs import JobAttributor, JobRef, JobsConfig, parse_cgroup, parse_environ, read_limited
from tests.proc_tree import V1_PLAIN, ProcTree, k8s_cgroupfs, k8s_systemd, v1_slurm, v2_slurm

UID = "3f2a9c1e-7b4d-4e2a-9f00-12ab34cd56ef"


# -- the cgroup and environ spellings -----------------------------------------------------------

@pytest.mark.parametrize("text, job", [
    (v1_slurm("1234", "0"), JobRef("slurm", "1234", "0")),
    (v1_slurm("77", "batch", uid=0), JobRef("slurm", "77", "batch")),
    (v1_slurm("88", "extern", prefix="slurm_gpu-017"), JobRef("slurm", "88", "extern")),  # several slurmd per host
    ("7:freezer:/slurm/uid_1000/job_99\n0::/\n", JobRef("slurm", "99", None)),  # the job level, no step
    (v2_slurm("4321", "0"), JobRef("slurm", "4321", "0")),
    (v2_slurm("5", "interactive"), JobRef("slurm", "5", "interactive")),
    ("0::/system.slice/gpu-017_slurmstepd.scope/job_6/step_batch/user/task_0\n", JobRef("slurm", "6", "batch")),
    (k8s_cgroupfs(UID), JobRef("k8s", UID)),
    (k8s_cgroupfs(UID, qos="besteffort"), JobRef("k8s", UID)),
    (k8s_cgroupfs(UID, qos=None), JobRef("k8s", UID)),  # guaranteed: no QoS level
    ("11:memory:/kubepods/burstable/pod" + UID + "/abc\n0::/\n", JobRef("k8s", UID)),  # v1 controller line
    (k8s_systemd(UID), JobRef("k8s", UID)),  # underscores back to dashes
    (k8s_systemd(UID, qos=None, runtime="crio"), JobRef("k8s", UID)),
    (k8s_systemd(UID.upper(), qos="besteffort", runtime="docker"), JobRef("k8s", UID)),
    # a static pod's UID is a hash without dashes
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0123456789abcdef0123456789abcdef.slice/x.scope\n",
     JobRef("k8s", "0123456789abcdef0123456789abcdef")),
    # Slurm run inside a pod: the job is Slurm's
    ("0::/kubepods/burstable/pod" + UID + "/c/system.slice/slurmstepd.scope/job_3/step_0\n", JobRef("slurm", "3", "0")),
])
def test_every_cgroup_spelling_names_its_job(text, job):
    assert parse_cgroup(text) == job


@pytest.mark.parametrize("text", [
    V1_PLAIN, "0::/\n", "0::/user.slice/user-1000.slice/session-4.scope\n", "",
    "7:freezer:/slurm/uid_1000/\n",  # the user level only: no job
    "0::/system.slice/slurmstepd.scope/system\n",  # slurmstepd itself
    "0::/kubepods.slice/kubepods-burstable.slice\n",  # the QoS slice, no pod
    "0::/kubepods/burstable/\n",
    "garbage without colons\n",
    "0::/home/job_12/step_0\n",  # job_ in a path that is not Slurm's
])
def test_cgroups_of_no_job_name_none(text):
    assert parse_cgroup(text) is None


@pytest.mark.parametrize("env, job", [
    (b"PATH=/bin\0SLURM_JOB_ID=1234\0SLURM_STEP_ID=0\0", JobRef("slurm", "1234", "0")),
    (b"SLURM_JOB_ID=55\0", JobRef("slurm", "55", None)),  # a batch script has no step id
    (b"SLURM_JOBID=56\0", JobRef("slurm", "56", None)),  # the older name
    (b"SLURM_JOBID=1\0SLURM_JOB_ID=2\0", JobRef("slurm", "2", None)),  # the current name wins
    (b"SLURM_JOB_ID=7\0SLURM_STEP_ID=../../x\0", JobRef("slurm", "7", None)),  # a step that is not one
])
def test_environ_names_the_slurm_job(env, job):
    assert parse_environ(env) == job


@pytest.mark.parametrize("env", [
    b"", b"PATH=/bin\0", b"SLURM_JOB_ID=\0", b"SLURM_JOB_ID=abc\0", b"SLURM_JOB_ID=12 \0",
    b"XSLURM_JOB_ID=12\0", b"SLURM_JOB_ID=" + b"9" * 30 + b"\0", b"SLURM_JOB_ID\0",
])
def test_environ_without_a_job_id_names_none(env):
    assert parse_environ(env) is None


# -- attribution over a /proc tree --------------------------------------------------------------

class CountingReader:
    """read_limited, recording each path read (and raising what a test asks for)."""

    def __init__(self, fail: dict[str, type[Exception]] | None = None) -> None:
        self.paths: list[Path] = []
        self.fail = fail or {}

    def __call__(self, path: Path, limit: int) -> bytes:
        self.paths.append(path)
        exc = self.fail.get(path.name)
        if exc is not None:
            raise exc(13, "Permission denied", str(path))
        return read_limited(path, limit)


def test_cgroup_is_read_first_and_environ_only_when_it_names_no_job(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(100, v2_slurm("10"), env={"SLURM_JOB_ID": "999"})  # cgroup wins over a claimed id
    proc.add(101, V1_PLAIN, env={"SLURM_JOB_ID": "11", "SLURM_STEP_ID": "2"})
    reader = CountingReader()
    att = JobAttributor(proc.root, read=reader)
    out = att.attribute({0: [100], 1: [101]})
    assert out[0].jobs == (JobRef("slurm", "10", "0"),) and out[0].via[JobRef("slurm", "10", "0")] == "cgroup"
    assert out[1].jobs == (JobRef("slurm", "11", "2"),) and out[1].via[JobRef("slurm", "11", "2")] == "environ"
    assert [p.relative_to(proc.root).as_posix() for p in reader.paths] == \
        ["100/cgroup", "101/cgroup", "101/environ"]


def test_environ_fallback_off_never_reads_environ(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(101, V1_PLAIN, env={"SLURM_JOB_ID": "11"})
    reader = CountingReader()
    att = JobAttributor(proc.root, environ_fallback=False, read=reader)
    out = att.attribute({0: [101]})
    assert out[0].jobs == () and out[0].unattributed == 1 and out[0].busy
    assert all(p.name != "environ" for p in reader.paths)


def test_environ_permission_error_is_unknown_and_counted_never_raised(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(200, V1_PLAIN, env={"SLURM_JOB_ID": "20"})
    proc.add(201, v1_slurm("21"))
    att = JobAttributor(proc.root, read=CountingReader(fail={"environ": PermissionError}))
    out = att.attribute({0: [200, 201]})
    assert out[0].jobs == (JobRef("slurm", "21", "0"),)  # the other process is still found
    assert out[0].unattributed == 1  # the GPU is busy with someone unknown: not idle
    assert att.stats.environ_denied == 1 and att.stats.unattributed == 1
    att.attribute({0: [200, 201]})
    assert att.stats.environ_denied == 1  # counted per pid, not per tick: the pid is cached


def test_a_vanished_pid_is_no_owner_and_is_not_cached(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(300, v1_slurm("30"))
    att = JobAttributor(proc.root)
    out = att.attribute({0: [300, 301]})  # 301: in NVML's list, gone from /proc
    assert out[0].jobs == (JobRef("slurm", "30", "0"),) and out[0].unattributed == 0
    assert att.stats.vanished == 1 and att.cached_pids == 1
    proc.add(301, v2_slurm("31"))  # a new process that got the pid: read afresh
    out = att.attribute({0: [300, 301]})
    assert out[0].jobs == (JobRef("slurm", "30", "0"), JobRef("slurm", "31", "0"))


def test_pids_are_read_once_while_they_stay_and_forgotten_when_they_leave(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(400, v1_slurm("40"))
    proc.add(401, v1_slurm("41"))
    reader = CountingReader()
    att = JobAttributor(proc.root, read=reader)
    for _ in range(5):
        att.attribute({0: [400], 1: [401]})
    assert len(reader.paths) == 2 and att.stats.pids_read == 2
    att.attribute({0: [400], 1: []})  # 401 left its GPU
    assert att.cached_pids == 1
    (proc.root / "401" / "cgroup").write_text(v1_slurm("42"))  # pid reused by another job
    out = att.attribute({0: [400], 1: [401]})
    assert out[1].jobs == (JobRef("slurm", "42", "0"),)


def test_mps_two_jobs_on_one_gpu_are_both_owners(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(500, v2_slurm("50"))
    proc.add(501, v2_slurm("9"))
    proc.add(502, v2_slurm("50", "1"))  # another step of job 50
    proc.add(503, "0::/system.slice/nvidia-mps.service\n", comm="nvidia-cuda-mps-server")
    att = JobAttributor(proc.root)
    out = att.attribute({0: [500, 501, 502, 503]})
    assert out[0].jobs == (JobRef("slurm", "9", "0"), JobRef("slurm", "50", "0"), JobRef("slurm", "50", "1"))
    assert out[0].unattributed == 0 and att.stats.ignored == 1  # the MPS server is no owner


def test_kubernetes_pods_through_the_tree(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(600, k8s_systemd(UID))
    proc.add(601, k8s_cgroupfs("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", qos=None))
    out = JobAttributor(proc.root).attribute({0: [600], 1: [601]})
    assert out[0].jobs == (JobRef("k8s", UID),)
    assert out[1].jobs == (JobRef("k8s", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"),)


def test_bad_pids_and_unreadable_files_never_raise(tmp_path):
    proc = ProcTree(tmp_path / "proc")
    proc.add(700, cgroup=None)  # a kernel without the file
    att = JobAttributor(proc.root, read=CountingReader(fail={"cgroup": IsADirectoryError}))
    out = att.attribute({0: [0, -5, 700]})
    assert out[0].jobs == () and out[0].unattributed == 3
    assert att.stats.read_errors == 3  # two bad pids, one unreadable cgroup


def test_an_empty_gpu_has_no_owner(tmp_path):
    out = JobAttributor(tmp_path).attribute({0: []})
    assert out[0].jobs == () and not out[0].busy


# -- the real /proc -----------------------------------------------------------------------------

def _own_job() -> JobRef | None:
    return parse_cgroup(Path("/proc/self/cgroup").read_text())


def test_a_real_child_process_is_found_through_the_real_proc():
    if _own_job() is not None:
        pytest.skip("the test itself runs inside a job, whose cgroup would name that job")
    env = {**os.environ, "SLURM_JOB_ID": "424242", "SLURM_STEP_ID": "3"}
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], env=env,
                             stdin=subprocess.PIPE)
    try:
        att = JobAttributor(Path("/proc"))
        out = att.attribute({0: [child.pid, os.getpid()]})
        assert out[0].jobs == (JobRef("slurm", "424242", "3"),)
        assert out[0].via[JobRef("slurm", "424242", "3")] == "environ"
        assert out[0].unattributed == (0 if "SLURM_JOB_ID" in os.environ else 1)  # this pytest itself
    finally:
        child.communicate(b"")
    att.attribute({0: []})  # it left the GPU: forgotten
    out = att.attribute({0: [child.pid]})  # a stale NVML list naming it again: gone from /proc
    assert out[0].jobs == () and out[0].unattributed == 0 and att.stats.vanished == 1


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to drop capabilities as the systemd unit does")
def test_with_the_units_capabilities_another_users_environ_is_denied_and_counted():
    """The unit grants CAP_SYS_ADMIN only: another user's environ is then unreadable, and the
    attribution says so (counted, unknown) instead of failing."""
    if _own_job() is not None:
        pytest.skip("runs inside a job")
    victim = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                               "-c", "import sys; sys.stdin.read()"],
                              env={"SLURM_JOB_ID": "515151", "PATH": os.environ.get("PATH", "")},
                              stdin=subprocess.PIPE)
    probe = textwrap.dedent(f"""
        from pathlib import Path
        from collectors.jobs import JobAttributor
        att = JobAttributor(Path("/proc"))
        out = att.attribute({{0: [{victim.pid}]}})
        print(out[0].jobs, out[0].unattributed, att.stats.environ_denied)
    """)
    try:
        done = subprocess.run(["setpriv", "--bounding-set=-all,+sys_admin", "--inh-caps=-all", sys.executable,
                               "-c", probe], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        victim.communicate(b"")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["()", "1", "1"]


# -- the [jobs] section -------------------------------------------------------------------------

def test_jobs_config_defaults_and_rules():
    cfg = JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "high"},
                                                 {"qos": "scavenger", "class": "low"},
                                                 {"job": 1234, "class": "high"}]})
    assert cfg.default_class == "normal" and cfg.proc_root == Path("/proc") and cfg.environ_fallback
    assert [(r.partition, r.qos, r.job, r.cls) for r in cfg.classes] == \
        [("prod", None, None, "high"), (None, "scavenger", None, "low"), (None, None, "1234", "high")]
    assert cfg.energy_interval_s == 300 and cfg.slurm.seconds("ttl") == 30 and not cfg.slurm.enabled


@pytest.mark.parametrize("toml, expected", [
    ("[jobs]\ndefault_class = 'idle'\n", "jobs.default_class: Value error, 'idle' is the class of a GPU with no process"),
    ("[jobs]\ndefault_class = 'urgent'\n", "jobs.default_class: Value error, unknown class 'urgent'; use one of low, normal, high"),
    ("[jobs]\nclasses = [{partition = 'prod', class = 'top'}]\n", "jobs.classes.0.class: Value error, unknown class 'top'"),
    ("[jobs]\nclasses = [{class = 'high'}]\n", "jobs.classes.0: Value error, a class rule needs at least one of job"),
    ("[jobs]\nclasses = [{partition = 'prod'}]\n", "jobs.classes.0.class: Field required"),
    ("[jobs]\nclasses = [{partiton = 'prod', class = 'high'}]\n", "jobs.classes.0.partiton: unknown key"),
    ("[jobs]\nclasses = [{kind = 'pbs', class = 'high'}]\n", "jobs.classes.0.kind: Input should be 'slurm' or 'k8s'"),
    ("[jobs]\nenergy_interval = '0s'\n", "jobs.energy_interval: Value error, must be a positive duration"),
    ("[jobs]\nenergy_interval = 'often'\n", "jobs.energy_interval: Value error, expected a duration"),
    ("[jobs.slurm]\nttl = -1\n", "jobs.slurm.ttl: Value error, a duration cannot be negative"),
    ("[jobs.slurm]\ntimeout = '0ms'\n", "jobs.slurm.timeout: Value error, must be a positive duration"),
    ("[jobs.slurm]\nsqueue = ' '\n", "jobs.slurm.squeue: Value error, must name the squeue command"),
    ("[jobs.slurm]\nenable = true\n", "jobs.slurm.enable: unknown key"),
])
def test_bad_jobs_config_is_refused_with_file_and_key(tmp_path, toml, expected):
    path = tmp_path / "agentd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert any(line.startswith(f"{path}: ") and expected in line for line in err.value.errors), err.value.errors


def test_a_full_jobs_section_loads(tmp_path):
    path = tmp_path / "agentd.toml"
    path.write_text(textwrap.dedent("""
        [jobs]
        default_class = "low"
        classes = [{partition = "prod", qos = "high", class = "high"}, {kind = "k8s", class = "normal"}]
        proc_root = "/host/proc"
        environ_fallback = false
        energy_interval = "1m"
        [jobs.slurm]
        enabled = true
        squeue = "/usr/bin/squeue"
        ttl = "1m"
        timeout = "5s"
    """))
    cfg = load_config(path, environ={}).jobs
    assert cfg.default_class == "low" and cfg.proc_root == Path("/host/proc") and not cfg.environ_fallback
    assert cfg.classes[0].partition == "prod" and cfg.classes[0].qos == "high" and cfg.classes[1].kind == "k8s"
    assert cfg.slurm.enabled and cfg.slurm.seconds("ttl") == 60 and cfg.energy_interval_s == 60


def test_every_jobs_key_has_a_description():
    from collectors.jobs import ClassRule, SlurmConfig

    for model in (JobsConfig, SlurmConfig, ClassRule):
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: {missing}"
