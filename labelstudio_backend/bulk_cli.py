"""`seggpt labelstudio predict --project ID`: the command line of bulk.py. Importing it loads argparse only."""

from __future__ import annotations

import argparse
import os

PREDICT_HELP = """Label Studio's URL and key are taken as `serve` takes them: --label-studio-url or $LABEL_STUDIO_URL,
$LABEL_STUDIO_API_KEY (legacy token or personal access token). The project's settings are the extra params
of its model connection to the backend, read from Label Studio (else those of the backend's last /setup, in
--state-dir), unless --extra-params gives them; the SEGGPT_* variables apply as they do to `serve`, so the
predictions carry the model_version `serve` would give them. A task predicted now loses this backend's
predictions of older versions unless --keep-old-predictions (or the param keep_old_predictions) says so.

exit status: 0 all predicted (or skipped), 1 some tasks failed, 2 a bad input (nothing was run)"""


def register_predict(commands) -> None:
    predict = commands.add_parser(
        "predict", help="pre-annotate a whole project: segment its unlabelled tasks and post the predictions",
        description="Segment every task of a Label Studio project that has no annotation, from its annotated tasks, "
                    "with the resumable scale pipeline (in this process or on Ray), and post the predictions in "
                    "batches. Tasks that already have a prediction of this model version are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PREDICT_HELP)
    predict.add_argument("--project", type=int, required=True, metavar="ID", help="the Label Studio project id")
    predict.add_argument("--label-studio-url", default=None, help="Label Studio's URL (default: $LABEL_STUDIO_URL)")
    predict.add_argument("--work", default=None, metavar="DIR",
                         help="working folder: downloaded images, the manifest and the pipeline's outputs; a killed "
                              "run started again resumes from it (default: <state dir>/bulk/project-ID)")
    predict.add_argument("--state-dir", default=None, help="the backend's state directory (default: $SEGGPT_STATE_DIR "
                         "or ~/.local/state/seggpt-labelstudio)")
    model = predict.add_argument_group("model")
    model.add_argument("--model", default=None, help="hub id, transformers directory, Painter .pth, 'demo' or 'auto' "
                       "(default: $SEGGPT_MODEL, else the hub weights if cached, else demo)")
    model.add_argument("--device", default=None, help="cuda, mps or cpu (default: $SEGGPT_DEVICE or the best available)")
    model.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: $SEGGPT_DTYPE, else bf16 "
                       "on CUDA and on CPUs that compute it in hardware, else fp32)")
    model.add_argument("--quantize", choices=["int8"], default=None, help="CPU: int8 linear layers (default: none)")
    model.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: $SEGGPT_THREADS, else the CPUs this process may use)")
    model.add_argument("--batch-size", type=int, default=None,
                       help="targets per forward pass (default: $SEGGPT_BATCH_SIZE, else 8)")
    scale = predict.add_argument_group("scale")
    scale.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local (in this process) or ray (Ray Data: a local Ray, or the cluster of --ray-address / "
                            "$RAY_ADDRESS) (default: %(default)s)")
    scale.add_argument("--ray-address", default=None, metavar="ADDR", help="ray: an existing Ray cluster (implies "
                       "--engine ray; default: $RAY_ADDRESS, else a local Ray started for the run)")
    scale.add_argument("--actors", type=int, default=1, help="ray: model copies (actors) (default: %(default)s)")
    scale.add_argument("--gpus-per-actor", type=float, default=0, help="ray: GPUs per actor (default: %(default)s)")
    scale.add_argument("--cpus-per-actor", type=float, default=1, help="ray: CPUs per actor (default: %(default)s)")
    scale.add_argument("--post-batch", type=int, default=100, help="predictions per import request (default: %(default)s)")
    predict.add_argument("--extra-params", default=None, metavar="JSON",
                         help="the project settings, as the model connection's extra params (e.g. '{\"tile\": 512}'); "
                              "default: the connection's, read from Label Studio")
    predict.add_argument("--keep-old-predictions", action="store_true", default=None,
                         help="keep this backend's predictions of older versions on the tasks predicted now "
                              "(default: they are deleted, unless the param keep_old_predictions is true)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(handler=cmd_predict)


def cmd_predict(args) -> int:
    import logging
    import sys

    def fail(message: str) -> int:
        print(f"seggpt labelstudio predict: {message}", file=sys.stderr)
        return 2

    if args.actors < 1 or (args.batch_size is not None and args.batch_size < 1) or args.post_batch < 1:
        return fail("--actors, --batch-size and --post-batch must be >= 1")
    try:
        import label_studio_sdk  # noqa: F401
    except ImportError as exc:
        return fail(f"{exc.name} is missing; install the extra (pip install -e '.[labelstudio]' in a clone of seggpt-plugins)")
    from seggpt_plugins.errors import SegGPTError

    from .bulk import BulkError, predict_project
    from .settings import Settings, default_state_dir

    try:
        settings = Settings.from_env(label_studio_url=args.label_studio_url, model=args.model, device=args.device,
                                     dtype=args.dtype, quantize=args.quantize, batch_size=args.batch_size,
                                     state_dir=args.state_dir)
    except ValueError as exc:
        return fail(str(exc))
    settings.state_dir = os.path.abspath(os.path.expanduser(settings.state_dir or default_state_dir()))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    engine = "ray" if args.ray_address else args.engine
    try:
        summary = predict_project(settings, args.project, work=args.work, engine=engine, ray_address=args.ray_address,
                                  actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                  cpus_per_actor=args.cpus_per_actor, threads=args.threads,
                                  progress=not args.quiet, post_batch=args.post_batch,
                                  extra_params=args.extra_params, keep_old_predictions=args.keep_old_predictions,
                                  say=lambda line: print(line, file=sys.stderr, flush=True))
    except (BulkError, SegGPTError) as exc:
        return fail(str(exc))
    for task_id, reason in summary.reasons[:20]:
        print(f"task {task_id}: {reason}", file=sys.stderr)
    if len(summary.reasons) > 20:
        print(f"... and {len(summary.reasons) - 20} more failed task(s)", file=sys.stderr)
    print(summary.line())
    return 1 if summary.failed else 0
