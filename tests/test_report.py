"""``task=report``: run folders, sweep dirs and W&B runs -> comparison.csv/.md and plots; W&B
online/offline from the environment."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.report import compare, wandb_log
from fingerprint_lm.report import runs as run_records
from fingerprint_lm.resolvers import wandb_offline
from fingerprint_lm.tasks import run
from tests.conftest import ROOT, compose_config
from tests.console import run_console

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Longer than one 32 KiB block of the W&B log: its config record is split into chunks.
LONG_NOTE = "fingerprint " * 6000


def write_run(directory: Path, metrics: dict, config: dict | None = None) -> Path:
    """A run folder as ``task=train`` leaves it: metrics.json and Hydra's .hydra/config.yaml."""
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def train_config(steps: int, output_dir: str) -> dict:
    return {
        "task": "train",
        "seed": 0,
        "method": {"steps": steps, "train": {"lr": 0.001}},
        "paths": {"output_dir": output_dir},  # differs per run, but is a path: never a column
        "logger": {"offline": "${fingerprint_lm.wandb_offline:}"},
    }


@pytest.fixture(scope="module")
def wandb_run_dir(tmp_path_factory) -> Path:
    """One offline run written by the real wandb library (its transaction log only)."""
    # defers the heavy import of wandb (seconds; nothing else here loads it): only its tests pay for it
    import wandb

    root = tmp_path_factory.mktemp("wandb_runs")
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        wb = wandb.init(
            mode="offline",
            dir=str(root),
            project="fingerprint_lm",
            group="sweep_a",
            config={"method": {"steps": 300}, "seed": 0, "notes": LONG_NOTE},
        )
        wb.log({"eval/bit_acc": 0.5, "eval/psnr": 20.25, "train/bit_acc": 0.125})
        wb.log({"eval/bit_acc": 0.96875})
        wb.config.update({"extra": "late"})
        wandb.finish()
    finally:
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_compares_run_folders_and_an_offline_wandb_run(tmp_path, wandb_run_dir):
    run_a = write_run(
        tmp_path / "runs" / "a",
        {
            "bit_acc": 0.91,
            "psnr": 30.5,
            "ssim": 0.953125,
            "train_seconds": 12.0,
            "fingerprint_bits": 48,
            "checkpoint": "/somewhere",
        },
        train_config(100, "/out/a"),
    )
    run_b = write_run(
        tmp_path / "runs" / "b",
        {"bit_acc": 0.995, "psnr": 28.125, "ssim": 0.9, "train_seconds": 20.5, "fingerprint_bits": 48},
        train_config(200, "/out/b"),
    )
    cfg = compose_config(
        tmp_path, ["task=report", f"report.runs=[{run_a},{run_b},{wandb_run_dir}]"], tiny=False
    )
    result = run(cfg)

    out = tmp_path / "run" / "report"
    assert result["runs"] == 3 and Path(result["output_dir"]) == out
    rows = read_csv(out / "comparison.csv")
    # config: only method.steps differs (seed is equal, task/lr only in two runs and equal there,
    # paths.* ignored); metrics: attribution_acc and fid_proxy are in no run, so no column
    assert list(rows[0]) == ["run", "source", "method.steps", "bit_acc", "psnr", "ssim", "train_seconds"]
    # named by their paths below the common parent of all three folders
    assert rows[0]["run"].endswith("runs/a") and rows[1]["run"].endswith("runs/b")
    assert rows[2]["run"].endswith(f"wandb/{wandb_run_dir.name}")
    assert [r["source"] for r in rows] == [str(run_a), str(run_b), str(wandb_run_dir)]
    assert [r["method.steps"] for r in rows] == ["100", "200", "300"]
    assert [float(r["bit_acc"]) for r in rows] == [0.91, 0.995, 0.96875]  # W&B: last eval/ value
    assert [float(r["psnr"]) for r in rows] == [30.5, 28.125, 20.25]
    assert [r["ssim"] for r in rows] == ["0.953125", "0.9", ""]
    assert [r["train_seconds"] for r in rows] == ["12.0", "20.5", ""]

    markdown = (out / "comparison.md").read_text()
    assert "| run | method.steps | bit_acc | psnr | ssim | train_seconds |" in markdown
    assert f"| {rows[0]['run']} | 100 | 0.91 | 30.5 | 0.9531 | 12 |" in markdown
    for name in (
        "bar_bit_acc.png",
        "bar_psnr.png",
        "bar_ssim.png",
        "bar_train_seconds.png",
        "quality_vs_bit_acc.png",
    ):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "comparison.csv",
            "comparison.md",
            "bar_bit_acc.png",
            "bar_psnr.png",
            "bar_ssim.png",
            "bar_train_seconds.png",
            "quality_vs_bit_acc.png",
        ]
    )  # no staging folder left behind


