from pipeline import prompts
from pipeline.config import Split
from pipeline.job import job
from pipeline.specs import DatasetSpec, from_params

with job(snakemake) as p:
    splits = {label: {split: from_params(DatasetSpec, d) for split, d in by_split.items()}
              for label, by_split in p.datasets.items()}
    prompts.run(splits, from_params(Split, p.split), snakemake.output[0], exp_file=p.file)
