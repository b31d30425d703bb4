"""The controllers' training data: an offline profile of a split, prepared when there is none.

    python -m lvlm_ctrl.train controller=grpo budget=uniform      # prepares, then trains

`prepare_data` (rank 0, as Lightning calls it) makes the profile at `path` if it is missing, in four
steps, each cached and resumable in the profile's directory, which is named for the backbone, the
dataset, the split and its size (so a second run, a sweep job or a DDP process reuses it):

    measured-M/          M of the questions at every configuration, latency timed at batch 1
    latency_model.json   fitted on them (its held-out error inside)
    answers-N/           all N questions at every configuration, answered in batches (latency predicted)
    profile.parquet      the answers with the measured latencies (profile_bootstrap): the profile

A measured profile costs about 15 minutes per 200 questions on 2 CPU cores, batched answers a tenth
of that: the bootstrap gives the controller many questions with this machine's latency tails.
`setup` reads the profile into the training environment (grpo/env.py) and splits its samples by id
into training and validation.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.io import atomic_write_bytes, exclusive
from lvlm_ctrl.profiling import SCHEMA, part_files, read_profile

PREPARE_LOCK = ".prepare.lock"  # also marks a directory prepare_data works in (its steps' parts are not the profile)


def check_env(env: str, online: dict | None, latency_model: str | None) -> None:
    """controller.env and its options, or a one-line error (before anything loads)."""
    if env not in ("profile", "online"):
        raise UserError(f"controller.env={env!r}: choose profile or online")
    if env == "online" and latency_model:
        raise UserError("controller.env=online fits its latency model on its own measured questions and keeps "
                        "refitting it; drop latency=predicted")
    from lvlm_ctrl.grpo.online import check_options

    check_options(**(online or {}))


class ProfileDataModule(L.LightningDataModule):
    def __init__(self, backbone, dataset, path: str, measured: int = 150, answer_batch_size: int = 64,
                 batch_size: int = 32, val_fraction: float = 0.2, warmup: int = 3, seed: int = 0,
                 latency_model: str | None = None, env: str = "profile", online: dict | None = None):
        """latency_model: a fitted latency model's path: the environment's latencies are its predictions
        (latency=predicted) instead of the measured ones. env: `profile` (the controller learns from
        the prepared profile) or `online` (grpo/online.py: only the measured step and the latency
        model are prepared; rollouts run on the live backbone, with the `online` options)."""
        super().__init__()
        check_env(env, online, latency_model)
        self.env_kind, self.online = env, dict(online or {})
        for name, value in (("profile.measured", measured), ("profile.batch_size", batch_size),
                            ("profile.answer_batch_size", answer_batch_size)):
            if isinstance(value, bool) or not str(value).isdigit() or int(value) <= 0:
                raise UserError(f"{name}={value!r}: give a positive whole number")
        self.backbone, self.dataset, self.path = backbone, dataset, Path(str(path))
        self.measured, self.answer_batch_size, self.warmup = int(measured), int(answer_batch_size), int(warmup)
        self.batch_size, self.val_fraction, self.seed = int(batch_size), float(val_fraction), seed
        self.latency_model = latency_model

    # ---- the profile ---------------------------------------------------------------------
    @property
    def source(self) -> Path:
        """Where the profile is read from: `path` when it is a Parquet file or a directory of parts (as
        the profile CLI writes), else the profile.parquet that prepare_data writes into `path`."""
        if self.path.suffix == ".parquet":
            return self.path
        prepared = self.path / "profile.parquet"
        # a directory holding a preparation's steps (measured-M/, answers-N/, copied or left by a run
        # that stopped) is one to prepare into: their parts are not the profile
        steps = any(self.path.glob("measured-*")) or any(self.path.glob("answers-*"))
        if prepared.exists() or (self.path / PREPARE_LOCK).exists() or steps or not part_files(self.path):
            return prepared
        return self.path

    @property
    def work(self) -> Path:
        """The directory of the preparation's steps."""
        return self.path.parent if self.path.suffix == ".parquet" else self.path

    def prepare_data(self) -> None:
        if self.env_kind == "online":  # the latency model is all it prepares
            if (self.work / "latency_model.json").exists():
                return
            with exclusive(self.work / PREPARE_LOCK, f"preparing the latency model in {self.work}"):
                self._prepare_latency(self.work, len(self.dataset), 2)
            return
        if part_files(self.source):
            return
        out = self.source
        work = out.parent
        with exclusive(work / PREPARE_LOCK, f"preparing the profile {out}"):
            if part_files(out):  # another process prepared it while this one waited
                return
            self._prepare(work, out)

    def _prepare_latency(self, work: Path, n: int, steps: int) -> tuple[Path, Path]:
        """Steps 1 and 2: the first `measured` questions timed at every configuration, the latency
        model fitted on them; -> their directory and the model's path."""
        from lvlm_ctrl.latency_model import fit_and_report
        from lvlm_ctrl.profile import profile_split

        m = min(self.measured, n)
        measured_dir, model_path = work / f"measured-{m}", work / "latency_model.json"
        profile_split(self.backbone, _Subset(self.dataset, m), measured_dir, "measured", warmup=self.warmup,
                      desc=f"1/{steps} measured profile, {m} questions")
        if not model_path.exists():
            model, err = fit_and_report(read_profile(measured_dir), 0.2, required=False)
            model.meta["profile"] = str(measured_dir)
            model.save(model_path)
            mape = "too few questions to hold some out" if err is None else f"held-out MAPE {err * 100:.1f}%"
            print(f"2/{steps} latency model ({mape}); wrote {model_path}", flush=True)
        return measured_dir, model_path

    def _prepare(self, work: Path, out: Path) -> None:
        from lvlm_ctrl.latency_model import LatencyModel
        from lvlm_ctrl.profile import profile_split
        from lvlm_ctrl.profile_bootstrap import bootstrap

        ds, n = self.dataset, len(self.dataset)
        print(f"no profile at {out}: preparing it from {n} {ds.name} {ds.split} questions ({min(self.measured, n)} "
              f"timed at batch 1, the rest answered in batches); each step is kept under {work}", flush=True)
        measured_dir, model_path = self._prepare_latency(work, n, 4)
        answers_dir = work / f"answers-{n}"
        profile_split(self.backbone, ds, answers_dir, "predicted", LatencyModel.load(model_path),
                      batch_size=self.answer_batch_size, warmup=0, desc=f"3/4 answers, {n} questions")
        df = bootstrap(read_profile(answers_dir), read_profile(measured_dir), self.seed)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), sink)
        atomic_write_bytes(out, sink.getvalue().to_pybytes())
        print(f"4/4 profile: {len(df)} records of {df['sample_id'].nunique()} questions; wrote {out}", flush=True)

    # ---- training data ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "env", None) is not None:
            return
        from lvlm_ctrl.grpo.env import ProfileEnv
        from lvlm_ctrl.latency_model import LatencyModel, held_out_mask

        if self.env_kind == "online":
            self.env = self._online_env()
        else:
            df = self.profile()
            latency_model = LatencyModel.load(self.latency_model) if self.latency_model else None
            self.env = ProfileEnv(df, self.backbone.space, latency_model)
        by_id = {s.sample_id: s for s in self.dataset.samples}
        missing = [i for i in self.env.sample_ids if i not in by_id]
        if missing:
            ds = self.dataset
            raise UserError(f"{len(missing)} profiled samples (e.g. {missing[0]}) are not in data={ds.name} "
                            f"split={ds.split} ({len(ds)} samples); pass the split and data.limit the profile was "
                            "made on")
        self.samples = [by_id[i] for i in self.env.sample_ids]
        held = torch.tensor(held_out_mask(self.env.sample_ids, self.val_fraction))
        self.train_idx, self.val_idx = torch.where(~held)[0], torch.where(held)[0]
        if len(self.train_idx) == 0 or len(self.val_idx) == 0:
            raise UserError(f"{len(self.samples)} training samples are too few to hold out a validation set "
                            f"(profile.val_fraction={self.val_fraction}); raise data.limit")
        self.env.use_for_slo(self.train_idx)
        pool = self.online.get("pool") if self.env_kind == "online" else None
        n = len(self.train_idx)
        if pool is not None and pool < n:  # the questions the training steps draw from
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:pool]
            self.train_idx = self.train_idx[pick.sort().values]
            print(f"online environment: training steps draw from {pool} of the {n} training questions "
                  "(controller.online.pool)", flush=True)

    def _online_env(self):
        from lvlm_ctrl.grpo.online import OnlineEnv
        from lvlm_ctrl.latency_model import LatencyModel

        self.prepare_data()  # done already where Lightning called it: setup may run in another process
        model = LatencyModel.load(self.work / "latency_model.json")
        stored = Path(str(model.meta.get("profile", "")))
        # prepared beside the model, then moved or run from another directory: the one beside it
        measured_dir = stored if part_files(stored) else self.work / stored.name
        if not stored.name or not part_files(measured_dir):
            raise UserError(f"the measured profile the latency model in {self.work} was fitted on ({measured_dir}) is "
                            "gone; delete latency_model.json there to measure again")
        known = self.profile() if part_files(self.source) else None  # a profile there: read, not run
        print(f"online environment: {len(self.dataset)} {self.dataset.name} {self.dataset.split} questions, rollouts on "
              f"the live backbone ({0 if known is None else known['sample_id'].nunique()} questions read from a profile)",
              flush=True)
        options = {k: v for k, v in self.online.items() if k != "pool"}  # the pool is the sampler's (setup)
        return OnlineEnv(self.backbone, self.dataset.samples, model, read_profile(measured_dir), known, seed=self.seed,
                         **options)

    def profile(self):
        """The profile's records (a DataFrame), prepared first if missing."""
        self.prepare_data()
        df = read_profile(self.source)
        if set(df["backbone"]) != {self.backbone.name}:
            raise UserError(f"the profile at {self.source} is of backbone {sorted(set(df['backbone']))}, not "
                            f"{self.backbone.name!r}: pass a profile of this backbone or another profile.path")
        return df

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.train_idx), batch_size=self.batch_size,
                                           shuffle=True, drop_last=len(self.train_idx) > self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.val_idx), batch_size=len(self.val_idx))


class _Subset:
    """The first n samples of a dataset, under the dataset's name and split."""

    def __init__(self, dataset, n: int):
        self.name, self.split, self.samples = dataset.name, dataset.split, dataset.samples[:n]

    def __len__(self) -> int:
        return len(self.samples)