def test_wandb_transaction_log_replays_config_and_summary(wandb_run_dir):
    (log,) = wandb_run_dir.glob("run-*.wandb")
    assert log.stat().st_size > 32 * 1024  # the long config record crosses a block boundary
    state = wandb_log.read_wandb_transaction_log(log)
    assert state["group"] == "sweep_a" and state["run_id"] in log.name
    assert state["config"]["notes"] == LONG_NOTE
    assert state["config"]["method"] == {"steps": 300} and state["config"]["extra"] == "late"
    summary = run_records.numeric_metrics(state["summary"])
    assert summary == {"eval/bit_acc": 0.96875, "eval/psnr": 20.25, "train/bit_acc": 0.125}

    record = run_records.read_wandb_run_dir(wandb_run_dir)
    assert record.config["wandb.group"] == "sweep_a" and record.config["method.steps"] == 300
    assert compare.metric_value(record, "bit_acc") == 0.96875  # eval/ before train/


def test_wandb_run_dir_with_summary_file_and_wandb_folder(tmp_path):
    """The files/ layout (online runs, older wandb): files/wandb-summary.json + files/config.yaml."""
    for name, steps, acc in (("run-1-aaa", 10, 0.75), ("run-2-bbb", 20, 0.875)):
        files = tmp_path / "wandb" / name / "files"
        files.mkdir(parents=True)
        (files / "wandb-summary.json").write_text(
            json.dumps({"sweep/bit_acc": acc, "sweep/psnr": 31.0, "_step": 3, "_wandb": {"runtime": 2}})
        )
        (files / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "_wandb": {"value": {"cli_version": "x"}},
                    "method": {"desc": None, "value": {"steps": steps}},
                }
            )
        )
    paths, _ = compare.write_report(run_records.collect_local_runs(tmp_path / "wandb"), tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "comparison.csv")
    assert [(r["run"], r["method.steps"], r["bit_acc"], r["psnr"]) for r in rows] == [
        ("run-1-aaa", "10", "0.75", "31.0"),
        ("run-2-bbb", "20", "0.875", "31.0"),
    ]
    assert "bar_psnr.png" in {p.name for p in paths}


def test_sweep_dir_without_hydra_config_and_all_metrics(tmp_path):
    sweep = tmp_path / "multiruns" / "s1"
    write_run(
        sweep / "0", {"act": "none", "case": "average_c2", "colluders": 2, "bit_acc": 0.5, "psnr": 12.0}
    )
    write_run(
        sweep / "1", {"act": "all", "case": "average_c2", "colluders": 2, "bit_acc": 0.625, "psnr": 9.5}
    )
    (sweep / "multirun.yaml").write_text("{}")
    paths, table = compare.write_report(run_records.collect_local_runs(sweep), tmp_path / "out", metrics=None)
    rows = read_csv(tmp_path / "out" / "comparison.csv")
    assert list(rows[0]) == ["run", "source", "act", "bit_acc", "colluders", "psnr"]
    assert [(r["run"], r["act"], r["bit_acc"], r["psnr"]) for r in rows] == [
        ("0", "none", "0.5", "12.0"),
        ("1", "all", "0.625", "9.5"),
    ]
    assert table.splitlines()[0] == "| run | act | bit_acc | colluders | psnr |"


