"""The built-in tasks as a TFDS dataset (array_record files, readable without TensorFlow).

One builder config per (families, difficulty range, sizes, seed, solution error rate), named by those values, so two
experiments with different task settings never share files and a rerun reuses what is on disk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tsched.data import tasks


@dataclasses.dataclass(kw_only=True)
class TaskConfig(tfds.core.BuilderConfig):
    families: str = "arith,mult,gcd,sort"
    min_difficulty: int = 1
    max_difficulty: int = 4
    train_size: int = 20000
    eval_size: int = 500
    seed: int = 0
    solution_error_rate: float = 0.0


def task_config(families: str, min_difficulty: int, max_difficulty: int, train_size: int, eval_size: int,
                seed: int, solution_error_rate: float = 0.0) -> TaskConfig:
    fams = tasks.parse_families(families)
    name = f"{'-'.join(fams)}_d{min_difficulty}-{max_difficulty}_n{train_size}-{eval_size}_s{seed}"
    if solution_error_rate and set(fams) & set(tasks.SLIP_FAMILIES):  # else the data is that of rate 0
        name += f"_e{solution_error_rate:g}"
    return TaskConfig(name=name, families=",".join(fams), min_difficulty=min_difficulty,
                      max_difficulty=max_difficulty, train_size=train_size, eval_size=eval_size, seed=seed,
                      solution_error_rate=solution_error_rate)


class TschedTasks(tfds.core.GeneratorBasedBuilder):
    """Generated verifiable reasoning tasks with exact answers and reference solutions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "arith, mult, gcd, sort families (later: chain)."}
    BUILDER_CONFIGS = [TaskConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "family": text, "problem": text, "solution": text, "answer": text, "verifier": text,
            "difficulty": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        train, evals = tasks.make_splits(tasks.parse_families(c.families), c.min_difficulty, c.max_difficulty,
                                         c.train_size, c.eval_size, c.seed, c.solution_error_rate)
        return {"train": self._generate_examples(train), "eval": self._generate_examples(evals)}

    def _generate_examples(self, problems):
        for i, p in enumerate(problems):
            yield i, dataclasses.asdict(p)


def build(config: TaskConfig, data_dir: str) -> TschedTasks:
    """Builds the dataset if its files are not on disk yet; returns the builder. Runs that share a data_dir
    may build the same dataset at once (a sweep's parallel runs): the one that finishes second finds the
    other's files in place of its own, which hold the same examples, and uses them."""
    make = lambda: TschedTasks(config=config, data_dir=data_dir, file_format="array_record")
    builder = make()
    if not builder.is_prepared():
        tfds.disable_progress_bar()  # a few seconds of work; its progress bars would bury the run's output
        try:
            builder.download_and_prepare()
        except FileExistsError:
            builder = make()
            if not builder.is_prepared():
                raise
    return builder


def decode(record: dict) -> dict:
    """TFDS returns text as bytes without TensorFlow; give back str."""
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}
