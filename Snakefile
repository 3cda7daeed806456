# refusal-directions: prompts -> activations -> directions -> select -> sweep -> generate -> score
# -> aggregate.
#
# The experiment comes from Hydra (conf/config.yaml + overrides):
#   snakemake --cores 2                                   # the default experiment
#   snakemake --cores 2 --config overrides="experiment=tiny experiment.generation.max_new_tokens=8"
#
# The whole config is validated here, while the DAG is built; each rule then gets, as
# `params`, exactly the typed spec its stage reads (pipeline.specs), so editing a setting
# reruns the jobs that read it and no job re-reads the YAML.
import shlex
import sys
from pathlib import Path

from pipeline.config import load_experiment
from pipeline.errors import ConfigError
from pipeline.direction_methods import DIRECTION_METHODS
from pipeline.interventions import INTERVENTIONS
from pipeline.registry import plugins_providing
from pipeline.specs import FRONT_PREFIX, Cell, Source, cell_name_pattern, source_method, to_params

# The only keys this workflow reads from --config; any other (a typo such as `overides=`) would be
# ignored by Snakemake, and the run would silently use the defaults.
CONFIG_KEYS = {"overrides": "Hydra overrides, e.g. overrides=\"experiment=tiny\"",
               "conf_dir": "another conf/ folder"}
config.setdefault("overrides", "")
config.setdefault("conf_dir", str(Path(workflow.basedir) / "conf"))
try:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError("--config", unknown[0], "not a key of this workflow; it reads only "
                          + " and ".join(f"{k} ({what})" for k, what in CONFIG_KEYS.items())
                          + "; Snakemake's own options (--cores, --profile) are not --config keys")
    try:
        overrides = shlex.split(str(config["overrides"]))
    except ValueError as err:  # an unbalanced quote
        raise ConfigError("--config", "overrides", f"cannot split {config['overrides']!r} into overrides "
                          f"({err}); quote a value with spaces in single quotes inside the double-quoted "
                          "string: overrides=\"experiment=tiny experiment.name='my run'\"") from None
    # On a cluster the login node builds the DAG; a GPU is only asked for where jobs run.
    EXP = load_experiment(overrides, conf_dir=config["conf_dir"], device_here=workflow.local_exec)
except ConfigError as err:
    sys.stderr.write(f"refusal-directions: config error: {err}\n")
    sys.exit(1)

OUT = str(EXP.out)
MODELS = str(EXP.results_dir / "models")
LOGS = str(EXP.out / "logs")
GPU = 0 if EXP.device == "cpu" else 1  # a resource, so local runs never start two GPU jobs at once

# the front page of `snakemake --report results/<experiment>/report.html` (same --config as the run)
report: "workflow/report/workflow.rst"

wildcard_constraints:
    model=r"[^/]+",
    source=r"[^/]+",
    cell=cell_name_pattern(),  # after the config: plugins' kinds are registered


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/directions.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/length.smk"
include: "workflow/rules/stability.smk"
include: "workflow/rules/export.smk"  # `snakemake export`: not part of `all`
include: "workflow/rules/optimize.smk"  # `snakemake optimize`: not part of `all`


# Every artifact the README lists, not only the final ones: a deleted or damaged intermediate file
# (activations, candidates) is then rebuilt by a plain rerun, as the README says.
rule all:
    input:
        f"{OUT}/summary.parquet",
        f"{OUT}/report.md",
        f"{OUT}/prompts.parquet",
        expand(OUT + "/activations/{model}.parquet", model=list(EXP.models)),
        expand(OUT + "/directions/{model}/{name}", model=list(EXP.models),
               name=["candidates.parquet", "selection.parquet", "selected.parquet", "selection.png"]),
        grid_files("generations"),
        grid_files("scores"),
        LENGTH_TARGETS,  # experiments with `length:`
        STABILITY_TARGETS,  # experiments with `direction.bootstrap`
    default_target: True
