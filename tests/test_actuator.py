"""The actuator's safety invariants over the fake pynvml: range, change-only, dry run, permission,
out-of-band limiters, originals persisted and restored (also after a crash)."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from agentd.actuator import ORIGINALS_FILE, Actuator
from collectors.nvml import NvmlBackend
from tests.fake_pynvml import FakeNvml


def node(n=2, **values):
    fake = FakeNvml.with_gpus(n, **values)
    backend = NvmlBackend(fake)
    backend.open()
    return fake, backend


def tick(backend):
    return {s.index: s for s in backend.sample(0)}


def uuids(fake):
    return {g.uuid: i for i, g in enumerate(fake.gpus)}


def test_writes_only_on_change_and_clamps_to_the_constraints(tmp_path):
    fake, backend = node()
    act = Actuator(backend, tmp_path)
    act.apply({0: 500.0, 1: 10_000.0}, tick(backend))
    assert fake.gpus[0].attempts == [500_000] and fake.gpus[1].attempts == []  # 1: clamped to 700 = current
    for _ in range(5):
        act.apply({0: 500.0, 1: 10_000.0}, tick(backend))
    assert fake.gpus[0].attempts == [500_000]
    act.apply({0: 50.0}, tick(backend))
    assert fake.gpus[0].attempts == [500_000, 200_000]  # clamped up to the minimum


def test_dry_run_writes_nothing_but_reports_what_it_would_set(tmp_path):
    fake, backend = node()
    act = Actuator(backend, tmp_path, dry_run=True)
    controls = act.apply({0: 400.0, 1: 300.0}, tick(backend))
    assert fake.gpus[0].attempts == fake.gpus[1].attempts == []
    assert controls[0].target_w == 400.0 and controls[0].observe_only
    assert controls[0].set_w is None  # telemetry never reports a cap that was not written
    assert not (tmp_path / ORIGINALS_FILE).exists()
    assert act.restore({}) == {} and fake.gpus[0].attempts == []


def test_no_permission_is_one_clear_error_then_observe_only(tmp_path, capsys):
    fake, backend = node(1, no_permission_on_set=True)
    act = Actuator(backend, tmp_path)
    act.apply({0: 400.0}, tick(backend))
    control = act.controls[0]
    assert control.observe_only and "CAP_SYS_ADMIN" in control.error
    calls = fake.gpus[0].calls["nvmlDeviceSetPowerManagementLimit"]
    for target in (300.0, 350.0, 400.0):
        act.apply({0: target}, tick(backend))
    assert fake.gpus[0].calls["nvmlDeviceSetPowerManagementLimit"] == calls  # no retry storm
    assert control.set_w is None and control.target_w == 400.0  # intended, not written


def test_an_out_of_band_limiter_is_reported_and_not_fought(tmp_path):
    fake, backend = node(1)
    act = Actuator(backend, tmp_path)
    act.apply({0: 600.0}, tick(backend))
    fake.gpus[0].enforced_limit_mw = 450_000  # e.g. a BMC power brake below our 600 W
    act.apply({0: 650.0}, tick(backend))
    assert act.controls[0].externally_limited
    assert fake.gpus[0].attempts == [600_000]  # no raise while something else holds it lower
    act.apply({0: 400.0}, tick(backend))  # lowering is always allowed
    assert fake.gpus[0].attempts == [600_000, 400_000]


def test_originals_are_persisted_before_the_first_write_and_restored_on_stop(tmp_path):
    fake, backend = node(2, limit_mw=650_000)
    act = Actuator(backend, tmp_path)
    act.apply({0: 400.0}, tick(backend))
    saved = json.loads((tmp_path / ORIGINALS_FILE).read_text())["gpus"]
    assert saved == {fake.gpus[0].uuid: {"index": 0, "limit_w": 650.0, "saved_at": saved[fake.gpus[0].uuid]["saved_at"]}}
    act.apply({0: 300.0}, tick(backend))  # a second write keeps the first original
    assert json.loads((tmp_path / ORIGINALS_FILE).read_text())["gpus"] == saved
    assert act.restore(uuids(fake)) == {fake.gpus[0].uuid: "restored 650 W"}
    assert fake.gpus[0].limit_mw == 650_000 and fake.gpus[1].attempts == []
    assert not (tmp_path / ORIGINALS_FILE).exists()


def test_a_crash_is_repaired_by_the_next_run(tmp_path):
    fake, backend = node(1, limit_mw=700_000)
    Actuator(backend, tmp_path).apply({0: 300.0}, tick(backend))  # then the process dies
    assert fake.gpus[0].limit_mw == 300_000
    # the next run (or agentd restore-limits), possibly with other indexes
    after = Actuator(backend, tmp_path)
    assert after.load_originals()[fake.gpus[0].uuid]["limit_w"] == 700.0
    assert after.restore({fake.gpus[0].uuid: 0})[fake.gpus[0].uuid] == "restored 700 W"
    assert fake.gpus[0].limit_mw == 700_000


def test_a_failed_restore_keeps_the_original_for_the_next_try(tmp_path):
    fake, backend = node(1)
    act = Actuator(backend, tmp_path)
    act.apply({0: 300.0}, tick(backend))
    fake.gpus[0].no_permission_on_set = True
    assert act.restore(uuids(fake))[fake.gpus[0].uuid].startswith("failed")
    assert (tmp_path / ORIGINALS_FILE).exists()


def test_a_corrupt_originals_file_is_a_clear_error(tmp_path):
    _, backend = node(1)
    (tmp_path / ORIGINALS_FILE).write_text("{not json")
    with pytest.raises(OSError, match="original_limits.json: unreadable"):
        Actuator(backend, tmp_path).load_originals()


targets = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(min_value=-1e6, max_value=1e6))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(targets, targets), min_size=1, max_size=40), st.integers(0, 400_000))
def test_no_sequence_of_targets_writes_outside_the_constraints(tmp_path_factory, steps, enforced_mw):
    fake, backend = node(2, min_limit_mw=200_000, max_limit_mw=700_000)
    act = Actuator(backend, tmp_path_factory.mktemp("state"))
    for k, (a, b) in enumerate(steps):
        if k == len(steps) // 2 and enforced_mw:
            fake.gpus[1].enforced_limit_mw = enforced_mw + 200_000
        act.apply({0: a, 1: b}, tick(backend))
    for gpu in fake.gpus:  # every attempted write, not only those the fake accepted
        assert all(isinstance(mw, int) and 200_000 <= mw <= 700_000 for mw in gpu.attempts)


def test_restore_limits_command_repairs_a_crashed_run(tmp_path):
    from click.testing import CliRunner

    from agentd.cli import main
    from tests.fake_pynvml import install

    fake = FakeNvml.with_gpus(2, limit_mw=700_000)
    backend = NvmlBackend(fake)
    backend.open()
    Actuator(backend, tmp_path).apply({0: 300.0, 1: 450.0}, tick(backend))  # then: kill -9
    config = tmp_path / "agentd.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    with install(fake):
        result = CliRunner().invoke(main, ["restore-limits", "--config", str(config)], env={})
        assert result.exit_code == 0, result.output
        assert f"{fake.gpus[0].uuid}: restored 700 W" in result.output
        assert [g.limit_mw for g in fake.gpus] == [700_000, 700_000]
        again = CliRunner().invoke(main, ["restore-limits", "--config", str(config)], env={})
    assert again.exit_code == 0 and "nothing to restore" in again.output


def test_an_operator_limit_is_not_raised_but_can_be_lowered(tmp_path):
    fake, backend = node(1, limit_mw=700_000)
    act = Actuator(backend, tmp_path)
    act.apply({0: 700.0}, tick(backend))
    fake.gpus[0].limit_mw = 400_000  # nvidia-smi -pl 400 by a person
    act.apply({0: 700.0}, tick(backend))  # uncapped target above it
    assert fake.gpus[0].attempts == [] and act.controls[0].baseline_w == 400.0
    act.apply({0: 300.0}, tick(backend))  # protection still lowers it
    assert fake.gpus[0].attempts == [300_000]
    act.apply({0: 700.0}, tick(backend))  # released: back to the operator's 400, not 700
    assert fake.gpus[0].attempts == [300_000, 400_000] and fake.gpus[0].limit_mw == 400_000


def test_a_refused_write_leaves_nothing_to_restore(tmp_path):
    fake, backend = node(1, no_permission_on_set=True)
    act = Actuator(backend, tmp_path)
    act.apply({0: 400.0}, tick(backend))
    assert not (tmp_path / ORIGINALS_FILE).exists()  # no false "unclean stop" at the next start


def test_an_unwritable_state_dir_means_no_write(tmp_path):
    fake, backend = node(1)
    act = Actuator(backend, tmp_path / "missing" / "dir")
    act.apply({0: 400.0}, tick(backend))
    assert fake.gpus[0].attempts == [] and "cannot persist" in act.controls[0].error
