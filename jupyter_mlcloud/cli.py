"""``jupyter-mlcloud``: command-line entry points for cron jobs and orchestrators.

    jupyter-mlcloud score --model model.pt --input data.zarr --output scores.zarr \\
        [--scheduler tcp://host:8786] [--features a,b] [--batch-size 1024] [--overwrite]
    jupyter-mlcloud serve --model model.pt --name digits --scheduler tcp://host:8786 \\
        [--replicas 2 | --autoscale 1:4] [--max-batch-size 32] [--ca-out digits-ca.pem]
    jupyter-mlcloud endpoints --scheduler tcp://host:8786 [--json]
    jupyter-mlcloud unserve digits --scheduler tcp://host:8786
    jupyter-mlcloud export model.pt digits.onnx [--example rows.npy | --features 64] \\
        [--no-check] [--quantize int8]

    jupyter-mlcloud pipeline run FILE.py[:NAME] [--scheduler ADDR | --cluster-config C.yaml] \\
        [--force [STEP,...]] [--param train.lr=0.05]
    jupyter-mlcloud pipeline schedule FILE.py[:NAME] --cron "0 2 * * *" [--print] \\
        [--via cron|systemd] [--scheduler ADDR | --cluster-config C.yaml]

`serve` prints the endpoint's URL and token (JSON) and writes the PEM that verifies it; the
endpoint lives on the cluster and keeps running after the command exits. `export` needs no
cluster; it prints the result (path, size, opset, parity, latency) as JSON.

Exit codes say what failed: 0 done, 2 bad arguments or input, 3 no cluster to run on,
4 scoring, serving or exporting failed (for `pipeline run`: a step failed), 5 the pipeline is
already running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .flags import (
    add_export_options,
    add_score_options,
    add_serve_options,
    export_keywords,
    serve_keywords,
)

EXIT_OK, EXIT_USAGE, EXIT_CLUSTER, EXIT_FAILED, EXIT_BUSY = 0, 2, 3, 4, 5


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

    p = sub.add_parser("serve", help="serve a saved model as an HTTPS endpoint on a running"
                                     " cluster; it keeps running after this command exits")
    p.add_argument("--model", required=True,
                   help="torch.save-d model, torch.export .pt2, or models:/NAME@ALIAS")
    add_serve_options(p)
    _scheduler_options(p)
    p.add_argument("--ca-out", help="where to write the PEM that verifies the endpoint's"
                                    " certificate (default: ./NAME-ca.pem)")

    p = sub.add_parser("endpoints", help="list the endpoints running on a cluster")
    _scheduler_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("unserve", help="stop an endpoint: its router and every replica")
    p.add_argument("endpoint", metavar="NAME", help="the endpoint's name")
    _scheduler_options(p)

    p = sub.add_parser("export", help="export a saved model to ONNX (.onnx) or torch.export"
                                      " (.pt2), checked against the eager model")
    p.add_argument("model", metavar="MODEL",
                   help="torch.save-d model, torch.export .pt2, or models:/NAME@ALIAS")
    p.add_argument("path", metavar="PATH", help="where to write it: a .onnx or .pt2 file")
    add_export_options(p)

    p = sub.add_parser("pipeline", help="run or schedule a pipeline defined in a Python file")
    steps = p.add_subparsers(dest="action", required=True)
    for action, text in (("run", "run it now, printing each step's state; exit 4 if a step"
                                 " failed"),
                         ("schedule", "install a crontab entry (or systemd timer) that runs"
                                      " it, with no Jupyter server needed")):
        q = steps.add_parser(action, help=text)
        q.add_argument("spec", metavar="FILE.py[:NAME]", help="the file, and the pipeline's"
                       " name if it defines several")
        q.add_argument("--scheduler", help="Dask scheduler address or scheduler file")
        q.add_argument("--cluster-config", help="YAML of Dask config to build the cluster"
                                                " from (mlcloud.cluster.factory, ...)")
        q.add_argument("--timeout", type=float, default=30.0,
                       help="seconds to reach the scheduler")
    run_p, schedule_p = steps.choices["run"], steps.choices["schedule"]
    run_p.add_argument("--workers", type=int, help="start a local cluster of N workers")
    run_p.add_argument("--force", nargs="?", const="*", metavar="STEP,...",
                       help="rerun these steps (all, if none named) even if cached")
    run_p.add_argument("--param", action="append", metavar="NAME=VALUE",
                       help="override a param: STEP.NAME=VALUE or NAME=VALUE (JSON values)")
    schedule_p.add_argument("--cron", required=True, help='when, e.g. "0 2 * * *"')
    schedule_p.add_argument("--print", dest="print_only", action="store_true",
                            help="print what would be installed; install nothing")
    schedule_p.add_argument("--via", help="cron or systemd (default: cron where there is one)")
    schedule_p.add_argument("--log", help="file the runs append to (./pipeline-run.log)")
    return parser


def _scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", required=True,
                   help="the cluster's Dask scheduler: an address such as tcp://host:8786 or"
                        " a scheduler file")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to reach the scheduler")


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


def _on_cluster(args: argparse.Namespace, action: Callable[[Any], int]) -> int:
    """``action(cluster)`` on the cluster at ``--scheduler``, with the exit code it gives;
    ValueError is bad input (one sentence on stderr), anything else a failure. Only this
    process's connection is closed afterwards, never the cluster or its endpoints."""
    from .cluster import api as clusters

    try:
        cluster = clusters.connect(args.scheduler, timeout=args.timeout)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    try:
        return action(cluster)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"jupyter-mlcloud {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        cluster.close()


