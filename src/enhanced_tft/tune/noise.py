"""How far a refit moves a score, and whether the study's best trial stands out from that: the base config trained
again with other seeds (`etft tune --refits R`), scored as a trial is (the same folds), beside the spread of the
trial scores. Without it a "best" trial may be the base config with a lucky seed."""
from __future__ import annotations

import logging
import statistics

from ..config import schema as config_mod
from .study import Objective, Stopped

log = logging.getLogger("enhanced_tft.tune")

NOISE_SDS = 2.0   # best - base is told apart from a refit's noise beyond this many seed standard deviations
REFITS_ATTR = "refits"   # the study's user attribute that keeps the refits' scores


def refit_seeds(base_seed: int, refits: int) -> list[int]:
    """The base config's own seed, then `refits` others."""
    return [base_seed + i for i in range(refits + 1)]


def measure_refits(study, objective: Objective, refits: int) -> list[dict]:
    """Train the base config at its seed and `refits` more, each scored as a trial is, in refit_seed_<seed>/; the
    scores are kept in the study (a study run again trains only the seeds it lacks). None when a signal stopped
    a training (objective.stop_code says which)."""
    done = {r["seed"]: r for r in study.user_attrs.get(REFITS_ATTR, [])}
    for seed in refit_seeds(objective.base.seed, refits):
        if seed in done:
            continue
        cfg = config_mod.update(objective.base, seed=seed)
        log.info("refit of the base config with seed %d (seed noise)", seed)
        try:
            value, folds = objective.score(cfg, objective.folder / f"refit_seed_{seed}")
        except Stopped as stopped:
            objective.stop_code = stopped.code
            log.info("refit with seed %d %s; the noise is measured over the seeds done", seed, stopped)
            break
        done[seed] = {"seed": seed, "value": value, "run": folds[-1]["run"],
                      **({"folds": folds} if len(folds) > 1 else {})}
        log.info("refit seed %d: val loss %.5g", seed, value)
        study.set_user_attr(REFITS_ATTR, sorted(done.values(), key=lambda r: r["seed"]))
    return study.user_attrs.get(REFITS_ATTR, [])


def noise_summary(values: list[float], refits: list[dict], base_seed: int) -> dict:
    """The spread of the trial scores, the seed noise of the base config, and whether the best trial is told apart
    from the base (best - base beyond NOISE_SDS seed standard deviations); `verdict` in words."""
    trials = {"num_complete": len(values), "best": min(values) if values else None,
              "sd": statistics.stdev(values) if len(values) > 1 else None,
              "range": max(values) - min(values) if values else None}
    out = {"trials": trials, "rule": f"the best trial differs from the base config when base - best exceeds "
                                     f"{NOISE_SDS:g} standard deviations of the base config's score over seeds"}
    scores = [r["value"] for r in refits]
    if len(scores) < 2:
        return {**out, "seed_noise": None, "best_minus_base": None, "distinguishable": None,
                "verdict": "seed noise not measured (etft tune --refits R trains the base config again with R other "
                           "seeds): a difference between trials may be a seed's luck"}
    base = next((r["value"] for r in refits if r["seed"] == base_seed), statistics.fmean(scores))
    sd = statistics.stdev(scores)
    noise = {"num_seeds": len(scores), "seeds": [r["seed"] for r in refits], "scores": scores,
             "base": base, "base_mean": statistics.fmean(scores), "sd": sd, "threshold": NOISE_SDS * sd}
    if not values:
        return {**out, "seed_noise": noise, "best_minus_base": None, "distinguishable": None,
                "verdict": "no complete trial to compare with the base config"}
    best_minus_base = trials["best"] - noise["base_mean"]
    distinguishable = -best_minus_base > noise["threshold"]
    within = trials["range"] <= noise["threshold"]
    shown = (f"best - base = {best_minus_base:+.5g} (base: mean over {len(scores)} seeds {noise['base_mean']:.5g}); "
             f"seed noise: sd {sd:.3g}, {NOISE_SDS:g} sd = {noise['threshold']:.3g}")
    if distinguishable:
        verdict = f"the best trial beats the base config by more than the seed noise: {shown}"
    else:
        verdict = f"the best trial is not distinguishable from the base config: {shown}"
    if within and len(values) > 1:
        verdict += (f". All {len(values)} complete trials lie within the seed noise of each other (range "
                    f"{trials['range']:.3g}): the search found nothing a refit of one config would not move as much")
    return {**out, "seed_noise": noise, "best_minus_base": best_minus_base, "distinguishable": distinguishable,
            "all_trials_within_noise": within, "verdict": verdict}
