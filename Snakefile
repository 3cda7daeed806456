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
from pipeline.specs import CELL_NAME_PATTERN, Cell, Kind, to_params

config.setdefault("overrides", "")
config.setdefault("conf_dir", str(Path(workflow.basedir) / "conf"))
try:
    # On a cluster the login node builds the DAG; a GPU is only asked for where jobs run.
    EXP = load_experiment(shlex.split(str(config["overrides"])), conf_dir=config["conf_dir"],
                          device_here=workflow.local_exec)
except ConfigError as err:
    sys.stderr.write(f"refusal-directions: config error: {err}\n")
    sys.exit(1)

OUT = str(EXP.out)
MODELS = str(EXP.results_dir / "models")
LOGS = str(EXP.out / "logs")
GPU = 0 if EXP.device == "cpu" else 1  # a resource, so local runs never start two GPU jobs at once

wildcard_constraints:
    model=r"[^/]+",
    source=r"[^/]+",
    cell=CELL_NAME_PATTERN,


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


rule all:
    input:
        f"{OUT}/summary.parquet",
        f"{OUT}/report.md",
        LENGTH_TARGETS,  # experiments with `length:`
        STABILITY_TARGETS,  # experiments with `direction.bootstrap`
    default_target: True
