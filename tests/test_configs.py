"""Every experiment composes; the config tree follows docs/design.md ("Coding style")."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, parse_case
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.config_schema import DATA_SCHEMAS, SCHEMAS, read_run_settings, read_settings
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.tasks import TASKS
from fingerprint_lm.tasks import compose as scripts_compose
from fingerprint_lm.tasks.sweep_point import point_settings
from fingerprint_lm.tasks.wrapper import Task, run_task
from tests.conftest import CONF, ROOT, compose_config
from tests.console import run_console

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert {"smoke", "train"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(tmp_path, experiment):
    cfg = compose_config(tmp_path, [f"+experiment={experiment}"], tiny=False)
    recipe = yaml.safe_load((CONF / "recipe" / f"{experiment}.yaml").read_text()) or {}
    literal = {key: recipe[key] for key in ("fingerprint_bits", "seed") if key in recipe}
    literal.update({f"method.{k}": v for k, v in (recipe.get("method") or {}).items()
                    if not isinstance(v, dict | str)})  # the recipe's own numbers, not interpolations
    assert literal and all(OmegaConf.select(cfg, key) == value for key, value in literal.items()), literal
    assert cfg.data._target_.endswith("ImageDataModule")
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiments are global packages (docs/design.md)"


def test_config_yaml_does_not_list_experiment():
    text = (CONF / "config.yaml").read_text()
    assert "experiment" not in text.split("defaults:")[1].split("_self_")[0]


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", "auto"])
def test_trainer_profiles_compose(tmp_path, trainer):
    cfg = compose_config(tmp_path, [f"trainer={trainer}"], tiny=False)
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer == "ddp_sim":
        assert cfg.trainer.strategy.startswith("ddp_spawn") and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_loggers_instantiate(tmp_path, logger):
    cfg = compose_config(tmp_path, [f"logger={logger}"])
    built = instantiate(cfg.logger) if cfg.logger else None
    assert (built is None) == (logger == "none")
    if logger == "wandb":
        assert built._offline is True and Path(built.save_dir) == tmp_path / "run"


def test_paths_and_run_dirs_resolve_without_hydra_config(tmp_path, monkeypatch):
    """Hydra's sweepers resolve hydra.sweep.dir before any job has a HydraConfig: nothing it reads
    may need one (the README's sweep command once failed for every new user on exactly this)."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=collusion_sweep"], return_hydra_config=True)
    assert not HydraConfig.initialized()
    assert str(cfg.hydra.sweep.dir).startswith(str(tmp_path / "outputs" / "multiruns") + "/")
    assert str(cfg.hydra.run.dir).startswith(str(tmp_path / "outputs" / "runs") + "/")
    for key in ("root_dir", "data_dir", "log_dir", "cache_dir", "export_dir"):
        assert Path(str(cfg.paths[key])).is_absolute(), key
    assert Path(str(cfg.paths.export_dir)) == ROOT / "fingerprint_lm" / "assets" / "embedded_pnm"  # the default method


@pytest.mark.parametrize("method", sorted(path.stem for path in (CONF / "method").glob("*.yaml")))
def test_scripts_read_each_method_as_a_run_composes_it(tmp_path, method):
    """experiments/ and bench_sd take a method's settings through tasks/compose.py, not by loading
    its YAML: what they read is the run's composed ``method`` node, overrides included."""
    composed = compose_config(tmp_path, [f"method={method}", "fingerprint_bits=32"], tiny=False).method
    read = scripts_compose.method_config(method, ["fingerprint_bits=32"])
    assert OmegaConf.to_container(read, resolve=True) == OmegaConf.to_container(composed, resolve=True)
    assert read.name == method


def test_a_script_composed_run_resolves_its_paths_at_the_output_dir_it_names(tmp_path):
    cfg = scripts_compose.compose_config(["+experiment=train", "seed=3"], tmp_path / "out")
    OmegaConf.resolve(cfg.paths)
    assert Path(cfg.paths.output_dir) == tmp_path / "out" and cfg.seed == 3
    assert Path(cfg.paths.root_dir) == ROOT and cfg.hydra.runtime.cwd == str(ROOT)
    with pytest.raises(Exception, match="method=nonesuch|nonesuch"):
        scripts_compose.method_config("nonesuch")


def test_debug_overlays_shrink_an_experiment_and_the_command_line_still_wins(tmp_path):
    sweep = compose_config(tmp_path, ["+experiment=collusion_sweep"], tiny=False)
    tiny = compose_config(tmp_path, ["+experiment=collusion_sweep", "debug=tiny"], tiny=False)
    fast = compose_config(tmp_path, ["+experiment=collusion_sweep", "debug=fast"], tiny=False)
    # the default method (pnm) at its shipped steps; the grid's method axis sets each point's
    assert len(str(sweep.sweep.grid.case).split(",")) == 29 and sweep.method.steps == sweep.method.shipped_steps
    assert (tiny.sweep.grid.fingerprint_bits, tiny.sweep.grid.act) == ("48", "all")
    assert len(str(tiny.sweep.grid.case).split(",")) == 2 and tiny.method.steps == 20
    assert len(str(fast.sweep.grid.act).split(",")) * len(str(fast.sweep.grid.case).split(",")) == 6
    assert list(tiny.model.vae_config.block_out_channels) == [8, 16] and tiny.data.resolution == 16
    train = compose_config(tmp_path, ["+experiment=train", "debug=tiny", "method.steps=7", "logger=csv"], tiny=False)
    assert train.method.steps == 7 and train.logger._target_.endswith("CSVLogger")
    assert train.fingerprint_bits == 48 and train.eval.max_images == 64


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+experiment=nope", "unknown experiment 'nope' (choose one of: collusion_sweep, smoke, train)"),
        ("act=nope", "unknown act 'nope' (choose one of: all, none, permute, scale, sign)"),
        ("debug=huge", "unknown debug 'huge' (choose one of: fast, none, tiny)"),
        ("fingerprint_bits=[1,2", "cannot parse the override 'fingerprint_bits=[1,2'"),
        ("no_such_key=3", "Could not override 'no_such_key'"),
        ("task=nope", "unknown task 'nope' (choose one of: attribute, generate, issue, report,"),
        ("user_id=alice", "user_id= is an argument of task=issue | text2image_eval | verify only"),
        ("distributor.fpr=abc", "Error merging override distributor.fpr=abc (Value 'abc' of type 'str' could not"),
    ],
)
def test_hydra_errors_are_one_error_line_with_exit_code_2(tmp_path, override, expected):
    out = run_console([override], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), out.stderr
    assert not (tmp_path / "outputs").exists()  # nothing written


