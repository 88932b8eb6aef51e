"""Run the CPU demo (`bash train.sh`) for several seeds and print one table: accuracy and time per stage.

    python bench/demo_seeds.py --seeds 0 1 2
    python bench/demo_seeds.py --seeds 1 --set demo.pretrain_steps=600 --set training.num_train_epochs=3
    python bench/demo_seeds.py --report /tmp/demo_seeds            # print the table of finished runs again

Each seed runs in its own folder `<root>/seed<N>/` (a copy of the config with `demo.seed` and `training.seed`
set to N and the `--set` overrides applied; its relative paths, so the demo's workdir and output, land in that
folder), so runs never collide with each other or with the checkout's own `.demo` and `outputs`. The run is
exactly `bash train.sh` with CONFIG pointing at that copy; each Python process train.sh starts goes through a
small wrapper that records its wall time and CPU time (user + system, children included) in `stages.jsonl`.
`demo.prepare` adds its own split (tiny CLIP, tiny QWen, images) in `<workdir>/prepare_report.json`.

The machine's load average is recorded at the start and end of each run: wall times on a shared machine are
inflated, CPU times much less so. Results go to `<root>/results.json` too.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: the checkout's root on the path instead of bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # whose modules would shadow top-level ones

import argparse
import json
import os
import platform
import subprocess
import time

import yaml

from common.fileio import write_json, write_text

REPO = Path(__file__).resolve().parent.parent

WRAPPER = """#!{python}
# Written by bench/demo_seeds.py: runs the real Python on the same arguments, timing it.
import json, os, resource, subprocess, sys, time
start = time.time()
rc = subprocess.call([{python!r}, *sys.argv[1:]])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "wall_s": round(time.time() - start, 1),
                        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "rc": rc}}) + "\\n")
