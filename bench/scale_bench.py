"""How the pipeline scales with the number of photos. From the project root:

    .venv/bin/python bench/scale_bench.py [--sizes 1000,5000,20000,100000] [--configs default,real-photos]
        [--real-photos-max-n 20000] [--workdir /tmp/cleanmessy-scale] [--jobs 2] [--keep] [--out FILE]
    .venv/bin/python bench/scale_bench.py --render bench/results/scale.json   (print a saved run again)

1. Photos: N synthetic room photos per size point, `cleanmessy.sample.render(label, index, size=384,
   seed=0)` saved as JPEG (quality 90), half "clean" and half "messy". They are rendered once, in
   parallel, into <workdir>/rendered/<label>/<index>.jpg (kept between runs; only missing ones are
   rendered), and each size point's folder source <workdir>/photos-<N>/<label>/<index>.jpg is made
   of hard links to them (ingest refuses symbolic links, not hard links).
2. For each configuration and N, a fresh `git clone` of the repository at HEAD in the workdir, its
   params.yaml edited as `dvc exp run -S` would (ingest.source = the photos, train.epochs = 1, and
   for `real-photos` the changes of experiments/real-photos.yaml), then `cleanmessy <stage>` for
   ingest, split, train and evaluate, each in its own process running the clone's code
   (PYTHONPATH=<clone>/src, so the figures belong to the recorded commit, not to uncommitted edits).
   Per stage: wall seconds and the process's peak RSS (ru_maxrss from os.wait4: the largest of the
   stage process and any child it waited for; the stage code runs in that process). A failing
   stage ends its configuration's series and is reported with the end of its output.
3. A markdown table and the targets, PASS/FAIL: per-photo cost at the largest N over that at 5k
   (<= 1.25), peak RSS at the largest N over that at 1k (<= 1.5), real-photos train peak RSS at
   20k (<= 4 GiB). "GiB" is 2**30 bytes. The raw results, with machine, commit and command line,
   go to --out (bench/results/scale.json), rewritten after every stage.

Nothing is written into the repository except --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from cleanmessy.console import QUIET_ENVIRONMENT
from cleanmessy.params import with_changes
from cleanmessy.sample import CLASSES, render

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WEIGHTS = ROOT.parent / "shared" / "keras-weights"
PHOTO_SIDE = 384
JPEG_QUALITY = 90
STAGES = ("ingest", "split", "train", "evaluate")
CONFIGS = ("default", "real-photos")
GIB = 2**30

# Targets (the issue's): per-photo cost may grow 25 % from 5k to the largest N, peak memory 50 %
# from 1k to the largest N, and real-photos training must fit in 4 GiB at 20k photos.
COST_REFERENCE_N, COST_TARGET = 5000, 1.25
RSS_REFERENCE_N, RSS_TARGET = 1000, 1.5
REAL_PHOTOS_RSS_N, REAL_PHOTOS_RSS_GIB = 20000, 4.0


# ---------------------------------------------------------------- photos


def render_one(job: tuple[str, int, str]) -> None:
    """Render one photo and save it as JPEG (written aside, then renamed: never half a file)."""
    label, index, path = job
    partial = f"{path}.part"
    render(label, index, size=PHOTO_SIDE, seed=0).save(partial, format="JPEG", quality=JPEG_QUALITY)
    os.replace(partial, path)


def render_photos(pool_dir: Path, per_label: int, jobs: int) -> float:
    """Make sure pool_dir/<label>/<index>.jpg exists for index < per_label; seconds it took."""
    started = time.perf_counter()
    todo = []
    for label in CLASSES:
        (pool_dir / label).mkdir(parents=True, exist_ok=True)
        todo += [(label, i, str(pool_dir / label / f"{i}.jpg")) for i in range(per_label)
                 if not (pool_dir / label / f"{i}.jpg").exists()]
    if todo:
        print(f"rendering {len(todo)} photos ({PHOTO_SIDE} px JPEG) with {jobs} processes ...", flush=True)
        with multiprocessing.Pool(jobs) as pool:
            for done, _ in enumerate(pool.imap_unordered(render_one, todo, chunksize=64), 1):
                if done % 10000 == 0:
                    print(f"  {done}/{len(todo)}", flush=True)
    return time.perf_counter() - started


def is_complete(folder: Path, per_label: int) -> bool:
    """Whether folder holds exactly <label>/0.jpg .. <label>/<per_label - 1>.jpg for each label."""
    expected = {f"{i}.jpg" for i in range(per_label)}
    return (sorted(p.name for p in folder.iterdir()) == sorted(CLASSES)
            and all({p.name for p in (folder / label).iterdir()} == expected for label in CLASSES))


def photo_folder(workdir: Path, n: int, pool_dir: Path) -> Path:
    """<workdir>/photos-<n>: hard links to the first n / 2 rendered photos of each label."""
    folder = workdir / f"photos-{n}"
    if folder.is_dir() and is_complete(folder, n // 2):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in CLASSES:
        (folder / label).mkdir(parents=True)
        for i in range(n // 2):
            os.link(pool_dir / label / f"{i}.jpg", folder / label / f"{i}.jpg")
    return folder


# ---------------------------------------------------------------- projects and stages


def stage_env(project: Path, weights: str | None) -> dict[str, str]:
    """As tests/conftest.py's tool_env: the venv's tools first, no remote tracking server, quiet
    libraries (the user's own values win), and the clone's code on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CLEANMESSY_ROOT", "DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE",
                        "PYTHONPATH")}
    env = {**QUIET_ENVIRONMENT, **env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
           "PYTHONPATH": str(project / "src")}
    if weights:
        env["CLEANMESSY_KERAS_WEIGHTS"] = weights
    return env


