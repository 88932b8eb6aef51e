"""Raw data → processed training data: `python process_image.py --config config.yaml [--cache-features]`.

Reads the `data` section of the config, converts every source to unified samples, decodes every image
once, and writes the train JSONL (`data.output`), the validation JSONL and `<output>.report.json`. The two
JSONL files are published as one set (links through one pointer, `common.fileset`): a killed run leaves the
previous pair or the new one. An output that is one of the annotations files is an error.

With --cache-features it then also computes the frozen vision tower's patch features of every image of the
written files into the folder `data.feature_cache` (this needs the `model` section too: `vision_path`,
`vision_feature_layer`); train.py reads features from that folder whenever `data.feature_cache` is set, and
never runs the tower. A cache that is up to date is reused, one missing images is completed, one of another
tower, layer or preprocessing is refused unless --rebuild-features (see dataprocess/features.py).

Exit status: 0 when it finished (even with dropped rows or skipped images), 1 when nothing at all was kept,
2 for a config, path or feature-cache error (one line on stderr naming the key or the path).
"""

from __future__ import annotations

import argparse
import os
import sys

from settings import ConfigError, ModelConfig, load_config


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Exit status: 0 done, 1 nothing kept, 2 config or path error.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML config with a 'data' section")
    parser.add_argument(
        "--cache-features", action="store_true",
        help="also compute the vision tower's features of every kept image into data.feature_cache (needs the 'model' "
        "section; on the GPU in bf16 if there is one, else on the CPU in fp32)",
    )
    parser.add_argument(
        "--rebuild-features", action="store_true",
        help="with --cache-features: recompute every feature, replacing whatever cache is in data.feature_cache",
    )
    args = parser.parse_args(argv)
    if args.rebuild_features and not args.cache_features:
        parser.error("--rebuild-features goes with --cache-features")
    return args


def check_feature_cache_config(config, rebuild: bool) -> ModelConfig:
    """Before any processing: the model section and the cache folder can give a cache (ConfigError/PathError)."""
    from dataprocess.features import FeatureCacheError, cache_identity, check_reusable
    from dataprocess.pipeline import PathError
    from visual import CheckpointError, inspect_vision_checkpoint

    cache_folder = config.data.feature_cache
    if not cache_folder:
        raise ConfigError(f"{config.path}: data.feature_cache: set it to a folder to use --cache-features")
    model = config.require("model")
    if not os.path.isdir(model.vision_path):
        raise PathError(f"model.vision_path: folder not found: {model.vision_path}")
    try:  # the weights too, from their headers: a broken tower folder fails now, not after the whole data pass
        inspect_vision_checkpoint(model.vision_path)
    except CheckpointError as e:
        raise PathError(f"model.vision_path: {e}") from e
    try:
        check_reusable(cache_folder, cache_identity(model.vision_path, model.vision_feature_layer), rebuild)
    except FeatureCacheError as e:
        raise PathError(str(e)) from e
    except (OSError, ValueError) as e:  # the tower's folder or its JSON files
        raise PathError(f"model.vision_path {model.vision_path}: {e}") from e
    return model


def cache_features(cfg, model: ModelConfig, rebuild: bool) -> None:
    from dataprocess.features import build_feature_cache, format_result, images_of_jsonl

    paths = images_of_jsonl([cfg.output, cfg.resolved_val_output()])
    result = build_feature_cache(
        paths, cfg.feature_cache, vision_path=model.vision_path, vision_feature_layer=model.vision_feature_layer,
        num_workers=cfg.num_workers, rebuild=rebuild,
    )
    print(format_result(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after the arguments are parsed: the image code imports torch (seconds), `--help` should not.
    from dataprocess.pipeline import PathError, process, report_path
    from dataprocess.report import format_report

    try:
        config = load_config(args.config, sections=("data", "model") if args.cache_features else ("data",))
        cfg = config.require("data")
        model = check_feature_cache_config(config, args.rebuild_features) if args.cache_features else None
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
    if model is not None:
        from dataprocess.features import FeatureCacheError

        try:
            cache_features(cfg, model, args.rebuild_features)
        except FeatureCacheError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # disk full, no permission
            print(f"error: cannot write the feature cache {cfg.feature_cache}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
