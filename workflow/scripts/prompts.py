from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import prompts
from pipeline.config import Split
from pipeline.specs import DatasetSpec, from_params

hub = any(d["hub_id"] for by_split in snakemake.params.datasets.values() for d in by_split.values())
with job(snakemake, online=hub) as p:
    splits = {label: {split: from_params(DatasetSpec, d) for split, d in by_split.items()}
              for label, by_split in p.datasets.items()}
    prompts.run(splits, from_params(Split, p.split), snakemake.output[0], exp_file=p.file)
