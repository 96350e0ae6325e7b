"""``agentd plot``: the store of a simulated node through the hot-water scenario, drawn as a PNG.

The node is the real daemon of ``tests/grafana_scenario.py`` (budget, CDU, rules, jobs) run for
five simulated minutes ending a few minutes ago, so ``--since 1h`` selects it. The picture must
decode, have the size asked for and not be blank; what it was drawn from must be what the store
holds; and each bad input ends with a clear message and exit code, nothing written.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib", reason="the plot extra: pip install 'gpu-agentd[plot]'")

from agentd import plot  # noqa: E402
from agentd.plot_cli import plot_command  # noqa: E402
from agentd.store import PointFilter, StoreReader  # noqa: E402
from collectors.lineproto_parse import parse_line  # noqa: E402
from tests.grafana_scenario import run_site  # noqa: E402

SECONDS = 300.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file whose state_dir holds node-a's store after the scenario."""
    tmp = tmp_path_factory.mktemp("plot")
    start = (time.time_ns() // 10**9 - int(SECONDS) - 120) * 10**9  # ended two minutes ago
    run = asyncio.run(run_site(tmp / "site", seconds=SECONDS, start_wall_ns=start, nodes=("node-a",)))
    state = run.nodes["node-a"].daemon.cfg.state_dir
    run.close()
    cfg = tmp / "agentd.toml"
    cfg.write_text(f'state_dir = "{state}"\nnode = "node-a"\n')
    return cfg


def png(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def test_the_scenario_renders_a_picture_of_the_size_asked_that_is_not_blank(node: Path, tmp_path: Path) -> None:
    out = tmp_path / "node.png"
    result = CliRunner().invoke(plot_command, ["--config", str(node), "--since", "1h", "--out", str(out),
                                               "--width", "1000", "--height", "800"])
    assert result.exit_code == 0, result.output
    assert f"{out} (1000x800)" in result.output
    img = png(out)
    assert img.size == (1000, 800)
    from PIL import ImageStat

    stat = ImageStat.Stat(img.convert("L"))
    assert stat.stddev[0] > 20, "the picture is (nearly) one colour"
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # lines in several colours, text, grid
    assert not list(tmp_path.glob(".*tmp")), "the temporary file was left behind"


def test_what_is_drawn_is_what_the_store_holds(node: Path) -> None:
    state = Path(node.read_text().split('"')[1])
    with StoreReader(state / "store.sqlite") as reader:
        data = plot.read_store(reader, None, None)
        rows = [parse_line(line) for chunk in reader.chunks(PointFilter(("gpu",))) for _, _, line in chunk]
    assert sorted(data.power_w) == ["0", "1", "2", "3"]
    assert sum(len(a.ts) for a in data.power_w.values()) == len(rows) == int(SECONDS) * 4
    assert data.thresholds_c == {"slowdown_c": 87.0, "shutdown_c": 92.0}  # the simulator's, from gpu_info
    assert data.budget_w.values and max(data.budget_w.values) <= 2800
    assert {"facility cdu-1", "tcs cdu-1", "tcs rack-a manifold"} <= set(data.supply_c)
    assert any(e.rule == "tcs_supply_hot" and e.state == "firing" for e in data.events)
    ts, total = plot.node_totals(data.power_w)
    assert len(ts) == int(SECONDS)
    first = {gpu: acc.values[0] for gpu, acc in data.power_w.items()}
    assert total[0] == pytest.approx(sum(first.values()))


def test_buckets_average_and_keep_short_series_as_they_are() -> None:
    ts = [float(i) for i in range(10)]
    assert plot.buckets(ts, ts, 0.0, 9.0, n=20) == (ts, ts)
    bts, bvs = plot.buckets(ts, [1.0] * 5 + [3.0] * 5, 0.0, 10.0, n=2)
    assert bvs == [1.0, 3.0] and bts == [2.0, 7.0]


def test_without_matplotlib_it_says_how_to_install_it(node: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "x.png"
    result = CliRunner().invoke(plot_command, ["--config", str(node), "--out", str(out)])
    assert result.exit_code == 1
    assert "pip install 'gpu-agentd[plot]'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args,code,message", [
    (["--since", "0s"], 2, "a duration must be positive"),
    (["--since", "yesterday"], 2, "expected a duration back from now"),
    (["--since", "2026-01-01T00:00:00"], 2, "give the time zone"),
    (["--since", "10m", "--until", "1h"], 2, "is not before --until"),
    (["--width", "10"], 2, "10 is not in the range 400<=x<=8000"),
    (["--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z"], 1, "no gpu points in"),
])
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(node: Path, tmp_path: Path, args: list[str],
                                                                       code: int, message: str) -> None:
    out = tmp_path / "x.png"
    result = CliRunner().invoke(plot_command, ["--config", str(node), "--out", str(out), *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_a_missing_store_or_folder_is_named(tmp_path: Path, node: Path) -> None:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "nothing"}"\n')
    result = CliRunner().invoke(plot_command, ["--config", str(cfg), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no such file" in result.output and str(tmp_path / "nothing") in result.output
    result = CliRunner().invoke(plot_command, ["--config", str(node), "--out", str(tmp_path / "no" / "x.png")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_an_invalid_config_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text("intervall = 1\n")
    result = CliRunner().invoke(plot_command, ["--config", str(cfg), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "intervall" in result.output