def test_training_probes_and_the_sweep_use_one_set_of_attack_names(default_cfg):
    """Every training run's robustness probes are image cases of the sweep's default grid, so a
    ``robust/<case>`` figure and the sweep's row of that case mean the same attack."""
    sweep_cases = str(default_cfg.sweep.grid.case).split(",")
    image_cases = [case for case in sweep_cases if parse_case(case)[0] in IMAGE_ATTACKS]
    assert image_cases == list(ROBUSTNESS_SUITE)


def test_each_task_takes_only_its_own_arguments(tmp_path):
    issue = compose_config(tmp_path, ["task=issue", "user_id=alice"])
    assert issue.task == "issue" and issue.user_id == "alice" and "images" not in issue
    assert compose_config(tmp_path, ["task=attribute", "images=x.png"]).images == "x.png"
    train = compose_config(tmp_path, [])
    assert train.task == "train" and not {"user_id", "images", "copy", "out"} & set(train)
    assert train.text2image.user_id is None  # the group resolves without the task's arguments
    assert compose_config(tmp_path, ["+experiment=collusion_sweep"], tiny=False).task == "sweep_point"
    tasks = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    assert tasks == sorted(TASKS)  # one config file per command of the table
    assert all(task.name == name for name, task in TASKS.items())  # logs and errors name the command typed


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_each_settings_group_is_typed_by_its_schema(default_cfg, group):
    """The group's YAML file extends its dataclass, and the values the file sets pass its checks."""
    assert OmegaConf.get_type(default_cfg[group]) is SCHEMAS[group]
    settings = read_settings(default_cfg, group)
    assert isinstance(settings, SCHEMAS[group])
    # The file's literal scalars and the dataclass's defaults say the same (one reads either).
    defaults = {f.name: f.default for f in dataclasses.fields(SCHEMAS[group])}
    written = OmegaConf.load(CONF / group / f"{'all' if group == 'act' else 'default'}.yaml")  # the default option
    literal = {key: written[key] for key in written
               if key != "defaults" and not OmegaConf.is_interpolation(written, key)
               and not OmegaConf.is_config(written[key])}
    assert literal and {key: defaults[key] for key in literal} == literal


