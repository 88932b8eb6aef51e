"""Raw data → processed training data: `python process_image.py --config config.yaml`.

Reads the `data` section of the config, converts every source to unified samples, decodes every image
once, and writes the train JSONL (`data.output`), the validation JSONL and `<output>.report.json`.
Exit status: 0 when it finished (even with dropped rows), 1 when nothing at all was kept, 2 for a
config or path error (one line on stderr naming the key or the path).
"""

from __future__ import annotations

import argparse
import sys

from dataprocess.pipeline import PathError, process, report_path
from dataprocess.report import format_report
from settings import ConfigError, load_data_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config with a 'data' section")
    args = parser.parse_args(argv)
    try:
        cfg = load_data_config(args.config)
        result = process(cfg)
    except (ConfigError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    report, seconds = result.report, result.seconds
    print(format_report(report))
    n_images = report["images"]["checked"]
    rate = n_images / seconds["images"] if seconds["images"] > 0 else float("inf")
    print(
        f"time: convert {seconds['convert']:.1f}s, images {seconds['images']:.1f}s ({rate:.0f} img/s, "
        f"{cfg.num_workers} workers), write {seconds['write']:.1f}s"
    )
    if report["kept"] == 0:
        print(
            f"error: no sample was kept, nothing written but the report: {report_path(cfg)}", file=sys.stderr
        )
        return 1
    print(
        f"wrote {report['outputs']['train']} ({report['train']}), {report['outputs']['val']} ({report['val']}), "
        f"{report_path(cfg)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
