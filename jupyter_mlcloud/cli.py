"""``jupyter-mlcloud``: command-line entry points for cron jobs and orchestrators.

    jupyter-mlcloud score --model model.pt --input data.zarr --output scores.zarr \\
        [--scheduler tcp://host:8786] [--features a,b] [--batch-size 1024] [--overwrite]

Exit codes say what failed: 0 done, 2 bad arguments or input, 3 no cluster to run on,
4 scoring failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .flags import add_score_options

EXIT_OK, EXIT_USAGE, EXIT_CLUSTER, EXIT_FAILED = 0, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jupyter-mlcloud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a dataset with a saved model, write the scores")
    p.add_argument("--model", required=True,
                   help="torch.save-d model, torch.export .pt2, or models:/NAME@ALIAS")
    p.add_argument("--input", required=True, help="zarr store, parquet dataset or netCDF file")
    p.add_argument("--output", required=True, help=".zarr store (or .parquet for tables)")
    p.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--workers", type=int, help="workers of the local cluster (default: auto)")
    add_score_options(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to reach the scheduler")
    return parser


def score_command(args: argparse.Namespace) -> int:
    from .cluster import api as clusters
    from .scoring.api import score

    try:
        if args.scheduler:
            cluster = clusters.connect(args.scheduler, timeout=args.timeout)
        else:
            cluster = clusters.up(workers=args.workers)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    try:
        features = [f.strip() for f in args.features.split(",")] if args.features else None
        report = score(args.model, args.input, features=features, sample_dim=args.sample_dim,
                       batch_size=args.batch_size, output=args.output,
                       overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                       cluster=cluster, progress=sys.stderr.isatty(), track=args.track)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"jupyter-mlcloud: scoring failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        cluster.close()
    print(json.dumps({"output": report.output, **report.summary,
                      "mlflow_run_id": report.mlflow_run_id}))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jupyter-mlcloud`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "score":
        return score_command(args)
    return EXIT_USAGE  # argparse already refused anything else


if __name__ == "__main__":
    sys.exit(main())
