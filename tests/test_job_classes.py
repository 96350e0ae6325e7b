"""A job's class: hints, rules (job / partition / QOS / account / kind), squeue --json (cached,
off the tick, failures keep the last answer), default."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from agentd.clock import FakeClock
from collectors.job_classes import (MAX_HINTS, ClassProvider, SqueueError, parse_squeue_json,
                                    run_command)
from collectors.jobs import JobRef, JobsConfig

FIXTURE = Path(__file__).parent / "fixtures" / "jobs" / "squeue-22.05.json"
REAL = FIXTURE.read_bytes()  # recorded from a real Slurm 22.05.8 (slurmctld + slurmd, 3 jobs)


def slurm(job: str) -> JobRef:
    return JobRef("slurm", job, "0")


def recorded(**changes: dict) -> bytes:
    """The recorded answer with some jobs' fields changed (``{"2": {"qos": "scavenger"}}``):
    the test Slurm runs without accounting, so every QOS and account in it is empty."""
    doc = json.loads(REAL)
    for job in doc["jobs"]:
        job.update(changes.get(str(job["job_id"]), {}))
    return json.dumps(doc).encode()


class Runner:
    """A squeue stand-in: answers in turn (bytes, or an exception to raise), records the calls."""

    def __init__(self, *answers: bytes | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[tuple[str, ...], float]] = []

    def __call__(self, argv, timeout_s):
        self.calls.append((tuple(argv), timeout_s))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def provider(rules=(), *, default="normal", runner=None, clock=None, slurm=True, **slurm_cfg):
    cfg = JobsConfig.model_validate({"default_class": default, "classes": list(rules),
                                     "slurm": {"enabled": slurm, **slurm_cfg}})
    clock = clock or FakeClock()
    return ClassProvider(cfg, monotonic=clock.monotonic, runner=runner or Runner(REAL)), clock


# -- squeue's JSON ------------------------------------------------------------------------------

def test_the_recorded_squeue_answer_parses():
    jobs, bad = parse_squeue_json(REAL)
    assert bad == 0
    assert sorted(jobs) == ["1", "2"]  # job 3 is pending: on no GPU, left out
    assert (jobs["1"].partition, jobs["1"].state, jobs["1"].user) == ("prod", "RUNNING", "root")
    assert jobs["2"].partition == "debug"


def test_the_newer_shape_with_a_list_of_states_parses():
    # Slurm 23.11+ writes job_state as a list of flags and priority as an object.
    doc = json.loads(REAL)
    for job in doc["jobs"]:
        job["job_state"] = [job["job_state"]]
        job["priority"] = {"set": True, "infinite": False, "number": job["priority"]}
    jobs, bad = parse_squeue_json(json.dumps(doc))
    assert sorted(jobs) == ["1", "2"] and jobs["1"].state == "RUNNING" and bad == 0


def test_malformed_job_entries_are_skipped_and_counted_the_others_kept():
    doc = json.loads(REAL)
    doc["jobs"].append({"partition": "prod"})  # no job_id
    doc["jobs"].append({"job_id": "x", "partition": "prod"})
    doc["jobs"].append("not an object")
    jobs, bad = parse_squeue_json(json.dumps(doc))
    assert sorted(jobs) == ["1", "2"] and bad == 3


@pytest.mark.parametrize("raw, message", [
    (b"JOBID PARTITION NAME\n1 prod wrap\n", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", 'no "jobs" list'),
    (b'{"jobs": {}}', 'no "jobs" list'),
    (b'{"errors": [{"error": "Unable to contact slurm controller"}], "jobs": []}', "squeue reported errors"),
])
def test_an_answer_that_is_not_squeues_json_is_an_error(raw, message):
    with pytest.raises(SqueueError, match=message):
        parse_squeue_json(raw)


# -- rules --------------------------------------------------------------------------------------

def test_rules_by_partition_qos_job_and_kind_first_match_wins():
    p, _ = provider([{"job": "2", "class": "high"},
                     {"partition": "prod", "class": "high"},
                     {"qos": "scavenger", "class": "low"},
                     {"kind": "k8s", "class": "low"}],
                    runner=Runner(recorded(**{"2": {"qos": "scavenger"}, "7": {}})))
    assert p.class_of(slurm("1")) == "normal"  # before squeue answered: partition unknown
    assert p.class_of(slurm("2")) == "high"  # a job rule needs no squeue
    assert p.refresh().ok
    assert p.class_of(slurm("1")) == "high"  # partition prod
    assert p.class_of(slurm("2")) == "high"  # its job rule comes before its QOS rule
    assert p.class_of(JobRef("k8s", "2")) == "high"  # a job rule matches the id of any kind
    assert p.class_of(JobRef("k8s", "abc")) == "low"
    assert p.class_of(slurm("99")) == "normal"  # unknown to squeue: the default


def test_qos_and_account_rules_and_every_key_must_match():
    answer = recorded(**{"1": {"qos": "scavenger", "account": "physics"}, "2": {"qos": "high", "account": "ml"}})
    p, _ = provider([{"partition": "prod", "qos": "high", "class": "high"},  # both must hold: job 1 is prod/scavenger
                     {"qos": "scavenger", "class": "low"},
                     {"account": "ml", "class": "high"}], default="normal", runner=Runner(answer))
    p.refresh()
    assert p.class_of(slurm("1")) == "low"
    assert p.class_of(slurm("2")) == "high"


def test_without_slurm_partition_rules_match_nothing_and_squeue_is_never_run():
    runner = Runner(REAL)
    p, _ = provider([{"partition": "prod", "class": "high"}], default="low", runner=runner, slurm=False)
    assert not p.refresh_due() and not p.refresh().ran and runner.calls == []
    assert p.class_of(slurm("1")) == "low"


def test_a_pending_jobs_partition_list_matches_any_of_them():
    p, _ = provider([{"partition": "gpu", "class": "high"}],
                    runner=Runner(recorded(**{"1": {"partition": "cpu,gpu"}})))
    p.refresh()
    assert p.class_of(slurm("1")) == "high"


# -- hints (PUT /v1/jobs/{id}) -------------------------------------------------------------------

def test_a_hint_beats_every_rule_and_clears():
    p, _ = provider([{"job": "1", "class": "low"}])
    p.set_hint("1", "high")
    assert p.class_of(slurm("1")) == "high"
    p.set_hint("1", None)
    assert p.class_of(slurm("1")) == "low"
    p.set_hint("1", "normal")
    p.forget("1")  # the job ended
    assert p.class_of(slurm("1")) == "low" and p.hints() == {}


@pytest.mark.parametrize("job_id, cls, message", [
    ("1", "idle", "'idle' is the class of a GPU"),
    ("1", "urgent", "unknown class 'urgent'"),
    ("", "high", "must be 1..128 printable"),
    ("x" * 129, "high", "must be 1..128 printable"),
    ("1\n2", "high", "must be 1..128 printable"),
    (" 1", "high", "must be 1..128 printable"),
    (12, "high", "must be 1..128 printable"),
])
def test_bad_hints_are_refused_and_change_nothing(job_id, cls, message):
    p, _ = provider()
    p.set_hint("1", "low")
    with pytest.raises(ValueError, match=message):
        p.set_hint(job_id, cls)
    assert p.hints() == {"1": "low"}


def test_hints_are_bounded_the_oldest_goes():
    p, _ = provider()
    for i in range(MAX_HINTS + 5):
        p.set_hint(str(i), "high")
    hints = p.hints()
    assert len(hints) == MAX_HINTS and "0" not in hints and str(MAX_HINTS + 4) in hints


# -- the squeue cache and its failures ----------------------------------------------------------

def test_squeue_is_asked_once_per_ttl_with_its_timeout():
    runner = Runner(REAL)
    p, clock = provider(runner=runner, ttl="30s", timeout="4s", squeue="/opt/slurm/bin/squeue")
    assert p.refresh_due() and p.refresh().ran
    clock.advance(29)
    assert not p.refresh_due() and not p.refresh().ran
    clock.advance(1)
    assert p.refresh_due() and p.refresh().ran
    assert runner.calls == [(("/opt/slurm/bin/squeue", "--json"), 4.0)] * 2
    assert p.refresh(force=True).ran and len(runner.calls) == 3


def test_a_failing_squeue_keeps_the_last_answer_and_says_when_to_log():
    runner = Runner(REAL, SqueueError("squeue exited with 1: slurm_load_jobs error: Socket timed out"))
    p, clock = provider([{"partition": "prod", "class": "high"}], runner=runner, ttl="30s", error_log_interval="5m")
    assert p.refresh().ok and p.class_of(slurm("1")) == "high"
    outcomes = []
    for _ in range(12):  # six minutes of failures, one try per ttl
        clock.advance(30)
        outcomes.append(p.refresh())
        assert p.class_of(slurm("1")) == "high"  # the last good answer holds
    assert all(o.ran and not o.ok and "Socket timed out" in o.error for o in outcomes)
    assert [o.log_now for o in outcomes] == [True] + [False] * 9 + [True, False]  # once per 5 minutes
    assert [o.failures for o in outcomes] == list(range(1, 13)) and p.errors == 12
    assert p.answer_age_s == 360
    runner.answers = [REAL]
    clock.advance(30)
    back = p.refresh()
    assert back.ok and back.log_now and back.failures == 12 and p.last_error is None
    clock.advance(30)
    assert not p.refresh().log_now


@pytest.mark.parametrize("answer", [b"not json", b'{"meta": {}}', REAL + b" " * 2048])
def test_a_bad_or_oversized_answer_keeps_the_last_answer(answer):
    p, clock = provider([{"partition": "prod", "class": "high"}], runner=Runner(REAL, answer),
                        max_output_bytes=len(REAL) + 1024)
    p.refresh()
    clock.advance(60)
    outcome = p.refresh()
    assert not outcome.ok and outcome.error
    assert p.class_of(slurm("1")) == "high"


def test_a_runner_that_raises_anything_is_a_failure_not_a_crash():
    p, _ = provider(runner=Runner(RuntimeError("boom")))
    outcome = p.refresh()
    assert not outcome.ok and "RuntimeError: boom" in outcome.error


def test_refresh_never_runs_twice_at_once():
    entered, release = threading.Event(), threading.Event()

    def slow(argv, timeout_s):
        entered.set()
        assert release.wait(10)
        return REAL

    p, _ = provider(runner=slow)
    results = []
    worker = threading.Thread(target=lambda: results.append(p.refresh()))
    worker.start()
    assert entered.wait(10)
    assert not p.refresh_due() and not p.refresh(force=True).ran  # the tick's side never blocks
    assert p.class_of(slurm("1")) == "normal"
    release.set()
    worker.join(10)
    assert results[0].ok and results[0].jobs == 2


def test_reconfigure_keeps_hints_and_answer_and_takes_new_rules():
    p, _ = provider([{"partition": "prod", "class": "low"}])
    p.refresh()
    p.set_hint("2", "high")
    p.reconfigure(JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "high"}],
                                             "slurm": {"enabled": True}}))
    assert p.class_of(slurm("1")) == "high" and p.class_of(slurm("2")) == "high"
    p.reconfigure(JobsConfig())  # Slurm off: its answer goes
    assert p.slurm_info("1") is None


# -- the real command runner --------------------------------------------------------------------

def test_run_command_returns_stdout():
    assert run_command([sys.executable, "-c", "print('{\"jobs\": []}')"], 30) == b'{"jobs": []}\n'


def test_run_command_errors_say_what_to_do(tmp_path):
    with pytest.raises(SqueueError, match="not found: install the Slurm clients on this host or set jobs.slurm.squeue"):
        run_command([str(tmp_path / "squeue")], 5)
    with pytest.raises(SqueueError, match=r"exited with 1: slurm_load_jobs error: Unable to contact"):
        run_command([sys.executable, "-c", "import sys; sys.stderr.write('slurm_load_jobs error: Unable to contact "
                     "slurm controller'); sys.exit(1)"], 30)
    with pytest.raises(SqueueError, match=r"no answer within 0.3s \(jobs.slurm.timeout\)"):
        run_command([sys.executable, "-c", "import time; time.sleep(30)"], 0.3)
    script = tmp_path / "squeue-noexec"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SqueueError, match="not executable"):
        run_command([str(script)], 5)


def test_the_provider_runs_a_real_command_end_to_end(tmp_path):
    fake = tmp_path / "squeue"
    fake.write_text(f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['--json']\n"
                    f"sys.stdout.buffer.write(open({str(FIXTURE)!r}, 'rb').read())\n")
    fake.chmod(0o755)
    cfg = JobsConfig.model_validate({"classes": [{"partition": "prod", "class": "high"}],
                                     "slurm": {"enabled": True, "squeue": str(fake)}})
    p = ClassProvider(cfg, monotonic=FakeClock().monotonic)
    outcome = p.refresh()
    assert outcome.ok, outcome.error
    assert p.class_of(slurm("1")) == "high" and p.class_of(slurm("2")) == "normal"



def test_an_empty_queue_is_an_answer_too():
    p, clock = provider([{"partition": "prod", "class": "high"}], runner=Runner(REAL, b'{"errors": [], "jobs": []}'))
    p.refresh()
    clock.advance(60)
    assert p.refresh().ok
    assert p.class_of(slurm("1")) == "normal" and p.slurm_info("1") is None  # job 1 has ended
