"""The online environment (`controller.env=online`): rollouts run on the live backbone.

The seed's system trains on what the model does, not on a profile made beforehand: a (sample,
configuration) pair a GRPO group draws for the first time is run by the rollout engine
(backbone/rollout.py, batched over the step's new pairs, the vision encoder and the blocks before p
shared) and its answer scored; the backbone is frozen and decoding greedy, so the score is kept
and a second draw reads it. Pairs a given profile holds are read from it, never run.

Latency is the latency model's, per request: the sample's own vision and text token counts (from
preprocessing, known before any rollout) and its output tokens (the configuration's mean until the
pair has run, then its own), plus a residual drawn (seeded, once per pair) from the requests timed at
that configuration, so the tails of this machine stay in the statistics the SLO reward and the
guard read. A fraction `measure_fraction` of the new pairs is also timed at batch 1 (as serving
times a request); every `refit_every` new measurements, the machine's speed since the first profile
is divided out of them, they become those pairs' latencies and residual donors of their
configuration, and the latency model is refitted on every timed record; its error on them,
predicted before they were seen, is reported (`online/latency_mape`, with the window's speed,
`online/speed`, taken out). The speed divided out of a timing is the local one, the median over its
`speed_window` neighbours in time, not the window's: a window lasts most of a minute, the machine's
speed moves within it, and serving's calibration follows drift within seconds; divided by the
window's median, run 10's timings put p95 at 1.47x the median, divided by 25 neighbours' at 1.34x
(the first profile's own timings, out of sample: 1.27x). The residual pool is every
timing so far, not the first window's alone: a few minutes of timing can catch a noisy spell (one
run's window put the high tier's p95 20% above another's, medians alike), and a controller trained
on it stays too careful all run. Everything else is the profile environment's.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from lvlm_ctrl.backbone.rollout import RolloutEngine
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.env import ProfileEnv, check_space, table_index, table_shape
from lvlm_ctrl.grpo.policy import Decision
from lvlm_ctrl.latency_model import STAGES, LatencyModel, mape
from lvlm_ctrl.metrics import vqa_score

OPTIONS = ("measure_fraction", "refit_every", "rollout_batch_size", "speed_window", "pool")


def check_options(**options) -> None:
    """controller.online's options, or a one-line error: before anything loads, and for OnlineEnv."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"unknown controller.online option(s) {sorted(unknown)}: choose from {', '.join(OPTIONS)}")
    fraction = options.get("measure_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise UserError(f"controller.online.measure_fraction={fraction!r}: give a fraction in [0, 1]")
    for name in ("refit_every", "rollout_batch_size", "speed_window"):
        _check_whole(name, options.get(name, 1))
    if options.get("pool") is not None:  # null: every training question
        _check_whole("pool", options["pool"], " (or null: every training question)")


def _check_whole(name: str, value, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"controller.online.{name}={value!r}: give a positive whole number{alternative}")


class OnlineEnv(ProfileEnv):
    def __init__(self, backbone, samples: list, latency_model: LatencyModel, measured: pd.DataFrame,
                 known: pd.DataFrame | None = None, *, measure_fraction: float = 0.05, refit_every: int = 200,
                 rollout_batch_size: int = 64, speed_window: int = 25, seed: int = 0):
        """samples: the split's; measured: a profile of some of them at every configuration, timed at
        batch 1 (the latency model's first fit and the residuals' donors); known: records of any
        profile whose answers are read instead of run."""
        check_options(measure_fraction=measure_fraction, refit_every=refit_every, rollout_batch_size=rollout_batch_size,
                      speed_window=speed_window)
        space = backbone.space
        self.backbone, self.samples, self.model = backbone, list(samples), latency_model
        self.engine = RolloutEngine(backbone, int(rollout_batch_size))
        self.measure_fraction, self.refit_every = float(measure_fraction), int(refit_every)
        self.speed_window = int(speed_window)
        self.recent_ratios = np.zeros(0)  # the last window's measured / predicted, the next window's context
        self.rng = np.random.default_rng(seed)
        ids = [str(s.sample_id) for s in self.samples]
        self.index = {s: i for i, s in enumerate(ids)}
        self.configs = space.configurations()
        frame = pd.DataFrame([k.as_dict() for k in self.configs])
        self.cell = tuple(torch.tensor(a) for a in table_index(space, frame))  # config c -> its table cell
        self.config_of = torch.full(table_shape(space, 1)[1:], -1, dtype=torch.long)
        self.config_of[self.cell] = torch.arange(len(self.configs))
        self.tier_of = self.cell[0]
        counts = prompt_token_counts(backbone, self.samples)  # (S, tiers, 2)
        accuracy = torch.full(table_shape(space, len(ids)), float("nan"))
        self.output_tokens = torch.full((len(ids), len(self.configs)), float("nan"))
        self.measured_ms = torch.full((len(ids), len(self.configs), len(STAGES)), float("nan"))
        self.measured = measured[measured["latency_source"].fillna("measured") == "measured"]
        records = pd.concat([f for f in (measured, known) if f is not None and not f.empty], ignore_index=True)
        records = records[records["sample_id"].astype(str).isin(self.index)]
        if not records.empty:
            check_space(records, space)
            s = torch.tensor(records["sample_id"].astype(str).map(self.index).to_numpy())
            c = self.config_of[tuple(torch.tensor(a) for a in table_index(space, records))]
            accuracy[(s, *(t[c] for t in self.cell))] = torch.tensor(records["accuracy"].to_numpy(float),
                                                                        dtype=torch.float32)
            self.output_tokens[s, c] = torch.tensor(records["output_tokens"].to_numpy(float), dtype=torch.float32)
            timed = (records["latency_source"].fillna("measured") == "measured").to_numpy(copy=True)
            self.measured_ms[s[timed], c[timed]] = torch.tensor(records.loc[timed, STAGES].to_numpy(float, copy=True),
                                                                dtype=torch.float32)
        self.new_measurements: list[dict] = []
        self.history: list[dict] = []  # one entry per refit: rollouts run so far, measurements, the model's error
        self.stats = {"rollouts_run": 0, "rollouts_read": 0, "rollout_s": 0.0, "measured": 0, "measure_s": 0.0}
        self.last_mape = float("nan")
        self._coefs = latency_model.coefficients(self.configs)
        self.token_counts = counts
        self._donors()
        self._init_tables(space, ids, accuracy, self._latency_table(), counts)

    # ---- latency ---------------------------------------------------------------------------
    def _donors(self) -> None:
        """A seeded uniform per (sample, configuration), fixed for the run: where in its
        configuration's pool of timed requests an untimed pair takes its residual from (the donor
        moves only when that pool grows; the pair's own timing, once made, replaces it)."""
        timed = ~torch.isnan(self.measured_ms[..., 0])
        if not timed.any(0).all():
            raise UserError("the online environment needs every configuration timed at least once: give "
                            "profile.measured > 0 (questions timed at every configuration up front)")
        self.draw = torch.from_numpy(self.rng.random(timed.shape))

    def _residual_donors(self) -> torch.Tensor:
        """(S, C): the sample whose timing at each configuration lends an untimed pair its residual."""
        timed = ~torch.isnan(self.measured_ms[..., 0])
        config, sample = torch.nonzero(timed.T, as_tuple=True)  # grouped by configuration
        counts = torch.bincount(config, minlength=timed.shape[1])
        first = torch.cumsum(counts, 0) - counts
        rank = torch.minimum((self.draw * counts).long(), counts - 1)
        return sample[first + rank]

    def _predict(self, rows: torch.Tensor, out_tokens: torch.Tensor) -> torch.Tensor:
        """(R, C, stages): the latency model's stage times for samples `rows` with output tokens (R, C)."""
        coefs, mean_out = self._coefs  # (C, stages, 1 + features), (C,)
        out = torch.where(torch.isnan(out_tokens), mean_out[None], out_tokens)
        tok = self.token_counts[rows][:, self.tier_of]  # (R, C, 2): vision and text tokens at each config's tier
        x = torch.cat([torch.ones_like(out)[..., None], tok, out[..., None]], dim=-1).double()
        return torch.einsum("rcf,cgf->rcg", x, coefs).clamp(min=0.0).float()

    def _latency_table(self) -> torch.Tensor:
        """(S, tiers, P, K, N) total latency: own prediction + a timed residual, measured where timed."""
        predicted = self._predict(torch.arange(len(self.samples)), self.output_tokens)
        residual = self.measured_ms - predicted  # NaN where not timed
        stages = (predicted + residual[self._residual_donors(), torch.arange(len(self.configs))]).clamp(min=0.0)
        total = torch.where(torch.isnan(self.measured_ms[..., 0]), stages.sum(-1), self.measured_ms.sum(-1))
        table = torch.full(table_shape(self.backbone.space, len(self.samples)), float("nan"))
        table[(slice(None), *self.cell)] = total
        return table

    def _refit(self) -> None:
        """Fold the measurements since the last refit in and refit the latency model on every timed
        record. The machine's speed drifts (here 1.8x between a morning's profile and the evening), and
        the budgets, the feasible range and serving's calibration are in the units of the first
        measured profile: so each timing's speed against the model (the median of measured over
        predicted of its `speed_window` neighbours in time) is divided out, and what the refit learns
        is the shape (which configuration and which request costs how much). Reported: the window's
        speed, and the model's error on the window, predicted before it was seen, with the window's
        speed taken out and raw."""
        new = pd.DataFrame(self.new_measurements)
        raw = new["T_total_ms"].to_numpy(float)
        predicted = self.model.predict_frame(new)
        ratio = raw / np.maximum(predicted, 1e-9)
        speed = float(np.median(ratio))
        self.last_mape, raw_mape = mape(predicted * speed, raw), mape(predicted, raw)
        local = local_speed(np.concatenate([self.recent_ratios, ratio]), self.speed_window)[len(self.recent_ratios):]
        self.recent_ratios = ratio[max(len(ratio) - self.speed_window // 2, 0):]
        new[[*STAGES, "T_total_ms"]] /= local[:, None]
        cells = torch.tensor(new[["row", "config"]].to_numpy())
        self.measured_ms[cells[:, 0], cells[:, 1]] = torch.tensor(new[STAGES].to_numpy(float), dtype=torch.float32)
        self.measured = pd.concat([self.measured, new.drop(columns=["row", "config"])], ignore_index=True)
        self.model = LatencyModel.fit(self.measured)
        self._coefs = self.model.coefficients(self.configs)
        self.history.append({"rollouts_run": self.stats["rollouts_run"], "new_timed": len(new),
                             "timed_records": len(self.measured), "speed": round(speed, 4),
                             "mape": round(self.last_mape, 4), "mape_raw": round(raw_mape, 4)})
        self.new_measurements = []
        self.latency = self._latency_table()
        self.refresh()

    # ---- rollouts --------------------------------------------------------------------------
    def outcome(self, sample_idx: torch.Tensor, d: Decision) -> tuple[torch.Tensor, torch.Tensor]:
        configs = self.config_of[d.tier, d.insertion, d.top_k, d.num_blocks]
        new = torch.isnan(self.output_tokens[sample_idx, configs])
        pairs = sorted(set(zip(sample_idx[new].tolist(), configs[new].tolist())))
        self.stats["rollouts_read"] += len(sample_idx) - len(pairs)  # a pair drawn twice in a step runs once
        if pairs:
            self._run(pairs)
        return super().outcome(sample_idx, d)

    def _run(self, pairs: list[tuple[int, int]]) -> None:
        rows = sorted({s for s, _ in pairs})
        wanted = {s: [] for s in rows}
        for s, c in pairs:
            wanted[s].append(self.configs[c])
        images = {s: self.samples[s].load_image() for s in rows}
        t0 = time.perf_counter()
        out = self.engine.run([images[s] for s in rows], [self.samples[s].question for s in rows],
                              [wanted[s] for s in rows])
        self.stats["rollout_s"] += time.perf_counter() - t0
        self.stats["rollouts_run"] += len(pairs)
        position = {s: i for i, s in enumerate(rows)}
        for s, c in pairs:
            gen, row = out[(position[s], self.configs[c])]
            cell = (s, *(t[c] for t in self.cell))
            self.accuracy[cell] = vqa_score(gen.answers[row], list(self.samples[s].answers))
            self.output_tokens[s, c] = float(gen.output_tokens[row])
        timed = [pairs[i] for i in np.flatnonzero(self.rng.random(len(pairs)) < self.measure_fraction)]
        t0 = time.perf_counter()
        for s, c in timed:
            self._measure(s, c, images[s])
        self.stats["measure_s"] += time.perf_counter() - t0
        if len(self.new_measurements) >= self.refit_every:
            self._refit()
        else:  # the new pairs' own output tokens (and timings) into the table
            self.latency = self._latency_table()

    def _measure(self, s: int, c: int, image) -> None:
        knobs = self.configs[c]
        gen = self.backbone.generate([image], [self.samples[s].question], knobs)
        stages = [gen.vision_ms, gen.prefill_ms, gen.decode_ms]
        self.stats["measured"] += 1
        self.new_measurements.append({  # into the table at the next refit, in the first profile's units
            "row": s, "config": c, "sample_id": self.sample_ids[s], **knobs.as_dict(), "vision_tokens": int(gen.vision_tokens[0]),
            "text_tokens": int(gen.text_tokens[0]), "output_tokens": int(gen.output_tokens[0]),
            **dict(zip(STAGES, stages)), "T_total_ms": gen.total_ms, "latency_source": "measured"})

    # ---- resuming -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the environment has learned about the backbone, in plain values and tensors (a
        checkpoint loads with weights_only): every pair run (its score and output tokens), every
        timing, the refits and the random state, so that a resumed run neither runs a pair again
        nor forgets a measurement."""
        known = torch.nonzero(~torch.isnan(self.output_tokens))  # (pairs, 2): sample, config
        timed = torch.nonzero(~torch.isnan(self.measured_ms[..., 0]))
        cells = (known[:, 0], *(t[known[:, 1]] for t in self.cell))
        return {"sample_ids": list(self.sample_ids), "known": known, "accuracy": self.accuracy[cells].clone(),
                "output_tokens": self.output_tokens[known[:, 0], known[:, 1]].clone(), "timed": timed,
                "timed_ms": self.measured_ms[timed[:, 0], timed[:, 1]].clone(),
                "measured": {c: self.measured[c].tolist() for c in self.measured.columns},
                "new_measurements": [dict(m) for m in self.new_measurements], "history": list(self.history),
                "stats": dict(self.stats), "rng": self.rng.bit_generator.state,
                "recent_ratios": torch.from_numpy(self.recent_ratios.copy())}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sample_ids"]) != list(self.sample_ids):
            raise UserError("the checkpoint's online environment ran other samples than this run's data "
                            "(data.* or profile.* changed): resume with the options it was trained with")
        known, timed = state["known"], state["timed"]
        self.accuracy[(known[:, 0], *(t[known[:, 1]] for t in self.cell))] = state["accuracy"]
        self.output_tokens[known[:, 0], known[:, 1]] = state["output_tokens"]
        self.measured_ms[timed[:, 0], timed[:, 1]] = state["timed_ms"]
        self.measured = pd.DataFrame(state["measured"])
        self.new_measurements, self.history = list(state["new_measurements"]), list(state["history"])
        self.stats.update(state["stats"])
        self.rng.bit_generator.state = state["rng"]
        self.recent_ratios = state["recent_ratios"].numpy() if "recent_ratios" in state else np.zeros(0)
        if self.history:  # the refits' model: fitted on the same timed records, as it was
            self.model = LatencyModel.fit(self.measured)
            self._coefs = self.model.coefficients(self.configs)
            self.last_mape = self.history[-1]["mape"]
        self.latency = self._latency_table()
        self.refresh()

    def report(self) -> dict:
        """The run's figures (online_env.json beside the checkpoints): rollouts run and read, their
        time, the measurements and the latency model's error at each refit."""
        return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in self.stats.items()},
                "samples": len(self.samples), "pairs_known": int((~torch.isnan(self.output_tokens)).sum()),
                "refits": self.history}

    def metrics(self) -> dict[str, float]:
        st = self.stats
        drawn = st["rollouts_run"] + st["rollouts_read"]
        out = {"online/rollouts_run": st["rollouts_run"], "online/read_fraction": st["rollouts_read"] / max(drawn, 1),
               "online/rollouts_per_s": st["rollouts_run"] / max(st["rollout_s"], 1e-9),
               "online/measured": st["measured"], "online/refits": len(self.history)}
        if self.history:
            out["online/latency_mape"] = self.last_mape
            out["online/speed"] = self.history[-1]["speed"]
        return out


def local_speed(ratios: np.ndarray, window: int) -> np.ndarray:
    """Each timing's speed: the median of measured / predicted over the `window` timings centred on it
    (fewer at the ends)."""
    return pd.Series(ratios).rolling(window, center=True, min_periods=1).median().to_numpy()


@torch.inference_mode()
def prompt_token_counts(backbone, samples, batch_size: int = 64) -> torch.Tensor:
    """(S, tiers, 2): each sample's vision and text token counts at every tier, from preprocessing
    alone (what the latency model needs before a rollout has run)."""
    out = torch.zeros(len(samples), len(backbone.space.tiers), 2)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images, questions = [s.load_image() for s in chunk], [s.question for s in chunk]
        for t, tier in enumerate(backbone.space.tiers):
            prompt = backbone.encode(images, questions, tier)
            out[start:start + len(chunk), t] = torch.tensor([prompt.vision_tokens, prompt.text_tokens],
                                                            dtype=torch.float32).T
    return out

