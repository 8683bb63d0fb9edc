"""`fedmri synth`: write a synthetic multi-hospital DICOM cohort (see fedmri.deploy.cohort)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fedmri.common.layout import HOSPITAL_PREFIX, TEST_SITE
from fedmri.deploy.cohort import MANIFEST, PARTIAL


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmri synth",
        description=(
            "Write a synthetic brain-MRI cohort: N hospitals (each its own scanner profile) "
            "and a held-back test-site, K subjects each, as DICOM series with a "
            "label.nii.gz (0 background, 1 grey matter, 2 white matter) beside every series, "
            "and DIR/cohort.json (written last)."
        ),
    )
    p.add_argument(
        "--hospitals", type=int, default=3, metavar="N", help="training hospitals (default 3)"
    )
    p.add_argument(
        "--subjects",
        type=int,
        default=8,
        metavar="K",
        help="subjects per hospital and for the test-site (default 8)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder; must be empty or absent unless --force",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR, replacing an earlier cohort there",
    )
    p.add_argument(
        "--site",
        default=None,
        metavar="NAME",
        help="write only this site (hospital-N or test-site) of the cohort, as the whole "
        "cohort would hold it",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _clear_old_cohort(out: Path) -> list[str]:
    """Remove what an earlier `fedmri synth` wrote into `out`; leave anything else."""
    removed = []
    for child in sorted(out.iterdir()):
        is_site = child.is_dir() and (
            child.name in (TEST_SITE, PARTIAL)
            or (
                child.name.startswith(HOSPITAL_PREFIX)
                and child.name[len(HOSPITAL_PREFIX) :].isdigit()
            )
        )
        if is_site:
            shutil.rmtree(child)
            removed.append(child.name)
        elif child.name == MANIFEST:
            child.unlink()
            removed.append(child.name)
    return removed


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    err = sys.stderr
    if args.hospitals < 1:
        print(f"fedmri synth: --hospitals must be at least 1, got {args.hospitals}", file=err)
        return 2
    if args.subjects < 2:
        print(
            f"fedmri synth: --subjects must be at least 2 (a hospital needs a training and "
            f"a validation case), got {args.subjects}",
            file=err,
        )
        return 2
    if args.seed < 0:
        print(f"fedmri synth: --seed must be >= 0, got {args.seed}", file=err)
        return 2
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(
            f"fedmri synth: --out {out} exists and is not a folder; choose another path", file=err
        )
        return 2
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            print(
                f"fedmri synth: --out {out} is not empty; choose an empty folder, or pass "
                f"--force to replace a cohort written there before",
                file=err,
            )
            return 2
        removed = _clear_old_cohort(out)
        if removed and not args.quiet:
            print(f"replacing earlier cohort in {out}: removed {', '.join(removed)}", flush=True)

    from fedmri.deploy.cohort.generator import generate_cohort
    from fedmri.deploy.cohort.profiles import ProfileError

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    try:
        manifest = generate_cohort(
            out, args.hospitals, args.subjects, args.seed, progress=progress, site=args.site
        )
    except ProfileError as exc:  # raised before anything is written
        print(f"fedmri synth: {exc}", file=err)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"fedmri synth: {exc}; the cohort in {out} is incomplete (no cohort.json)", file=err)
        return 1
    sites = ", ".join(s["name"] for s in manifest["sites"])
    print(f"cohort seed={args.seed} sites={sites} subjects={len(manifest['subjects'])} out={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