def config_changes(name: str, project: Path, source: Path) -> dict:
    """The params changes of a configuration, for the clone at `project`."""
    changes = {"ingest": {"source": str(source)}, "train": {"epochs": 1}}
    if name == "real-photos":
        real = yaml.safe_load((project / "experiments" / "real-photos.yaml").read_text())
        changes = with_changes(real, changes)
    return changes


def set_params(project: Path, changes: dict) -> None:
    """Apply `changes` to the clone's params.yaml (its comments are not kept: nobody reads them)."""
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(with_changes(yaml.safe_load(path.read_text()), changes), sort_keys=False))


def fresh_clone(workdir: Path, name: str) -> Path:
    """A `git clone` of the repository (its HEAD) at <workdir>/projects/<name>, replacing any old one."""
    project = workdir / "projects" / name
    shutil.rmtree(project, ignore_errors=True)
    project.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    return project


def run_stage(stage: str, project: Path, env: dict[str, str], log: Path) -> dict:
    """Run `cleanmessy <stage>` in its own process: status, wall seconds, peak RSS (KiB)."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([str(VENV_BIN / "cleanmessy"), stage], cwd=project, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"stage": stage, "seconds": seconds, "peak_rss_kib": usage.ru_maxrss, "exit_status": process.returncode,
              "status": "ok" if process.returncode == 0 else "failed"}
    if process.returncode:
        result["output_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    return result


def run_series(config: str, n: int, source: Path, workdir: Path, weights: str | None, keep: bool,
               record: Callable[[dict], None]) -> None:
    """The four stages of one configuration at one N on a fresh clone; stops at a failed stage."""
    project = fresh_clone(workdir, f"{config}-{n}")
    set_params(project, config_changes(config, project, source))
    env = stage_env(project, weights)
    (workdir / "logs").mkdir(exist_ok=True)
    for stage in STAGES:
        log = workdir / "logs" / f"{config}-{n}-{stage}.log"
        row = {"config": config, "n": n, **run_stage(stage, project, env, log)}
        record(row)
        print(f"{config:12} N={n:<7} {stage:9} {row['seconds']:8.1f} s  {row['peak_rss_kib'] / 2**20:5.2f} GiB"
              f"  {row['status']}", flush=True)
        if row["status"] != "ok":
            print(row["output_tail"], flush=True)
            break
    if not keep:
        shutil.rmtree(project, ignore_errors=True)


# ---------------------------------------------------------------- report


def per_1k(row: dict) -> float:
    return row["seconds"] / row["n"] * 1000


def rss_gib(row: dict) -> float:
    return row["peak_rss_kib"] * 1024 / GIB


def table(rows: list[dict]) -> str:
    """The markdown table of every measured stage."""
    lines = ["| config | N | stage | seconds | seconds per 1k photos | peak RSS (GiB) |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['config']} | {r['n']} | {r['stage']} | {r['seconds']:.1f} | {per_1k(r):.2f} "
                         f"| {rss_gib(r):.2f} |")
        else:
            lines.append(f"| {r['config']} | {r['n']} | {r['stage']} | FAILED (exit {r['exit_status']}) | | |")
    return "\n".join(lines)


def ratio_check(config: str, stage: str, ok: dict[int, dict], largest: int, what: str, reference_n: int) -> dict:
    """One ratio target: the configuration's largest N against reference_n (or the smallest N when
    reference_n was not measured, as in a trial run: the check names the Ns it used). A stage
    with no result at the largest N (it or an earlier stage failed) fails the check."""
    target = COST_TARGET if what == "cost" else RSS_TARGET
    label = "per-photo cost" if what == "cost" else "peak RSS"
    check = {"config": config, "stage": stage, "target": f"<= {target}"}
    if largest not in ok:
        return {**check, "check": f"{label} ratio", "value": None, "result": f"FAIL (no result at N={largest})"}
    if len(ok) < 2:
        return {**check, "check": f"{label} ratio", "value": None, "result": "n/a (fewer than 2 sizes)"}
    reference = reference_n if reference_n in ok and reference_n < largest else min(ok)
    if what == "cost":
        value = per_1k(ok[largest]) / per_1k(ok[reference])
    else:
        value = ok[largest]["peak_rss_kib"] / ok[reference]["peak_rss_kib"]
    return {**check, "check": f"{label} {largest} / {reference}", "value": value,
            "result": "PASS" if value <= target else "FAIL"}


def checks(rows: list[dict]) -> list[dict]:
    """Every target, for each configuration and stage that was measured."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        largest = max(r["n"] for r in rows if r["config"] == config)
        for stage in STAGES:
            ok = {r["n"]: r for r in rows if r["config"] == config and r["stage"] == stage and r["status"] == "ok"}
            out.append(ratio_check(config, stage, ok, largest, "cost", COST_REFERENCE_N))
            out.append(ratio_check(config, stage, ok, largest, "rss", RSS_REFERENCE_N))
        if config == "real-photos":
            train = [r for r in rows if r["config"] == config and r["stage"] == "train" and r["n"] == REAL_PHOTOS_RSS_N]
            check = {"config": config, "stage": "train", "check": f"peak RSS (GiB) at {REAL_PHOTOS_RSS_N}",
                     "target": f"<= {REAL_PHOTOS_RSS_GIB}"}
            if train and train[0]["status"] == "ok":
                value = rss_gib(train[0])
                out.append({**check, "value": value, "result": "PASS" if value <= REAL_PHOTOS_RSS_GIB else "FAIL"})
            else:
                out.append({**check, "value": None,
                            "result": "FAIL (train failed)" if train else f"n/a (N={REAL_PHOTOS_RSS_N} not run)"})
    return out