def serve_command(args: argparse.Namespace) -> int:
    from .serving.api import serve
    from .serving.catalog import versions_text, write_ca

    ca_out = os.path.abspath(args.ca_out or f"{args.name}-ca.pem")
    if not os.path.isdir(os.path.dirname(ca_out)):
        print(f"jupyter-mlcloud: --ca-out {args.ca_out!r}: its folder does not exist; nothing"
              " was started.", file=sys.stderr)
        return EXIT_USAGE

    def run(cluster: Any) -> int:
        endpoint = serve(args.model, cluster=cluster, **serve_keywords(args))
        try:
            write_ca(endpoint, ca_out)
        except OSError as e:
            endpoint.close()
            raise ValueError(f"cannot write --ca-out {ca_out!r} ({e.strerror}); the endpoint"
                             " was stopped.") from None
        print(json.dumps({"name": endpoint.name, "url": endpoint.url,
                          "infer_url": endpoint.infer_url(), "token": endpoint.token,
                          "ca_file": ca_out, "versions": versions_text(endpoint.versions),
                          "replicas": len(endpoint.replicas)}))
        return EXIT_OK

    return _on_cluster(args, run)


def endpoints_command(args: argparse.Namespace) -> int:
    from .serving.catalog import table

    def run(cluster: Any) -> int:
        found = table(cluster)
        if args.json:
            for record in json.loads(found.to_json(orient="records")):
                print(json.dumps(record))
        elif found.empty:
            print("No endpoints on this cluster.")
        else:
            print(found.to_string(index=False))
        return EXIT_OK

    return _on_cluster(args, run)


def unserve_command(args: argparse.Namespace) -> int:
    from .serving.catalog import find

    def run(cluster: Any) -> int:
        find(args.endpoint, cluster).close()
        print(f"Stopped endpoint {args.endpoint!r}.")
        return EXIT_OK

    return _on_cluster(args, run)


def export_command(args: argparse.Namespace) -> int:
    from .export import export

    try:
        result = export(args.model, args.path, **export_keywords(args))
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"jupyter-mlcloud export failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result.to_dict()))
    return EXIT_OK


def pipeline_command(args: argparse.Namespace) -> int:
    from .pipelines import PipelineBusy, schedule, script

    try:
        if args.action == "schedule":
            print(schedule.schedule(args.spec, args.cron, via=args.via,
                                    print_only=args.print_only, scheduler=args.scheduler,
                                    cluster_config=args.cluster_config, log=args.log))
            return EXIT_OK
        pipe = script.load(args.spec)
        params = script.parse_params(args.param)
        force = (True if args.force == "*" else args.force.split(",")) if args.force else False
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"jupyter-mlcloud pipeline {args.action} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        cluster = script.open_cluster(scheduler=args.scheduler,
                                      cluster_config=args.cluster_config,
                                      workers=args.workers, timeout=args.timeout)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    try:
        result = pipe.run(cluster=cluster, force=force, params=params)
    except ValueError as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineBusy as e:
        print(f"jupyter-mlcloud: {e}", file=sys.stderr)
        return EXIT_BUSY
    finally:
        if cluster is not None:
            cluster.close()
    print(result)
    for step in result.steps.values():
        if step.error:
            print(f"--- {step.name} failed:\n{step.error}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "score": score_command, "serve": serve_command, "endpoints": endpoints_command,
    "unserve": unserve_command, "export": export_command, "pipeline": pipeline_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jupyter-mlcloud`` console script."""
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)  # argparse already refused anything else


if __name__ == "__main__":
    sys.exit(main())