@pytest.mark.parametrize(
    ("override", "group", "expected"),
    [
        ("act.scope=everywhere", "act", "act.scope must be one of interior, stream, both"),
        ("act.scale_min=0", "act", "act.scale_min must be a finite number > 0, got 0.0"),
        ("act.scale_max=0.1", "act", "act.scale_max must be >= act.scale_min, got [0.25, 0.1]"),
        ("distributor.fpr=2", "distributor", "distributor.fpr must lie in (0, 1), got 2.0"),
        ("distributor.tracing=tardis", "distributor", "distributor.tracing must be one of evidence, tardos"),
        ("distributor.top=0", "distributor", "distributor.top must be a positive integer, got 0"),
        ("distributor.min_probe_bit_acc=2", "distributor",
         "distributor.min_probe_bit_acc must be a finite number <= 1"),
        ("distributor.min_probe_psnr=0", "distributor", "distributor.min_probe_psnr must be a finite number > 0"),
        ("distributor.decoding=fuzzy", "distributor",
         "distributor.decoding must be one of soft, soft_whitened, soft_code_null, hard"),
        ("sweep.images=coco", "sweep", "sweep.images must be one of procedural, data, got 'coco'"),
        ("text2image.fid=fast", "text2image", "text2image.fid must be one of auto, clean, proxy, off"),
        ("text2image.guidance_scale=-1", "text2image", "text2image.guidance_scale must be a finite number >= 0"),
        ("report.max_runs=0", "report", "report.max_runs must be a positive integer, got 0"),
    ],
)
def test_settings_ranges_are_checked_when_a_task_reads_them(tmp_path, override, group, expected):
    cfg = compose_config(tmp_path, [override])  # composes: the type is right, the range is not
    with pytest.raises(ConfigError, match=re.escape(expected)):
        read_settings(cfg, group)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sweep.finetune_lr=0", "sweep.finetune_lr must be a finite number > 0"),
        ("sweep.decoding=fuzzy", "sweep.decoding must be one of soft, soft_whitened, soft_code_null, hard"),
        ("sweep.screen_by=guess", "sweep.screen_by must be one of auto, probe, predicted"),
        ("sweep.fpr=2", "sweep.fpr must lie in (0, 1), got 2.0"),
        ("sweep.n_images=1", "sweep.n_images must be an integer >= 2, got 1"),
    ],
)
def test_a_sweep_points_ranges_are_the_evaluation_librarys_named_by_their_keys(tmp_path, override, expected):
    """PointSettings alone checks what it takes from sweep.*; the task names the key it came from."""
    cfg = compose_config(tmp_path, [override])
    read_settings(cfg, "sweep")  # the schema leaves these to the library
    with pytest.raises(ConfigError, match=re.escape(expected)):
        point_settings(cfg)


