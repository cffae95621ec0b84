"""The sweep's validation pass: hydra_plugins/fingerprint_lm_sweeper composes one job per swept
value before the first point, instead of every job of the grid."""

from __future__ import annotations

import itertools

import pytest
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
from hydra.plugins.sweeper import Sweeper

from fingerprint_lm.attacks.cases import attack_kind, parse_case
from hydra_plugins.fingerprint_lm_sweeper import (
    GRID_AXES,
    AxisCheckedSweeper,
    check_no_swept_grid_axis,
    check_skip_keys,
    covering_jobs,
    parse_skip_rule,
    skipped,
)
from tests.console import run_console


def test_a_few_jobs_cover_every_swept_value():
    axes = (["method=a", "method=b"], ["act=x", "act=y", "act=z"], [f"sweep.case={i}" for i in range(28)])
    batch = [list(job) for job in itertools.product(*axes)]
    kept = covering_jobs(batch)
    assert set().union(*map(set, kept)) == set().union(*map(set, batch))
    # each kept job brings a value no earlier one had: at most one job per value (33), not 168
    assert len(kept) <= sum(map(len, axes)) < len(batch)
    assert kept[0] == batch[0] and all(job in batch for job in kept)


def test_an_unquoted_list_for_a_grid_axis_is_refused_with_the_quoted_form():
    """Unquoted, Hydra sweeps the setting sweep.grid.act itself and every job keeps the default
    grid: an 8-minute run of the wrong points (seen 2026-12-05). Quoted, it is the grid."""
    with pytest.raises(ConfigCompositionException) as err:
        check_no_swept_grid_axis(["debug=tiny", "sweep.grid.act=all,sign"])
    assert "quote the list, 'sweep.grid.act=\"all,sign\"'" in str(err.value)
    check_no_swept_grid_axis(['sweep.grid.act="all,sign"', "act=all,sign", "method=pnm"])


def test_skip_rules_leave_out_only_the_points_every_term_matches():
    rules = [parse_skip_rule("method=stable_signature act=permute|scale|sign")]
    assert skipped(["method=stable_signature", "fingerprint_bits=48", "act=scale", "sweep.case=none_c1"], rules)
    assert not skipped(["method=stable_signature", "fingerprint_bits=48", "act=all", "sweep.case=none_c1"], rules)
    assert not skipped(["method=pnm", "fingerprint_bits=48", "act=scale", "sweep.case=none_c1"], rules)
    assert not skipped(["method=stable_signature", "act=scale"], [])
    for bad in ("method", "=x", "method=", "   "):
        with pytest.raises(ConfigCompositionException):
            parse_skip_rule(bad)
    # a key the sweep does not sweep (misspelt) is refused rather than skipping nothing
    check_skip_keys(rules, {"method", "fingerprint_bits", "act", "sweep.case"})
    with pytest.raises(ConfigCompositionException, match="methd is not a key the sweep sweeps"):
        check_skip_keys([parse_skip_rule("methd=stable_signature")], {"method", "act"})
    check_skip_keys(rules, {"seed"})  # another sweep (seed=0,1) keeps the default rule on the grid's axes


def test_the_sweepers_grid_axes_are_the_collusion_recipes_swept_keys(sweep_recipe_cfg):
    assert set(sweep_recipe_cfg.hydra.sweeper.params) == set(GRID_AXES)


def test_the_default_grid_is_367_points_with_stable_signature_at_act_none_and_all(sweep_recipe_cfg):
    """4 methods x 5 ACT types x 29 cases, less stable_signature's permute, scale and sign points and
    the image-level single-copy cases at those types (none_c1 and the model attacks stay at every type)."""
    grid = sweep_recipe_cfg.sweep.grid
    axes = [[f"{key}={value}" for value in str(grid[name]).split(",")]
            for key, name in (("method", "method"), ("fingerprint_bits", "fingerprint_bits"), ("act", "act"),
                              ("sweep.case", "case"))]
    rules = [parse_skip_rule(rule) for rule in grid.skip]
    jobs = [job for job in itertools.product(*axes) if not skipped(job, rules)]
    assert len(jobs) == 367
    assert {job[2] for job in jobs if job[0] == "method=stable_signature"} == {"act=none", "act=all"}
    pnm = {(job[2], job[3]) for job in jobs if job[0] == "method=pnm"}
    for act in ("none", "permute", "scale", "sign", "all"):  # the function check and the model attacks at every type
        assert {(f"act={act}", f"sweep.case={case}") for case in ("none_c1", "prune_0.3", "finetune_50")} <= pnm
    assert ("act=permute", "sweep.case=jpeg_q50") not in pnm and ("act=all", "sweep.case=jpeg_q50") in pnm
    # the skipped cases are written out in the YAML (the sweeper imports nothing of the project): they must be
    # exactly the grid's single-copy cases that act on images, so a new image attack cannot drift out of the rule
    image_level = {case for case in str(grid.case).split(",")
                   if parse_case(case)[2] == 1 and attack_kind(parse_case(case)[0]) in ("image", "output")}
    assert rules[1]["sweep.case"] == image_level and rules[1]["act"] == {"permute", "scale", "sign"}


def test_hydra_finds_the_sweeper_and_the_config_selects_it(sweep_recipe_cfg):
    """Hydra instantiates sweepers only from the hydra_plugins namespace, which must therefore be
    installed beside the package (pyproject's package list)."""
    name = f"{AxisCheckedSweeper.__module__}.{AxisCheckedSweeper.__name__}"
    # by name: Hydra's scan executes the module again, so its class is another object
    assert name in [f"{cls.__module__}.{cls.__name__}" for cls in Plugins.instance().discover(Sweeper)]
    assert sweep_recipe_cfg.hydra.sweeper._target_ == name


def test_a_bad_swept_value_stops_the_sweep_before_its_first_point_leaving_nothing(tmp_path):
    """Hydra makes the sweep dir before composing the first job; a bad value held only by the
    grid's last points still fails in the check before any point runs, and the sweep dir and the
    folders Hydra made for it go (sweep_guard). (A value first in its list fails in the same check,
    the first job it composes.)"""
    out = run_console(["+experiment=collusion_sweep", "debug=tiny", "act=all,none,nope"], cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: unknown act 'nope' (choose one of: all, none, permute, scale, sign)"
    ], out.stderr
    assert not (tmp_path / "outputs").exists()
