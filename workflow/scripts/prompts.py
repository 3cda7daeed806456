from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import prompts
from pipeline.config import Split
from pipeline.specs import DatasetSpec, from_params

online = any(d["hub_id"] or d["url"] for by_split in snakemake.params.datasets.values()
             for pool in by_split.values() for d in pool)
with job(snakemake, online=online) as p:
    splits = {label: {split: tuple(from_params(DatasetSpec, d) for d in pool) for split, pool in by_split.items()}
              for label, by_split in p.datasets.items()}
    prompts.run(splits, from_params(Split, p.split), snakemake.output[0], exp_file=p.file)
