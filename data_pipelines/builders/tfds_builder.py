"""The TFDS plumbing of a build: `ManifestBuilder` (a TFDS builder over one manifest) and the
Beam transform.

Beam: `_generate_examples(split)` yields (key, example) for a plain local build; with Beam options
`ManifestBuilder` returns a PTransform instead that runs the same per-chunk function on workers and
writes its log entries as JSON lines next to the dataset (see data_pipelines/build.py).
"""
from __future__ import annotations

import inspect
import itertools
import json
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import tensorflow_datasets as tfds


from data_pipelines.builders.converter import Converter
from data_pipelines.builders.manifest import Limits, Scan, Splitter
from data_pipelines.builders.report import chunk_outcomes


@dataclass
class BuildPlan:
    """What a builder needs to write a dataset (kept separate so Beam gets a small object)."""
    converter: Converter
    manifest: str
    scan: Scan
    splitter: Splitter = field(default_factory=Splitter)
    beam_log_dir: Optional[str] = None  # set: generate with Beam

    @property
    def limits(self) -> Limits:
        return self.scan.limits


class ManifestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over one manifest. Subclasses set `name`, `converter_cls` (and configs where
    they have any); `build.build` makes the converter and the plan."""

    converter_cls = Converter
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of ualm_jax.format.records (to_record fields)."}

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" for
    # every build although nothing downloads; `ualm data build` prints its own summary instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup for builders inside a package needs `importlib_resources`, which the
        # stack does not install; the source file is all it wants (for checksum files: none here).
        from etils import epath

        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, plan: BuildPlan, **kwargs):
        self.plan = plan
        self.log: list = []  # local builds: one entry per line, filled while the splits are written
        super().__init__(**kwargs)

    def _info(self):
        conv = self.plan.converter
        return tfds.core.DatasetInfo(
            builder=self, description=f"UALM {conv.kind} records ({conv.task}) from a manifest.",
            features=tfds.features.FeaturesDict(conv.features()),
            metadata=tfds.core.MetadataDict(conv.metadata()))

    def _split_generators(self, dl_manager):
        gens = {}
        for i, split in enumerate(self.plan.scan.splits):
            if self.plan.beam_log_dir is not None:
                gens[split] = beam_split(self.plan, split, log_unparsed=i == 0)
                continue
            # A split whose every line fails would make TFDS raise ("No examples were yielded"):
            # start each generator here and declare only splits that yield something.
            gen = self._generate_examples(split, log_unparsed=i == 0)
            first = next(gen, None)
            if first is not None:
                gens[split] = itertools.chain([first], gen)
            else:
                gen.close()
        return gens

    def _generate_examples(self, split: str, log_unparsed: bool = False):
        """Yields (key, example); the line's log entry goes to self.log."""
        from tqdm import tqdm

        p = self.plan
        total = sum(c.lines for c in p.scan.chunks)
        # Progress with ETA on a terminal (tqdm disables itself when stderr is not one).
        with tqdm(total=total, desc=f"building {split}", unit="line", disable=None,
                  leave=False) as bar:
            for chunk in p.scan.chunks:
                for examples, entry in chunk_outcomes(p.converter, p.manifest, chunk, split,
                                                      p.splitter, log_unparsed, p.limits):
                    self.log.append(entry)
                    bar.update(1)
                    yield from examples


def beam_split(plan: BuildPlan, split: str, log_unparsed: bool):
    """The Beam version of `_generate_examples`: chunks of lines fan out to workers; examples go to
    TFDS, log entries to `plan.beam_log_dir/<split>-*.jsonl`."""
    import apache_beam as beam

    class ConvertChunk(beam.DoFn):
        def process(self, chunk):
            for examples, entry in chunk_outcomes(plan.converter, plan.manifest, chunk, split,
                                                  plan.splitter, log_unparsed, plan.limits):
                yield from examples
                yield beam.pvalue.TaggedOutput("log", json.dumps(entry))

    @beam.ptransform_fn
    def generate(pipeline):
        out = (pipeline
               | "Chunks" >> beam.Create(plan.scan.chunks)
               | "Spread" >> beam.Reshuffle()
               | "Convert" >> beam.ParDo(ConvertChunk()).with_outputs("log", main="examples"))
        _ = out.log | "WriteLog" >> beam.io.WriteToText(
            posixpath.join(plan.beam_log_dir, split), file_name_suffix=".jsonl")
        return out.examples

    return generate()
