"""The README's commands, exactly as written, in a fresh working directory.

The commands are read from the README itself (the ```bash blocks of its "Running", "The
distributor's workflow" and "Collusion sweep" sections), so an edit there cannot drift from what
is tested. They run in order, as one user's shell session would (``source`` and ``export`` lines
carry over), in an empty temporary directory whose ``.venv`` is the environment running the tests.
The only change: ``debug=tiny`` is appended to the ``+experiment=`` commands that do not name a
``debug`` option, because the real runs take minutes to half an hour. No ``hydra.sweep.dir``, no
``hydra.run.dir``: the project's headline command once failed for every new user because every
test passed one.

Each command must exit 0 and write what the README says it writes; a command with no check below
fails the test, so a new README command needs one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fingerprint_lm.attacks.cases import BUILTIN_ATTACKS
from fingerprint_lm.models.checkpoint import shipped_checkpoint
from tests.conftest import ROOT

README = ROOT / "README.md"
SECTIONS = ("Running", "The distributor's workflow", "Collusion sweep")
SUMMARY_FILES = ("summary.csv", "summary.md", "collusion_psnr.png", "collusion_fid_proxy.png",
                 "bit_acc_vs_strength.png")


def readme_blocks(text: str, sections=SECTIONS) -> list[list[str]]:
    """The command lines of each ```bash block under the ``## <section>`` headings (in README order,
    backslash continuations joined, comments and blank lines dropped)."""
    blocks = []
    for heading, body in re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        if heading.strip() not in sections:
            continue
        for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
            joined = re.sub(r"\\\n\s*", "", block)
            lines = [line.strip() for line in joined.splitlines()]
            blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def as_tested(command: str) -> str:
    """The command as this test runs it: ``debug=tiny`` appended to an experiment without one."""
    words = command.split("#")[0].split()
    if any(w.startswith("+experiment=") for w in words) and not any(w.startswith("debug=") for w in words):
        return f"{command.split('#')[0].rstrip()} debug=tiny"
    return command


# -- what each command writes (README text next to the command) -------------------------------------
def _newest(pattern: str, workdir: Path) -> Path:
    found = sorted(workdir.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"nothing matches {pattern}"
    return found[-1]


def _check_training_run(workdir: Path, command: str, new: set[Path]) -> None:
    # "Every run writes into outputs/runs/<date>_<time>/: metrics.json, training_curve.csv/.png,
    # fingerprint_model/ (safetensors), checkpoints/last.ckpt and the logger's files"
    runs = {p.relative_to(workdir).parts[:3] for p in new if p.parts[-1] == "metrics.json"}
    assert len(runs) == 1, f"expected one new run dir, got {runs}"
    run_dir = workdir.joinpath(*runs.pop())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir.name)
    for name in ("metrics.json", "training_curve.csv", "training_curve.png", "checkpoints/last.ckpt",
                 "fingerprint_model/fingerprint.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "fingerprint_model").glob("*.safetensors"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    bits = re.search(r"fingerprint_bits=(\d+)", command)
    expected_bits = int(bits.group(1)) if bits else (32 if "smoke" in command else 48)
    assert metrics["fingerprint_bits"] == expected_bits
    assert {"bit_acc", "psnr", "ssim", "steps"} <= set(metrics)
    if "logger=csv" in command:
        assert list(run_dir.glob("csv/**/metrics.csv")), "logger=csv writes its metrics.csv"
    recorded = json.loads((run_dir / "fingerprint_model" / "fingerprint.json").read_text())
    assert recorded["method"] == ("carrier" if "method=carrier" in command else "pnm")  # pnm: the default
    if "wc_steps=0" in command:  # the run's composed config, as Hydra saved it
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").method.train.wc_steps == 0


def _check_sweep(workdir: Path, command: str, new: set[Path]) -> None:
    # "written to outputs/multiruns/<date>_<time>/ ... summary.csv, summary.md and the plots"
    sweep_dir = _newest("outputs/multiruns/*/summary.csv", workdir).parent
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", sweep_dir.name)
    for name in SUMMARY_FILES:
        assert (sweep_dir / name) in new, f"{name} not written"
    points = sorted(sweep_dir.glob("*/metrics.json"))
    assert len(points) == 2  # debug=tiny's grid
    rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + len(points)


def _check_plugin_sweep(workdir: Path, command: str, new: set[Path]) -> None:
    # an attack registered from the command line (conf/attacks/) is a case of the grid like a built-in one
    sweep_dir = _newest("outputs/multiruns/*/summary.csv", workdir).parent
    assert (sweep_dir / "summary.csv") in new
    points = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    cases = re.search(r'sweep\.grid\.case="([^"]+)"', command).group(1).split(",")
    assert sorted(p["case"] for p in points) == sorted(cases)  # debug=tiny: one method and ACT type
    kind = re.search(r"\+attacks\.(\w+)\.", command).group(1)
    plugin = [p for p in points if p["attack"] not in BUILTIN_ATTACKS]
    assert len(plugin) == 1 and plugin[0]["attack_kind"] == kind  # filed under its kind by the point itself
    assert 0.0 < plugin[0]["psnr"] < 60.0  # the attack changed the images


def _check_summarize(workdir: Path, command: str, new: set[Path]) -> None:
    sweep_dir = _newest("outputs/multiruns/*/summary.csv", workdir).parent
    assert {sweep_dir / name for name in SUMMARY_FILES} <= new, "the newest sweep's summary is rewritten"


def _task_json(workdir: Path, task: str, new: set[Path]) -> dict:
    written = [p for p in new if p.name == f"{task}.json" and "outputs/runs" in p.as_posix()]
    assert len(written) == 1, f"{task}.json: {written}"
    return json.loads(written[0].read_text())


def _check_issue(workdir: Path, command: str, new: set[Path]) -> None:
    # "copies/alice/ (stock diffusers files) + registry row; code screened"
    assert sorted(p.name for p in (workdir / "copies" / "alice").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    assert (workdir / "registry" / "registry.sqlite").is_file()
    issued = _task_json(workdir, "issue", new)
    assert issued["user_id"] == "alice" and issued["code_draws"] >= 1 and issued["screen_by"] == "predicted"
    assert issued["predicted_psnr"] >= 29.9 and issued["predicted_bit_acc"] >= issued["screen"]["min_predicted_bit_acc"]


def _check_users(workdir: Path, command: str, new: set[Path]) -> None:
    users = _task_json(workdir, "users", new)
    assert [u["user_id"] for u in users["users"]] == ["alice"]


def _check_generate(workdir: Path, command: str, new: set[Path]) -> None:
    pngs = sorted((workdir / "alice_images").glob("*.png"))
    assert len(pngs) == 16 and set(pngs) <= new


def _check_attribute(workdir: Path, command: str, new: set[Path]) -> None:
    # "per image: bits, user_id, matching_bits, p_value, accused"
    result = _task_json(workdir, "attribute", new)
    images = result["images"]
    assert len(images) == 16
    # alice's code was screened: the p-values are divided by the smaller of the registry's pass rate (1 / the
    # draws her code took) and the shipped checkpoint's fitted rates (distributor/screening.py: bound_pass_rate)
    draws = json.loads(_newest("outputs/runs/*/issue.json", workdir).read_text())["code_draws"]
    fitted = json.loads((shipped_checkpoint("embedded_pnm") / "fingerprint.json").read_text())["issue_screen"]
    expected = min(1 / draws, fitted["pass_rate"], fitted["predictor"]["pass_rate"])
    assert result["screen_pass_rate"] == pytest.approx(expected)
    assert result["uniform_code_fpr"] == pytest.approx(result["fpr"] * result["screen_pass_rate"])
    assert all({"bits", "user_id", "matching_bits", "p_value", "accused"} <= set(i) for i in images)
    assert sum(i["user_id"] == "alice" for i in images) >= 15  # the shipped model reads alice's copy


def _check_trace(workdir: Path, command: str, new: set[Path]) -> None:
    # "ranked suspects: user_id, score, accused"
    suspects = _task_json(workdir, "trace", new)["suspects"]
    assert suspects and suspects[0]["user_id"] == "alice"
    assert all({"user_id", "score", "accused"} <= set(s) for s in suspects)


def _check_verify(workdir: Path, command: str, new: set[Path]) -> None:
    assert _task_json(workdir, "verify", new)["ok"] is True


CHECKS: list[tuple[str, Callable[[Path, str, set[Path]], None]]] = [
    (r"\+experiment=collusion_sweep(?!.*\+attacks\.)", _check_sweep),
    (r"\+experiment=collusion_sweep.*\+attacks\.(image|merge)\.", _check_plugin_sweep),
    (r"\+experiment=(smoke|train)", _check_training_run),
    (r"fingerprint_lm\.report\.summarize", _check_summarize),
    (r"task=issue ", _check_issue),
    (r"task=users", _check_users),
    (r"task=generate ", _check_generate),
    (r"task=attribute ", _check_attribute),
    (r"task=trace ", _check_trace),
    (r"task=verify ", _check_verify),
]


def check_for(command: str):
    matches = [check for pattern, check in CHECKS if re.search(pattern, command)]
    assert len(matches) == 1, f"README command without exactly one check in {__name__}: {command}"
    return matches[0]


def _files(workdir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and ".venv" not in p.parts}


def _fresh_workdir(tmp_path: Path) -> Path:
    """An empty directory whose ``.venv`` is the environment running the tests."""
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        (workdir / ".venv").symlink_to(sys.prefix)
    else:  # not a venv (e.g. a conda env): an activate script that puts this Python first
        (workdir / ".venv" / "bin").mkdir(parents=True)
        (workdir / ".venv" / "bin" / "activate").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n'
        )
    return workdir


def test_readme_blocks_are_found_and_every_command_has_a_check():
    blocks = readme_blocks(README.read_text())
    commands = [c for block in blocks for c in block if not c.startswith(("source ", "export "))]
    assert len(blocks) == 3 and len(commands) >= 10
    assert ("python -m fingerprint_lm +experiment=collusion_sweep debug=tiny"
            in [c.split("#")[0].strip() for c in commands])
    for command in commands:
        check_for(command)
        assert "hydra.sweep.dir" not in command and "hydra.run.dir" not in command


def test_as_tested_appends_debug_tiny_only_to_experiments_without_a_debug_option():
    assert as_tested("python -m fingerprint_lm +experiment=smoke   # note") == (
        "python -m fingerprint_lm +experiment=smoke debug=tiny"
    )
    assert as_tested("python -m fingerprint_lm +experiment=x debug=fast") == (
        "python -m fingerprint_lm +experiment=x debug=fast"
    )
    assert as_tested("python -m fingerprint_lm task=users") == "python -m fingerprint_lm task=users"


def test_every_readme_command_runs_as_written_in_a_fresh_directory(tmp_path):
    workdir = _fresh_workdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINGERPRINT_LM_", "HYDRA_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    session: list[str] = []  # `source` / `export` lines: a user's shell keeps them
    for block in readme_blocks(README.read_text()):
        for command in block:
            if command.startswith(("source ", "export ")):
                session.append(command)
                continue
            check = check_for(command)
            before = _files(workdir)
            script = "\n".join(["set -e", *session, as_tested(command)])
            out = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
            after = _files(workdir)
            new = {p for p, mtime in after.items() if before.get(p) != mtime}
            try:
                check(workdir, command, new)
            except AssertionError as exc:
                pytest.fail(f"{command}: {exc}")
