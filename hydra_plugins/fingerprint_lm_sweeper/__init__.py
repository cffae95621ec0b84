"""Hydra's basic sweeper, checking each swept value once before the sweep instead of every point.

Hydra's ``BasicSweeper`` composes the config of every job of a batch before launching it, so that a
bad value fails before any point runs. The launcher then composes each job again. For the default
collusion sweep (then 560 points) that check was 560 compositions at about 0.17 s each on 2 CPU cores: 96 s of a
20-minute sweep, spent before the first point. :class:`AxisCheckedSweeper` composes only enough
jobs to cover every ``key=value`` of the batch once (35 for that grid), so a misspelt value
of any axis still fails before the first point runs. What it no longer checks up front is a
*combination* of values that fails to compose although each value composes with others; such a job
fails when the launcher reaches it, and the points already finished stay on disk (re-running into
the same ``hydra.sweep.dir`` skips them).

It also refuses an unquoted list given to a grid axis (``sweep.grid.act=all,sign``): Hydra reads
that as a sweep *of the grid setting itself*, so every job keeps the default grid (the axes were
read from ``sweep.grid`` before the command line's sweeps) and the run silently measures the wrong
points, twice over. The quoted form (``'sweep.grid.act="all,sign"'``) is one value, the intended grid.

Grid points can be left out (``sweep.grid.skip``): the default grid skips stable_signature's
permute, scale and sign points, which cost it a fifth of the 20-minute budget (its copies are the
same function under every ACT type; ACT none and all stay, for averaging with and without ACT).

Hydra loads sweepers only from the ``hydra_plugins`` namespace, hence this package;
``conf/hydra/default.yaml`` selects it.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

GRID_PREFIX = "sweep.grid."
# The collusion sweep's axes (conf/recipe/collusion_sweep.yaml's hydra.sweeper.params): a skip rule
# may name them in any sweep, since sweep.grid.skip is in every config and most sweeps sweep others.
GRID_AXES = ("method", "fingerprint_bits", "act", "sweep.case")


def covering_jobs(batch: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """The jobs of ``batch``, in order, that each hold an override no earlier kept job holds, so
    every override of the batch appears in at least one kept job."""
    seen: set[str] = set()
    kept: list[Sequence[str]] = []
    for overrides in batch:
        new = set(overrides) - seen
        if new:
            kept.append(overrides)
            seen |= new
    return kept


def check_no_swept_grid_axis(arguments: Sequence[str]) -> list[str]:
    """ConfigCompositionException (one error line from the CLI) for a command-line sweep of a
    ``sweep.grid.*`` key, naming the quoted form that sets the grid instead. Returns the keys the
    command line sweeps."""
    swept = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if override.is_sweep_override() and key.startswith(GRID_PREFIX):
            values = override.input_line.split("=", 1)[1]
            raise ConfigCompositionException(
                f"{override.input_line} would sweep the grid setting itself, not set the grid: "
                f"quote the list, '{key}=\"{values}\"'"
            )
        if override.is_sweep_override():
            swept.append(key)
    return swept


def parse_skip_rule(rule: str) -> dict[str, set[str]]:
    """``"method=stable_signature act=permute|scale|sign"`` -> {key: allowed values}; a job matches
    when each key's override value is one of them. ConfigCompositionException for a malformed rule."""
    terms = {}
    for term in rule.split():
        key, sep, values = term.partition("=")
        if not sep or not key or not values:
            raise ConfigCompositionException(f"sweep.grid.skip: {rule!r} is not 'key=value|value ...' terms")
        terms[key] = set(values.split("|"))
    if not terms:
        raise ConfigCompositionException("sweep.grid.skip: an empty rule would skip every point")
    return terms


def check_skip_keys(rules: Sequence[dict[str, set[str]]], swept: set[str]) -> None:
    """ConfigCompositionException for a rule naming a key that is neither swept nor an axis of the
    collusion grid: a misspelt ``methd=...`` would otherwise skip nothing, silently."""
    known = {*swept, *GRID_AXES}
    for rule in rules:
        unknown = sorted(set(rule) - known)
        if unknown:
            raise ConfigCompositionException(
                f"sweep.grid.skip: {', '.join(unknown)} is not a key the sweep sweeps "
                f"(its keys: {', '.join(sorted(known))})"
            )


def skipped(job: Sequence[str], rules: Sequence[dict[str, set[str]]]) -> bool:
    """Whether a job's overrides (``key=value`` strings) match every term of one of ``rules``."""
    values = dict(override.split("=", 1) for override in job if "=" in override)
    return any(all(values.get(key) in allowed for key, allowed in rule.items()) for rule in rules)


class AxisCheckedSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        rules = OmegaConf.select(config, "sweep.grid.skip", default=None) or []
        self.skip_rules = [parse_skip_rule(str(rule)) for rule in rules]

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        return [job for job in super().get_job_batch() if not skipped(job, self.skip_rules)]

    def sweep(self, arguments: list[str]) -> object:
        swept = check_no_swept_grid_axis(arguments)
        check_skip_keys(self.skip_rules, {*(self.params or {}), *swept})  # before the sweep dir is made
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(covering_jobs(batch))