@pytest.mark.parametrize("act_type", sorted(p.stem for p in (CONF / "act").glob("*.yaml")))
def test_every_act_option_is_typed_and_names_its_type(tmp_path, act_type):
    cfg = compose_config(tmp_path, [f"act={act_type}"])
    assert OmegaConf.get_type(cfg.act) is SCHEMAS["act"]
    assert read_settings(cfg, "act").type == act_type


def test_a_plain_config_gets_the_same_checks(default_cfg):
    """Scripts and tests that build a config by hand are typed by the same schema."""
    plain = OmegaConf.create({"distributor": {**OmegaConf.to_container(default_cfg.distributor, resolve=True),
                                              "min_distance": "eight"}})
    with pytest.raises(ConfigError, match="distributor: Value 'eight' of type 'str' could not be converted"):
        read_settings(plain, "distributor")
    assert read_settings(OmegaConf.create({"distributor": {"registry": "r", "copies_dir": "c"}}),
                         "distributor").fpr == 1e-6


@pytest.mark.parametrize(("override", "expected"), [
    ({"fingerprint_bits": 0}, "fingerprint_bits must be a positive integer, got 0"),
    ({"seed": "abc"}, "seed must be an integer >= 0, got 'abc'"),
    ({"fingerprint_bits": "48"}, "fingerprint_bits must be a positive integer, got '48'"),  # as tasks read it
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"resume": "maybe"}, "resume: Value 'maybe' is not a valid bool"),
])
def test_the_top_level_keys_are_checked_once_for_every_task(default_cfg, override, expected):
    """run_task reads RunConfig before any task's body: a distributor task that never reads
    fingerprint_bits refuses 0 as training does, and nothing is written."""
    settings = read_run_settings(default_cfg)
    assert (settings.seed, settings.fingerprint_bits) == (default_cfg.seed, default_cfg.fingerprint_bits)
    bad = OmegaConf.merge(default_cfg, override)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        read_run_settings(bad)
    touched = []
    task = Task("probe", lambda cfg, context: touched.append(cfg) or {})
    with pytest.raises(ConfigError, match=re.escape(expected)):
        run_task(task, bad)
    assert touched == []


def test_text2image_fid_off_survives_yaml(tmp_path):
    """YAML 1.1 reads `fid: off` as false; the schema gives the task the word back."""
    cfg = compose_config(tmp_path, [])
    cfg.text2image.fid = False
    assert read_settings(cfg, "text2image").fid == "off"


@pytest.mark.parametrize("source", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_each_data_source_is_typed_by_its_schema_and_keeps_its_keys(tmp_path, source):
    """conf/data/<source>.yaml extends its own dataclass, which adds no key the file does not set:
    the sweep's cache keys hash the composed group, so a schema that added keys would retrain every
    cached model. Its range checks are the data module's own (one function)."""
    cfg = compose_config(tmp_path, [f"data={source}"], tiny=False)
    assert OmegaConf.get_type(cfg.data) is DATA_SCHEMAS[f"data_{source}"]
    written = OmegaConf.load(CONF / "data" / f"{source}.yaml")
    assert set(cfg.data) == set(written) - {"defaults"} and cfg.data.source == source
    bad = OmegaConf.merge(cfg.data, {"batch_size": 0, "coco_root": "x"} if "coco" in source else {"batch_size": 0})
    with pytest.raises(ConfigError, match="batch size must be a positive integer, got 0"):
        OmegaConf.to_object(bad)
    with pytest.raises(InstantiationException, match="batch size must be a positive integer, got 0"):
        instantiate(bad)


def test_data_types_and_keys_are_checked_while_composing(tmp_path):
    for override, expected in (("data.batch_size=abc", "could not be converted to Integer"),
                               ("data.batchsize=3", "Key 'batchsize' not in 'DataConfig'")):
        with pytest.raises(Exception) as caught:
            compose_config(tmp_path, [override])
        assert expected in f"{caught.value} {caught.value.__cause__}"
