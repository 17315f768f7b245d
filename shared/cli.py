"""``voxelflow`` command line (also ``python -m shared.cli``): tokens, configuration, the local stack, training,
model export.

``tokens`` talks to the database named by ``VOXELFLOW_DATABASE_URL`` (after running migrations);
``config`` lists every ``VOXELFLOW_*`` variable of the shared settings and of each service's settings
class with its default and description.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from shared.settings import VoxelflowSettings

SERVICES_DIR = Path(__file__).resolve().parents[1] / "services"


def _settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    found: list[tuple[str, type[BaseSettings]]] = [("shared", VoxelflowSettings)]
    for path in sorted(SERVICES_DIR.glob("*/settings.py")):
        module = importlib.import_module(f"services.{path.parent.name}.settings")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, VoxelflowSettings) and value is not VoxelflowSettings:
                found.append((path.parent.name, value))
    return found


def print_config() -> None:
    shared_fields = set(VoxelflowSettings.model_fields)
    for owner, cls in _settings_classes():
        print(f"# {owner}")
        for name, field in cls.model_fields.items():
            if owner != "shared" and name in shared_fields:
                continue
            default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
            print(f"VOXELFLOW_{name.upper()}  (default: {default!r})\n    {field.description or ''}")
        print()


def tokens(args: argparse.Namespace) -> None:
    from shared.auth import Role, create_token, revoke_token
    from shared.db import models
    from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope

    settings = VoxelflowSettings()
    run_migrations(settings.database_url, models.MIGRATIONS, models.VERSION_TABLE)
    factory = make_session_factory(make_engine(settings.database_url))
    with session_scope(factory) as session:
        if args.action == "create":
            secret = create_token(session, args.name, Role(args.role))
            print(secret)
            print(f"token {args.name!r} ({args.role}) created; it is shown only once", file=sys.stderr)
        elif not revoke_token(session, args.name):
            sys.exit(f"no active token named {args.name!r}")


def datasets(args: argparse.Namespace) -> None:
    """``voxelflow datasets``: import an MSD folder and build a version, list versions, show one.

    Runs the preprocessing domain code in this process against the environment's database and storage
    (VOXELFLOW_DATABASE_URL, VOXELFLOW_STORAGE_URL), so it works without the API or a worker running.
    """
    import json
    import uuid

    from services.preprocessing.context import PreprocessingContext
    from services.preprocessing.models import DatasetBuild, DatasetVersion
    from services.preprocessing.settings import PreprocessingSettings
    from shared.db.base import session_scope

    ctx = PreprocessingContext(PreprocessingSettings())
    ctx.migrate()
    if args.action == "import-msd":
        from services.preprocessing.dataset_builder import BuildRequest, SiteOptions, SplitOptions, build_version
        from services.preprocessing.msd_import import import_msd

        def progress(done: int, total: int, case_id: str) -> None:
            if done % 25 == 0 or done == total:
                print(f"  imported {done}/{total} ({case_id})", file=sys.stderr)

        result = import_msd(
            ctx.store, ctx.session_factory, Path(args.path), collection=args.collection, progress=progress
        )
        print(
            f"collection {result.collection!r}: {result.counts} in {result.seconds:.1f} s"
            + (f"; {len(result.errors)} case(s) skipped" if result.errors else ""),
            file=sys.stderr,
        )
        for case_id, reason in result.errors.items():
            print(f"  skipped {case_id}: {reason}", file=sys.stderr)
        manifest_csv = Path(args.site_manifest).read_text() if args.site_manifest else None
        request = BuildRequest(
            name=args.name or result.collection,
            collection=result.collection,
            spec=args.spec,
            sites=SiteOptions(
                strategy="manifest" if manifest_csv else args.site_strategy,
                n_sites=args.sites,
                seed=args.seed,
                heterogeneity=args.heterogeneity,
                manifest_csv=manifest_csv,
            ),
            splits=SplitOptions(k_folds=args.folds, seed=args.seed),
        )
        build_id = str(uuid.uuid4())
        with session_scope(ctx.session_factory) as session:
            session.add(
                DatasetBuild(
                    id=build_id, name=request.name, request=request.model_dump(mode="json"), requested_by="cli"
                )
            )
        version_id = build_version(
            ctx.store,
            ctx.session_factory,
            build_id,
            ctx.settings.default_spec,
            lambda m: print(f"  {m}", file=sys.stderr),
        )
        print(version_id)
        return
    with session_scope(ctx.session_factory) as session:
        if args.action == "list":
            for v in session.query(DatasetVersion).order_by(DatasetVersion.created_at):
                sites = ",".join(f"{k}:{n}" for k, n in v.site_counts.items())
                print(f"{v.version_id}  {v.name:<24} {v.case_count:>5} cases  {v.spec_name:<16} sites {sites}")
            return
        version = session.get(DatasetVersion, args.id)
        if version is None:
            sys.exit(f"no dataset version {args.id}")
        from shared.datasets import load_manifest

        manifest = load_manifest(ctx.store, args.id)
        summary = {
            "version_id": version.version_id,
            "name": version.name,
            "created_at": version.created_at.isoformat(),
            "spec": version.spec_name,
            "preprocessing_hash": version.preprocessing_hash,
            "labels": version.labels,
            "sites": version.site_counts,
            "cases": version.case_count,
            "qc_excluded": manifest.qc.get("excluded", {}),
            "splits": {n: {p: len(m) for p, m in parts.items()} for n, parts in manifest.splits.items()},
        }
        print(json.dumps(summary, indent=2))


def evaluate(args: argparse.Namespace) -> None:
    """``voxelflow evaluate``: a registered model on an MSD folder; table on stdout, report files."""
    import torch

    from shared.datasets.msd import MsdFormatError, read_msd_index
    from shared.evaluation import format_table, summarise, write_report
    from shared.evaluation.runner import evaluate_cases, roi_size_of
    from shared.registry import RegistryError, load_model

    torch.set_num_threads(args.threads)
    try:
        index = read_msd_index(Path(args.data))
        model = load_model(args.model)
    except (MsdFormatError, RegistryError) as exc:
        sys.exit(f"voxelflow evaluate: {exc}")
    pairs = [(image, label) for image, label in index.pairs if label is not None][: args.limit or None]
    if not pairs:
        sys.exit(f"voxelflow evaluate: {args.data} has no labelled cases")
    roi_size = tuple(args.roi_size) if args.roi_size else roi_size_of(model.training_config_yaml)
    print(f"evaluating {model.uri} on {len(pairs)} cases of {index.name} (window {roi_size})", file=sys.stderr)
    records = evaluate_cases(
        model.network,
        model.spec,
        model.labels,
        pairs,
        roi_size,
        progress=lambda done, total, case: print(f"  {done}/{total} {case}", file=sys.stderr),
    )
    summary = summarise(records, n_boot=args.bootstrap, seed=args.seed)
    print(format_table(summary))
    if args.out:
        report = {
            "model": {"uri": model.uri, "requested": args.model, "run_id": model.version.run_id},
            "data": {"path": str(index.root), "name": index.name, "cases": len(pairs)},
            "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "confidence": 0.95},
            "summary": summary,
            "cases": records,
        }
        for path in write_report(Path(args.out), report):
            print(f"wrote {path}", file=sys.stderr)


def models(args: argparse.Namespace) -> None:
    """``voxelflow models export``: ONNX + TorchScript of a registry version, gated, attached, in the Triton repo.

    Runs in this process against VOXELFLOW_MLFLOW_TRACKING_URI (the registry) and VOXELFLOW_STORAGE_URL
    (where ``triton/<model>/`` is written). Exit status 1 with the reason when the gate or a read fails.
    """
    import torch

    from services.inference.export import ExportError, export_registered_model
    from services.inference.parity_cases import ParityCasesError
    from shared.registry import RegistryError
    from shared.storage import open_object_store

    torch.set_num_threads(args.threads)
    store = open_object_store(VoxelflowSettings().storage_url)
    options = {"tolerance": args.tolerance, "min_dice": args.min_dice}
    if args.roi_size:
        options["roi_size"] = tuple(args.roi_size)
    try:
        result = export_registered_model(
            args.model,
            store,
            cases=args.cases,
            case_limit=args.limit,
            model_name=args.triton_name,
            retain_versions=args.retain_versions,
            **options,
        )
    except (ExportError, ParityCasesError, RegistryError) as exc:
        sys.exit(f"voxelflow models export: {exc}")
    print(f"{result.model_name} v{result.version}: parity {result.parity.summary()}")
    for path in result.attached:
        print(f"  attached {path}")
    for key in result.triton_keys:
        print(f"  wrote {store.url.rstrip('/')}/{key}")
    print(f"  TensorRT: {result.tensorrt.reason}")
    if result.pruned_versions:
        print(f"  pruned Triton versions {result.pruned_versions} (neither among the newest nor aliased)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="voxelflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    token_parser = commands.add_parser("tokens", help="create or revoke API tokens")
    token_parser.add_argument("action", choices=["create", "revoke"])
    token_parser.add_argument("--name", required=True)
    token_parser.add_argument("--role", choices=["pacs", "researcher", "operator", "admin"], default="pacs")
    commands.add_parser("config", help="every VOXELFLOW_* variable with its default and description")
    stack_parser = commands.add_parser("stack", help="the local stack (same as python -m shared.stack)")
    stack_parser.add_argument("rest", nargs=argparse.REMAINDER)
    ds = commands.add_parser("datasets", help="dataset versions: import an MSD folder, list, show")
    ds_actions = ds.add_subparsers(dest="action", required=True)
    imp = ds_actions.add_parser("import-msd", help="import a Medical Segmentation Decathlon folder and build a version")
    imp.add_argument("path", help="folder with dataset.json, imagesTr/, labelsTr/")
    imp.add_argument("--name", help="dataset version name (default: the collection)")
    imp.add_argument("--collection", help="case collection name (default: dataset.json name)")
    imp.add_argument("--sites", type=int, default=1, help="number of simulated sites")
    imp.add_argument("--site-strategy", choices=["iid", "intensity", "size"], default="iid")
    imp.add_argument(
        "--heterogeneity", type=float, default=1.0, help="non-IID strength, 0 (IID) .. 1 (quantile blocks)"
    )
    imp.add_argument("--site-manifest", help="CSV 'case_id,site' or 'patient,site' fixing the sites")
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--folds", type=int, default=5, help="k of the k-fold splits (0 = none)")
    imp.add_argument("--spec", default=None, help="preprocessing spec name or YAML path (default mr_hippocampus)")
    ds_actions.add_parser("list", help="dataset versions")
    show = ds_actions.add_parser("show", help="one version: sites, splits, QC")
    show.add_argument("id")
    ev = commands.add_parser("evaluate", help="metrics of a registered model on an MSD folder (table + report)")
    ev.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ev.add_argument("--data", required=True, help="MSD-format folder (dataset.json, imagesTr/, labelsTr/)")
    ev.add_argument("--out", help="report file: .json, or .csv (per-case rows; a .json summary beside it)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N cases (0 = all)")
    ev.add_argument("--roi-size", type=int, nargs=3, help="sliding window (default: the model's validation window)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    mo = commands.add_parser("models", help="registered models: export for serving")
    mo_actions = mo.add_subparsers(dest="action", required=True)
    ex = mo_actions.add_parser(
        "export", help="ONNX + TorchScript through the parity gate, attached to the version, Triton repo in storage"
    )
    ex.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    ex.add_argument(
        "--cases",
        help="parity cases: an MSD folder or a dataset version id (ds-…); default: the version's dataset_version",
    )
    ex.add_argument("--limit", type=int, default=3, help="number of parity cases")
    ex.add_argument("--roi-size", type=int, nargs=3, help="exported window (default: the model's validation window)")
    ex.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |logit difference|")
    ex.add_argument("--min-dice", type=float, default=0.99, help="smallest allowed Dice between the label maps")
    ex.add_argument("--triton-name", help="Triton model name (default: the registered model's name)")
    ex.add_argument(
        "--retain-versions",
        type=int,
        default=3,
        help="Triton versions kept in the repository besides the aliased ones (a polling Triton serves them all)",
    )
    ex.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    train_parser = commands.add_parser(
        "train", help="centralised training on a dataset version (python -m shared.training.centralised)"
    )
    train_parser.add_argument("rest", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its options (--dataset …) belong to the training CLI, not to this parser
        from shared.training.centralised import main as train_main

        train_main(argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        evaluate(args)
    elif args.command == "models":
        models(args)
    elif args.command == "tokens":
        tokens(args)
    elif args.command == "datasets":
        datasets(args)
    elif args.command == "config":
        print_config()
    else:
        from shared.stack.__main__ import main as stack_main

        sys.argv = ["voxelflow stack", *args.rest]
        stack_main()


if __name__ == "__main__":
    main()
