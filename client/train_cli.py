"""Baselines and evaluation on the hospital side.

`fedmri train --central` trains one model on the pooled training splits of all hospitals (the
upper bound a federation aims at); `fedmri train --local HOSPITAL` trains on one site alone.
Both use the same splits, model, optimiser and total epochs as `fedmri simulate`
(rounds x local epochs) and write the same report shape.
`fedmri evaluate --model M --data DIR` scores a saved model on a hospital folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedmri.client.hospital_data import HospitalData, load_hospital
from fedmri.client.trainer import EvalResult, evaluate, predict, train_local
from fedmri.common.checkpoint import save_json, save_model
from fedmri.common.config import (
    FEDERATION_ONLY,
    RunConfig,
    add_run_config_args,
    run_config_from_args,
)
from fedmri.common.layout import TEST_SITE, hospital_dirs
from fedmri.common.models import build_model, load_model
from fedmri.proto import files
from fedmri.proto.report import HospitalRound, RoundRecord


def run_baseline(data: Path, out: Path, cfg: RunConfig, hospitals: int,
                 local: str | None) -> dict[str, Any]:
    """Train centrally (local=None) or on one hospital; report per round of local_epochs."""
    started = time.perf_counter()
    sites = hospital_dirs(data)[:hospitals]
    by_name: dict[str, HospitalData] = {s.name: load_hospital(s, cfg) for s in sites}
    if local is not None and local not in by_name:
        raise ValueError(f"hospital '{local}' not in {sorted(by_name)}")
    train_cases = (by_name[local].train if local else
                   [c for d in by_name.values() for c in d.train])
    model = build_model(cfg)
    rounds = []
    for rnd in range(1, cfg.rounds + 1):
        result = train_local(model, train_cases, cfg, epochs=cfg.local_epochs,
                             seed=cfg.seed + 1000 * rnd)
        scores = {name: evaluate(model, d.val, cfg) for name, d in by_name.items()}
        n_val = sum(len(d.val) for d in by_name.values())
        record = RoundRecord(
            round=rnd, seconds=result.seconds, train_seconds=result.seconds,
            global_val_dice=sum(s.dice * len(by_name[n].val) for n, s in scores.items()) / n_val,
            hospitals={name: HospitalRound(
                num_examples=len(by_name[name].train),
                train_loss=result.loss if local in (None, name) else None,
                val_dice=s.dice, val_loss=s.loss) for name, s in scores.items()})
        rounds.append(record.to_dict())
        print(f"round {rnd}: loss {result.loss:.3f}, global validation Dice "
              f"{record.global_val_dice:.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / files.GLOBAL_MODEL, model.state_dict(), cfg.to_dict())
    test = score_site(out / files.GLOBAL_MODEL, data / TEST_SITE, out / files.SAMPLE)
    report = {
        "config": {**cfg.to_dict(), "mode": f"local:{local}" if local else "central",
                   "hospitals": list(by_name), "data": str(data)},
        "rounds": rounds,
        "test_dice": test["dice"],
        "test_dice_per_class": test["per_class"],
        "seconds": {"total": time.perf_counter() - started},
    }
    save_json(out / files.REPORT, report)
    return report


def score_site(model_path: Path, site: Path, sample_png: Path | None) -> dict[str, Any]:
    model, cfg = load_model(model_path)
    data = load_hospital(site, cfg)
    cases = data.train + data.val  # a test site is scored on all of its cases
    result: EvalResult = evaluate(model, cases, cfg)
    if sample_png is not None:
        from fedmri.client.viz import save_sample

        pred, _ = predict(model, cases[0].image, cfg)
        save_sample(cases[0].image[0], cases[0].label, pred, sample_png,
                    f"{site.name} / {cases[0].name} "
                    f"(site Dice over {len(cases)} cases: {result.dice:.3f})")
    return {"dice": result.dice, "per_class": result.per_class, "loss": result.loss,
            "cases": len(cases), "site": str(site), "rejected": data.rejected}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmri train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--central", action="store_true", help="pool all hospitals' data")
    mode.add_argument("--local", metavar="HOSPITAL", help="train on one hospital alone")
    parser.add_argument("--data", type=Path, required=True, help="cohort folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hospitals", type=int, default=3)
    add_run_config_args(parser, skip=FEDERATION_ONLY)
    args = parser.parse_args(argv)
    try:
        cfg = run_config_from_args(args)
        report = run_baseline(args.data, args.out, cfg, args.hospitals, args.local)
    except (ValueError, FileNotFoundError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 1
    print(f"test-site Dice {report['test_dice']:.3f}; wrote {args.out}/{files.REPORT}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmri evaluate",
                                     description="Dice of a saved model on a hospital folder")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="one hospital's folder")
    parser.add_argument("--sample-png", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = score_site(args.model, args.data, args.sample_png)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.data}: Dice {result['dice']:.3f} over {result['cases']} cases "
              f"(per class {', '.join(f'{v:.3f}' for v in result['per_class'])})")
    return 0