sys.exit(rc)
"""


def stage_name(argv: list[str]) -> str:
    if argv[:1] == ["-m"] and len(argv) > 1:
        return argv[1].rsplit(".", 1)[-1]  # demo.prepare -> prepare, demo.evaluate -> evaluate
    return Path(argv[0]).stem if argv else "?"  # process_image.py -> process_image, train.py -> train


def set_dotted(config: dict, key: str, value) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_set(items: list[str]) -> list[tuple[str, object]]:
    out = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value)))
    return out


def run_seed(seed: int, base_config: Path, root: Path, overrides, python: str) -> dict:
    folder = root / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(base_config.read_text())
    set_dotted(config, "demo.seed", seed)
    set_dotted(config, "training.seed", seed)
    for key, value in overrides:
        set_dotted(config, key, value)
    config_path = folder / "config.yaml"
    write_text(config_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    stages = folder / "stages.jsonl"
    stages.unlink(missing_ok=True)
    wrapper = folder / "python"
    wrapper.write_text(WRAPPER.format(python=python, log=str(stages)))
    wrapper.chmod(0o755)

    env = dict(os.environ, CONFIG=str(config_path), PYTHON=str(wrapper))
    for name in ("LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LR", "PROJECTOR_LR", "EPOCHS", "BATCH_SIZE", "GRAD_ACCUM",
                 "SAVE_STEPS", "NPROC", "STAGE"):
        env.pop(name, None)  # the config alone decides
    env["NPROC"] = "1"
    load_before = os.getloadavg()
    started = time.time()
    with open(folder / "train.log", "w") as log:
        rc = subprocess.call(["bash", str(REPO / "train.sh")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    result = {"seed": seed, "rc": rc, "wall_s": round(time.time() - started, 1), "load_before": load_before,
              "load_after": os.getloadavg(), "folder": str(folder), "overrides": [f"{k}={v}" for k, v in overrides]}
    return collect(folder, result)


def collect(folder: Path, result: dict) -> dict:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    stages = []
    if (folder / "stages.jsonl").is_file():
        stages = [json.loads(line) for line in (folder / "stages.jsonl").read_text().splitlines() if line.strip()]
    result["stages"] = [{"stage": stage_name(s["argv"]), **{k: s[k] for k in ("wall_s", "cpu_s", "rc")}}
                        for s in stages]
    workdir = folder / config["demo"].get("workdir", ".demo")
    report = workdir / "prepare_report.json"
    if report.is_file():
        result["prepare"] = json.loads(report.read_text())
    output = folder / config["training"]["output_dir"]
    evaluation = output / "demo_eval.json"
    if evaluation.is_file():
        result["eval"] = json.loads(evaluation.read_text())
    return result


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: list[dict]) -> str:
    head = ["seed", "with image", "blind", "shuffled (shown / own image)", "colour", "shape", "corner", "en", "zh",
            "text-only: with image / blind", "never-seen: with image / blind",
            "prepare s", "process s", "train s", "evaluate s", "total s (cpu s)", "load 1-min"]
    rows = []
    for r in results:
        e = r.get("eval") or {}
        by_attr = e.get("by_attribute", {})
        by_lang = e.get("by_language", {})
        sets = e.get("wordings") or {}
        times: dict[str, list[float]] = {}
        for s in r.get("stages", []):
            times.setdefault(s["stage"], []).append(s["wall_s"])
        cpu = sum(s["cpu_s"] for s in r.get("stages", []))

        def t(name, times=times):
            return "+".join(f"{v:.0f}" for v in times.get(name, [])) or "-"

        rows.append([
            str(r["seed"]) + ("" if r.get("rc", 0) == 0 else f" (rc {r['rc']})"),
            fmt(e.get("accuracy_with_image")), fmt(e.get("accuracy_blind")),
            f"{fmt(e.get('accuracy_shuffled'))} / {fmt(e.get('accuracy_shuffled_own'))}",
            *(fmt(by_attr.get(k, {}).get("with_image")) for k in ("colour", "shape", "position")),
            *(fmt(by_lang.get(k, {}).get("with_image")) for k in ("en", "zh")),
            *(f"{fmt(sets.get(w, {}).get('with_image'))} / {fmt(sets.get(w, {}).get('blind'))}"
              for w in ("text_only", "never_seen")),
            t("prepare"), t("process_image"), t("train"), t("evaluate"),
            f"{r.get('wall_s', 0):.0f} ({cpu:.0f})",
            f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" if "load_before" in r else "-",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    details = []
    for r in results:
        p = r.get("prepare")
        if p:
            parts = [f"{k} {v:.0f} s" for k, v in p.get("seconds", {}).items()]
            text = p.get("text_accuracy")
            line = f"seed {r['seed']} prepare: " + ", ".join(parts)
            if p.get("clip_final_loss") is not None:
                line += f"; CLIP final loss {p['clip_final_loss']:.3f}"
            if p.get("text_final_loss") is not None:
                line += f"; text final loss {p['text_final_loss']:.3f}"
            if text:
                line += "; text answers right: " + ", ".join(f"{k} {v:.2f}" for k, v in text.items())
            details.append(line)
    return "\n".join(lines + ([""] + details if details else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="the demo config to start from")
    parser.add_argument("--root", default="/tmp/demo_seeds", help="one folder per seed is made in it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. training.num_train_epochs=3 (YAML value); repeatable")
    parser.add_argument("--report", metavar="ROOT", help="only print the table of the runs already in ROOT")
    args = parser.parse_args(argv)

    if args.report:
        root = Path(args.report)
        results = [collect(f, {"seed": int(f.name[4:])}) for f in sorted(root.glob("seed*")) if f.name[4:].isdigit()]
        print(table(results))
        return 0
    config = Path(args.config)
    if not config.is_file() or "demo" not in (yaml.safe_load(config.read_text()) or {}):
        print(f"demo_seeds.py: error: {config} is not a demo config (no 'demo' section)", file=sys.stderr)
        return 2
    overrides = parse_set(args.set)
    root = Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"commit {git_commit()}", flush=True)
    results = []
    for seed in args.seeds:
        print(f"seed {seed}: running bash train.sh in {root / f'seed{seed}'} ...", flush=True)
        results.append(run_seed(seed, config, root, overrides, sys.executable))
        write_json(root / "results.json", results)
        print(table(results[-1:]).splitlines()[2], flush=True)
    print()
    print(table(results))
    return 0 if all(r["rc"] == 0 for r in results) else 1


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