def test_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path, monkeypatch):
    good = write_run(tmp_path / "good", {"bit_acc": 0.9, "psnr": 30.0})
    out = tmp_path / "out"

    with pytest.raises(DataError, match="no run folder at"):
        run_records.collect_local_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to compare in"):
        run_records.collect_local_runs(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        run_records.collect_local_runs(corrupt)
    no_numbers = write_run(tmp_path / "no_numbers", {"act": "none", "checkpoint": "/x"})
    runs = run_records.collect_local_runs(good) + run_records.collect_local_runs(no_numbers)
    with pytest.raises(DataError, match="has no numeric metrics"):
        compare.write_report(runs, out)
    with pytest.raises(DataError, match="none of report.metrics"):
        compare.write_report(run_records.collect_local_runs(good), out, metrics=["fid_proxy"])
    not_a_log = tmp_path / "fake" / "run-x.wandb"
    not_a_log.parent.mkdir()
    not_a_log.write_bytes(b"garbage!")
    with pytest.raises(DataError, match="not a W&B transaction log"):
        run_records.collect_local_runs(not_a_log.parent)
    assert not out.exists() or not any(out.iterdir())

    # a failure while plotting leaves the previous report as it was, and no staging folder
    compare.write_report(run_records.collect_local_runs(good), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_plot(*args, **kwargs):
        raise DataError("plot failed")

    monkeypatch.setattr(compare, "_plot_scatter", broken_plot)
    other = write_run(tmp_path / "other", {"bit_acc": 0.5, "psnr": 20.0})
    with pytest.raises(DataError, match="plot failed"):
        compare.write_report(run_records.collect_local_runs(good) + run_records.collect_local_runs(other), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_report_config_errors(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, ["task=report"], tiny=False)
    with pytest.raises(ConfigError, match="nothing to compare"):
        run(cfg)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_config(tmp_path, ["task=report", "report.wandb_path=me/proj"], tiny=False)
    with pytest.raises(ConfigError, match="needs WANDB_API_KEY"):
        run(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    cfg = compose_config(tmp_path, ["task=report", "report.wandb_path=just_a_project"], tiny=False)
    with pytest.raises(ConfigError, match="entity/project"):
        run(cfg)


class FakeRun:
    def __init__(self, run_id, name, group, config, summary):
        self.id, self.name, self.group, self.config = run_id, name, group, config
        self.summary_metrics = summary
        self.url = f"https://wandb.example/me/proj/runs/{run_id}"


class FakeApi:
    """Stands in for ``wandb.Api``: records the query, returns fixed runs (no network)."""

    queries: list = []

    def __init__(self, timeout=None):
        pass

    def runs(self, path, filters=None):
        FakeApi.queries.append((path, filters))
        return [
            FakeRun(
                "r1",
                "point-0",
                "sweep_a",
                {"act": {"type": "none"}, "seed": 0},
                {"sweep/bit_acc": 0.99, "sweep/psnr": 30.0, "sweep/fid_proxy": 4.5, "_step": 0},
            ),
            FakeRun(
                "r2",
                "point-1",
                "sweep_a",
                {"act": {"type": "all"}, "seed": 0},
                {"sweep/bit_acc": 0.98, "sweep/psnr": 11.0, "sweep/fid_proxy": 80.25, "_step": 0},
            ),
        ]


def test_report_from_the_wandb_api_with_a_fake_client(tmp_path, monkeypatch):
    # defers the heavy import of wandb (seconds; nothing else here loads it): only its tests pay for it
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.queries.clear()
    cfg = compose_config(
        tmp_path,
        [
            "task=report",
            "report.wandb_path=me/proj",
            "report.group=sweep_a",
            "report.filters={state:finished}",
        ],
        tiny=False,
    )
    result = run(cfg)
    assert FakeApi.queries == [("me/proj", {"state": "finished", "group": "sweep_a"})]
    assert result["runs"] == 2
    rows = read_csv(tmp_path / "run" / "report" / "comparison.csv")
    assert list(rows[0]) == ["run", "source", "act.type", "bit_acc", "psnr", "fid_proxy"]
    assert [(r["run"], r["act.type"], r["bit_acc"], r["fid_proxy"]) for r in rows] == [
        ("point-0", "none", "0.99", "4.5"),
        ("point-1", "all", "0.98", "80.25"),
    ]
    assert rows[1]["source"] == "https://wandb.example/me/proj/runs/r2"

    class FailingApi(FakeApi):
        def runs(self, path, filters=None):
            raise wandb.errors.CommError("Could not find project proj")

    monkeypatch.setattr(wandb, "Api", FailingApi)
    with pytest.raises(DataError, match="W&B API, me/proj: Could not find project proj"):
        run(cfg)


@pytest.mark.parametrize(
    ("api_key", "mode", "offline"),
    [
        (None, None, True),
        ("not-a-real-key", None, False),
        ("not-a-real-key", "offline", True),
        ("not-a-real-key", "disabled", True),
        (None, "online", False),
    ],
)
def test_wandb_logger_is_online_only_with_an_api_key(tmp_path, monkeypatch, api_key, mode, offline):
    for name, value in (("WANDB_API_KEY", api_key), ("WANDB_MODE", mode)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert wandb_offline() is offline
    cfg = compose_config(tmp_path, ["logger=wandb"])
    assert instantiate(cfg.logger)._offline is offline  # builds the logger only: nothing is sent


def test_explicit_offline_setting_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert (
        instantiate(compose_config(tmp_path, ["logger=wandb", "logger.offline=true"]).logger)._offline is True
    )
    monkeypatch.delenv("WANDB_API_KEY")
    assert (
        instantiate(compose_config(tmp_path, ["logger=wandb", "logger.offline=false"]).logger)._offline
        is False
    )


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m fingerprint_lm task=report *overrides`` (in this interpreter: tests/console.py)."""
    return run_console(["task=report", f"hydra.run.dir={tmp_path / 'out'}", *overrides], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_bad_path_is_one_line_and_exit_2(tmp_path):
    run_a = write_run(tmp_path / "a", {"bit_acc": 0.75, "psnr": 25.0}, train_config(1, "/a"))
    bad = cli(tmp_path, f"report.runs=[{run_a},{tmp_path / 'missing'}]")
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: no run folder at {tmp_path / 'missing'}"
    assert not (tmp_path / "out" / "report").exists()


def test_cli_report_writes_the_comparison(tmp_path):
    run_a = write_run(tmp_path / "a", {"bit_acc": 0.75, "psnr": 25.0}, train_config(1, "/a"))
    run_b = write_run(tmp_path / "b", {"bit_acc": 0.875, "psnr": 27.0}, train_config(2, "/b"))
    ok = cli(tmp_path, f"report.runs=[{run_a},{run_b}]")
    assert ok.returncode == 0, ok.stderr
    assert "| a | 1 | 0.75 | 25 |" in ok.stdout
    assert [r["method.steps"] for r in read_csv(tmp_path / "out" / "report" / "comparison.csv")] == ["1", "2"]