def checks_table(found: list[dict]) -> str:
    lines = ["| config | stage | check | value | target | result |", "|---|---|---|---:|---|---|"]
    for c in found:
        value = "" if c["value"] is None else f"{c['value']:.2f}"
        lines.append(f"| {c['config']} | {c['stage']} | {c['check']} | {value} | {c['target']} | {c['result']} |")
    return "\n".join(lines)


def report(results: dict) -> str:
    """The table and the checks of a results mapping (as written to --out)."""
    m = results["machine"]
    head = (f"Scale benchmark, commit {results['git_commit'][:10]}, {m['nproc']} CPUs, {m['ram_gib']:.1f} GiB RAM, "
            f"{results['started']}\n`{results['command']}`")
    skipped = "".join(f"\nskipped: {s['config']} N={s.get('n', 'all')}: {s['reason']}" for s in results["skipped"])
    return f"{head}{skipped}\n\n{table(results['rows'])}\n\n{checks_table(checks(results['rows']))}"


# ---------------------------------------------------------------- main


def sizes_arg(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or any(n < 20 or n % 2 for n in sizes):
        raise argparse.ArgumentTypeError("sizes are even numbers of at least 20, comma-separated")
    return sizes


def configs_arg(text: str) -> list[str]:
    configs = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if not configs or unknown:
        raise argparse.ArgumentTypeError(f"configs are some of {','.join(CONFIGS)}")
    return configs


def machine() -> dict:
    return {"nproc": os.cpu_count(), "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
            "platform": platform.platform(), "python": platform.python_version()}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes_arg, default=[1000, 5000, 20000, 100000],
                        help="photos per size point, comma-separated (default 1000,5000,20000,100000)")
    parser.add_argument("--configs", type=configs_arg, default=list(CONFIGS),
                        help="default,real-photos (default both)")
    parser.add_argument("--real-photos-max-n", type=int, default=20000,
                        help="run real-photos only up to this N (default 20000)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cleanmessy-scale"),
                        help="photos, clones and logs (default /tmp/cleanmessy-scale; photos are reused)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes rendering photos")
    parser.add_argument("--keep", action="store_true", help="keep each project clone (default: removed after use)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print the report of a saved run and stop")
    args = parser.parse_args()
    if args.render:
        print(report(json.loads(args.render.read_text())))
        return

    workdir = args.workdir.resolve()
    if workdir == ROOT or ROOT in workdir.parents:
        sys.exit(f"--workdir {workdir} is inside the repository; choose a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    results = {"command": shlex.join([sys.executable, *sys.argv]), "cwd": os.getcwd(),
               "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
               "git_commit": git("rev-parse", "HEAD"),
               "git_uncommitted_not_measured": git("status", "--porcelain", "--untracked-files=no").splitlines(),
               "sizes": args.sizes, "configs": args.configs, "workdir": str(workdir), "photo_side": PHOTO_SIDE,
               "jpeg_quality": JPEG_QUALITY, "epochs": 1, "generation_seconds": {}, "skipped": [], "rows": []}

    weights = os.environ.get("CLEANMESSY_KERAS_WEIGHTS") or (str(WEIGHTS) if WEIGHTS.is_dir() else None)
    plan = []  # (config, n)
    for config in args.configs:
        if config == "real-photos" and not weights:
            reason = f"needs ImageNet weights: no {WEIGHTS} and CLEANMESSY_KERAS_WEIGHTS is not set"
            results["skipped"].append({"config": config, "reason": reason})
            print(f"skipping {config}: {reason}", flush=True)
            continue
        for n in args.sizes:
            if config == "real-photos" and n > args.real_photos_max_n:
                reason = f"N > --real-photos-max-n {args.real_photos_max_n}"
                results["skipped"].append({"config": config, "n": n, "reason": reason})
                print(f"skipping {config} N={n}: {reason}", flush=True)
                continue
            plan.append((config, n))
    if not plan:
        sys.exit("nothing to run")

    pool_dir = workdir / "rendered"
    results["generation_seconds"]["render"] = render_photos(pool_dir, max(n for _, n in plan) // 2, args.jobs)
    sources = {}
    for n in sorted({n for _, n in plan}):
        started = time.perf_counter()
        sources[n] = photo_folder(workdir, n, pool_dir)
        results["generation_seconds"][f"link_{n}"] = time.perf_counter() - started

    def record(row: dict) -> None:
        results["rows"].append(row)
        write(results, out)

    for config, n in plan:
        run_series(config, n, sources[n], workdir, weights if config == "real-photos" else None, args.keep, record)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["checks"] = checks(results["rows"])
    write(results, out)
    print("\n" + report(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
