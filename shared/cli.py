"""``voxelflow`` command line: tokens, configuration, the local stack, PACS pulls, datasets, training,
federated runs (watch), evaluation, models, routing rules, the demo.

The CLI is a client of the platform, as a user's own script would be: ``pacs``, ``datasets``, ``models`` and
``routing-rules`` call the services' HTTP APIs (:mod:`shared.client`; ``VOXELFLOW_TOKEN`` and
``VOXELFLOW_<SERVICE>_API_URL``, or the local stack's ports). ``tokens`` writes the database named by
``VOXELFLOW_DATABASE_URL``; ``train`` and ``evaluate`` run the shared training and evaluation library in this
process. Everything a user can get wrong ends in one line that says what to do, and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from shared.client import ApiError, ServiceClient, build_dataset, export_model, import_msd_folder
from shared.contracts import artifacts
from shared.settings import VoxelflowSettings

#: each service declares its settings class under this entry-point group (pyproject.toml), so that the
#: library can list every variable without importing a service by name
SETTINGS_ENTRY_POINTS = "voxelflow.settings"


class UsageError(Exception):
    """Something the user asked for that cannot be done; the message says what to do instead."""


def version() -> str:
    """The installed distribution's version; in a checkout that was never installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("voxelflow")
    except PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])


def _settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    found: list[tuple[str, type[BaseSettings]]] = [("shared", VoxelflowSettings)]
    for entry in sorted(entry_points(group=SETTINGS_ENTRY_POINTS), key=lambda e: e.name):
        found.append((entry.name, entry.load()))
    return found


def print_config() -> None:
    shared_fields = set(VoxelflowSettings.model_fields)
    classes = _settings_classes()
    if len(classes) == 1:
        print("# (the services' own settings are listed once the project is installed: make install-python)")
    for owner, cls in classes:
        print(f"# {owner}")
        for name, field in cls.model_fields.items():
            if owner != "shared" and name in shared_fields:
                continue
            default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
            print(f"VOXELFLOW_{name.upper()}  (default: {default!r})\n    {field.description or ''}")
        print()


def tokens(args: argparse.Namespace) -> None:
    from sqlalchemy.exc import OperationalError

    from shared.auth import Role, create_token, parse_duration, revoke_token
    from shared.db import models
    from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope

    settings = VoxelflowSettings()
    try:
        run_migrations(settings.database_url, models.MIGRATIONS, models.VERSION_TABLE)
        factory = make_session_factory(make_engine(settings.database_url))
        with session_scope(factory) as session:
            if args.action == "create":
                try:
                    lifetime = parse_duration(args.expires_in)
                except ValueError as exc:
                    raise UsageError(f"--expires-in: {exc}") from None
                secret = create_token(session, args.name, Role(args.role), expires_in=lifetime, project=args.project)
                print(secret)
                until = f"expires in {args.expires_in}" if lifetime is not None else "never expires"
                scope = f", project {args.project!r} only" if args.project else ""
                print(
                    f"token {args.name!r} ({args.role}{scope}) created, {until}; it is shown only once",
                    file=sys.stderr,
                )
            elif not revoke_token(session, args.name):
                raise UsageError(f"no active token named {args.name!r}")
    except OperationalError as exc:
        raise UsageError(
            f"cannot reach the database {settings.database_url.split('@')[-1]}: {str(exc.orig).strip().splitlines()[0]}"
            " (start the stack with `make up` and load its variables: set -a; . .voxelflow/stack/stack.env; set +a)"
        ) from None


def datasets(args: argparse.Namespace) -> None:
    """``voxelflow datasets``: import an MSD folder and build a version, list versions, show one (preprocessing API)."""
    with ServiceClient("preprocessing") as api:
        if args.action == "import-msd":
            _import_msd(api, args)
        elif args.action == "list":
            for v in api.get("/datasets"):
                sites = ",".join(f"{k}:{n}" for k, n in v["site_counts"].items())
                print(
                    f"{v['version_id']}  {v['name']:<24} {v['case_count']:>5} cases  {v['spec_name']:<16} sites {sites}"
                )
        else:
            try:
                version = api.get(f"/datasets/{args.id}")
            except ApiError as exc:
                if exc.status in (404, 422):
                    raise UsageError(f"no dataset version {args.id!r}: `voxelflow datasets list` shows them") from None
                raise
            qc = api.get(f"/datasets/{args.id}/qc")
            splits = api.get(f"/datasets/{args.id}/splits")
            summary = {
                **{k: version[k] for k in ("version_id", "name", "created_at", "preprocessing_hash", "labels")},
                "spec": version["spec_name"],
                "sites": version["site_counts"],
                "cases": version["case_count"],
                "qc_excluded": qc.get("excluded", {}),
                "splits": {n: {p: len(m) for p, m in parts.items()} for n, parts in splits.items()},
            }
            print(json.dumps(summary, indent=2))


def pacs(args: argparse.Namespace) -> None:
    """``voxelflow pacs``: the configured PACS, a pull (DICOMweb or DIMSE, as configured), a pull's progress."""
    import time

    with ServiceClient("ingest") as api:
        if args.action == "list":
            for name, url in api.get("/pacs").items():
                print(f"{name:<20} {url}")
            return
        if args.action == "pull":
            if bool(args.study) == bool(args.query):
                raise UsageError("give --study UID or one or more --query KEY=VALUE (not both)")
            body: dict[str, Any] = {"study_instance_uid": args.study} if args.study else {"query": {}}
            for item in args.query or []:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise UsageError(f"--query {item!r}: expected KEY=VALUE, e.g. --query PatientID=PGBM-002")
                body["query"][key] = value
            try:
                job = api.post(f"/pacs/{args.name}/retrieve", json=body, expected=(202,))
            except ApiError as exc:
                if exc.status == 404:
                    raise UsageError(f"no PACS named {args.name!r}: `voxelflow pacs list` shows them") from None
                raise
            print(job["id"])
            deadline = time.monotonic() + args.wait
            while args.wait and job["status"] not in ("done", "failed") and time.monotonic() < deadline:
                time.sleep(1)
                job = api.get(f"/pacs/jobs/{job['id']}")
        else:
            try:
                job = api.get(f"/pacs/jobs/{args.id}")
            except ApiError as exc:
                if exc.status in (404, 422):
                    raise UsageError(f"no pull job {args.id!r}") from None
                raise
        print(json.dumps(job, indent=2), file=sys.stderr if args.action == "pull" else sys.stdout)
        if job["status"] == "failed":
            raise UsageError(f"pull {job['id']} failed: {job['error']}")


def _import_msd(api: ServiceClient, args: argparse.Namespace) -> None:
    from shared.datasets.msd import MsdFormatError

    def progress(done: int, total: int, case_id: str) -> None:
        if done % 25 == 0 or done == total:
            print(f"  uploaded {done}/{total} ({case_id})", file=sys.stderr)

    try:
        imported = import_msd_folder(api, Path(args.path), collection=args.collection, progress=progress)
    except MsdFormatError as exc:
        raise UsageError(str(exc)) from None
    errors = imported["errors"]
    print(
        f"collection {imported['collection']!r}: {imported['counts']}"
        + (f"; {len(errors)} case(s) refused" if errors else ""),
        file=sys.stderr,
    )
    for case_id, reason in errors.items():
        print(f"  refused {case_id}: {reason}", file=sys.stderr)
    manifest_csv = Path(args.site_manifest).read_text() if args.site_manifest else None
    request: dict[str, Any] = {
        "name": args.name or imported["collection"],
        "collection": imported["collection"],
        "sites": {
            "strategy": "manifest" if manifest_csv else args.site_strategy,
            "n_sites": args.sites,
            "seed": args.seed,
            "heterogeneity": args.heterogeneity,
            "manifest_csv": manifest_csv,
        },
        "splits": {"k_folds": args.folds, "seed": args.seed},
    }
    if args.spec:
        request["spec"] = args.spec
    print("  building the dataset version …", file=sys.stderr)
    version = build_dataset(api, request)
    print(f"  {version['case_count']} cases, sites {version['site_counts']}", file=sys.stderr)
    print(version["version_id"])


def evaluate(args: argparse.Namespace) -> None:
    """``voxelflow evaluate``: a registered model on an MSD folder; table on stdout, report files."""
    import torch

    from shared.datasets.msd import MsdFormatError, read_msd_index
    from shared.evaluation import format_table, summarise, write_report
    from shared.evaluation.runner import evaluate_cases, inference_options, roi_size_of
    from shared.registry import RegistryError, load_model

    torch.set_num_threads(args.threads)
    try:
        index = read_msd_index(Path(args.data))
        model = load_model(args.model)
    except (MsdFormatError, RegistryError) as exc:
        raise UsageError(str(exc)) from None
    pairs = [(image, label) for image, label in index.pairs if label is not None][: args.limit or None]
    if not pairs:
        raise UsageError(f"{args.data} has no labelled cases")
    roi_size = tuple(args.roi_size) if args.roi_size else roi_size_of(model.training_config_yaml)
    print(f"evaluating {model.uri} on {len(pairs)} cases of {index.name} (window {roi_size})", file=sys.stderr)
    served = inference_options(model.training_config_yaml)  # mirrored and filtered as it is served
    records = evaluate_cases(
        model.network,
        model.spec,
        model.labels,
        pairs,
        roi_size,
        progress=lambda done, total, case: print(f"  {done}/{total} {case}", file=sys.stderr),
        mirror_axes=served.get("mirror_axes") or (),
        largest_component=served.get("largest_component_labels") or False,
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
    if args.robustness:
        robustness_report(args, model, pairs, roi_size, served)


def robustness_report(args: argparse.Namespace, model: Any, pairs: list, roi_size: tuple, served: dict) -> None:
    """``evaluate --robustness``: clean + every corruption x level on the first ``--robustness-cases``
    cases, a table on stdout, JSON + PNG under ``--robustness-out``, metrics and plot on the version's run."""
    from shared.evaluation.robustness import catalogue, robustness_summary, write_robustness
    from shared.evaluation.runner import evaluate_cases
    from shared.registry import open_registry

    cases = pairs[: args.robustness_cases or None]
    perturbations = catalogue(model.network, roi_size)
    names = args.corruptions or list(perturbations)
    unknown = sorted(set(names) - set(perturbations))
    if unknown:
        raise UsageError(f"unknown corruptions {unknown}; known: {sorted(perturbations)}")

    def mean_dice(perturbation: Any = None) -> float:
        records = evaluate_cases(
            model.network,
            model.spec,
            model.labels,
            cases,
            roi_size,
            mirror_axes=served.get("mirror_axes") or (),
            largest_component=served.get("largest_component_labels") or False,
            perturbation=perturbation,
        )
        values = [float(r["dice"]) for r in records if r["dice"] == r["dice"]]  # NaN (empty truth) skipped
        return sum(values) / len(values) if values else float("nan")

    clean = mean_dice()
    perturbed: dict[tuple[str, int], float] = {}
    for name in names:
        for level in args.robustness_levels:
            print(f"  robustness {name} level {level}", file=sys.stderr)
            perturbed[(name, level)] = mean_dice((name, perturbations[name], level))
    summary = robustness_summary({"dice": clean}, perturbed)
    print(f"{'corruption':<14}{'level':>6}{'dice':>9}{'drop':>9}")
    print(f"{'clean':<14}{'-':>6}{clean:>9.4f}{0.0:>9.4f}")
    for row in summary["rows"]:
        print(f"{row['corruption']:<14}{row['level']:>6}{row['dice']:>9.4f}{row['drop']:>9.4f}")
    print(f"mean drop {summary['mean_drop']:.4f} over {len(summary['rows'])} corruption levels, {len(cases)} cases")
    summary["model"] = {"uri": model.uri, "run_id": model.version.run_id}
    summary["cases"] = len(cases)
    # the promotion gate's robustness option compares two reports only when they name the same cases
    summary["case_ids"] = [Path(image).name.removesuffix(".gz").removesuffix(".nii") for image, _ in cases]
    out = Path(args.robustness_out)
    paths = write_robustness(out, summary)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    if not args.no_log:
        registry = open_registry()
        points = [(f"robustness/{r['corruption']}/{r['level']}/dice", r["dice"], 0) for r in summary["rows"]]
        points += [("robustness/clean/dice", clean, 0), (artifacts.ROBUSTNESS_MEAN_DROP, summary["mean_drop"], 0)]
        registry.log_metrics(model.version.run_id, points)
        registry.log_artifacts(model.version.run_id, out, artifacts.ROBUSTNESS_DIR)
        print(f"logged robustness to run {model.version.run_id}", file=sys.stderr)


def runs(args: argparse.Namespace) -> None:
    """``voxelflow runs watch RUN``: follow a federated run's events (aggregation API, Server-Sent Events) with a
    progress bar per site and a line per round; exit status 0 when the run succeeds, 1 when it fails or is
    cancelled."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    finished: dict[str, Any] | None = None
    with ServiceClient("aggregation") as api:
        try:
            for event in api.events(f"/federated-runs/{args.run}/events"):
                data = event.data
                if event.kind == "round_started":
                    for bar in bars.values():
                        bar.close()
                    bars.clear()
                    tqdm.write(f"round {data['round']} started: {', '.join(data.get('sites') or [])}")
                elif event.kind == "epoch":
                    site = data["site"]
                    bar = bars.get(site)
                    if bar is None or bar.total != data["epochs"]:
                        bar = bars[site] = tqdm(
                            total=data["epochs"], desc=f"{site} r{data['round']}", unit="epoch", position=len(bars)
                        )
                    bar.n = data["epoch"]
                    postfix = {"loss": f"{data['loss']:.4f}"}
                    if data.get("val_dice") is not None:
                        postfix["val_dice"] = f"{data['val_dice']:.4f}"
                    if data.get("eta_seconds") is not None:
                        postfix["eta"] = f"{data['eta_seconds']:.0f}s"
                    bar.set_postfix(postfix, refresh=True)
                elif event.kind == "round_aggregated":
                    dice = data.get("val_dice")
                    epsilon = data.get("epsilon")
                    tqdm.write(
                        f"round {data['round']} aggregated: {data.get('participants')} sites"
                        + (f", global val Dice {dice:.4f}" if dice is not None else "")
                        + (f", ε {epsilon:.3f}" if epsilon is not None else "")
                    )
                elif event.kind == "run_finished":
                    finished = data
                    break
        except ApiError as exc:
            if exc.status in (404, 422):
                raise UsageError(f"no federated run {args.run!r}: GET /federated-runs lists them") from None
            raise
        finally:
            for bar in bars.values():
                bar.close()
    if finished is None:
        raise UsageError(f"the event stream of run {args.run} ended before the run did; watch it again to resume")
    status = finished.get("status")
    print(f"run {args.run} {status}" + (f": {finished['error']}" if finished.get("error") else ""))
    if status != "succeeded":
        sys.exit(1)


def models(args: argparse.Namespace) -> None:
    """``voxelflow models export``: ONNX + TorchScript of a registry version, gated, attached, in the Triton repo.

    Asks the inference service (``POST /v1/model-exports``), whose worker runs the export, and waits for it.
    Exit status 1 with the reason when the gate or a read fails.
    """
    request: dict[str, Any] = {
        "model_uri": args.model,
        "case_limit": args.limit,
        "tolerance": args.tolerance,
        "min_dice": args.min_dice,
        "retain_versions": args.retain_versions,
    }
    for key, value in (("cases", args.cases), ("roi_size", args.roi_size), ("triton_name", args.triton_name)):
        if value:
            request[key] = str(Path(value).resolve()) if key == "cases" and Path(value).is_dir() else value
    with ServiceClient("inference") as api:
        try:
            done = export_model(api, request)
        except ApiError as exc:
            raise UsageError(str(exc)) from None
    result = done["result"]
    print(f"{result['model_name']} v{result['version']}: parity {result['parity']['summary']}")
    for path in result["attached"]:
        print(f"  attached {path}")
    for key in result["triton_keys"]:
        print(f"  wrote {key}")
    print(f"  TensorRT: {result['tensorrt']['reason']}")
    if result["pruned_versions"]:
        print(f"  pruned Triton versions {result['pruned_versions']} (neither among the newest nor aliased)")


ROUTING_CRITERIA = (
    ("modality", "modality"),
    ("body_part", "body_part_examined"),
    ("description_pattern", "series_description_pattern"),
    ("sop_class", "sop_class_uid"),
    ("calling_ae", "calling_ae_title"),
    ("site", "site"),
)


def routing_rules(args: argparse.Namespace) -> None:
    """``voxelflow routing-rules``: list, create or delete the inference service's routing rules (operator
    token). The service validates each rule (pattern, alias, destination) and says why it refuses one."""
    with ServiceClient("inference") as api:
        try:
            if args.action == "list":
                rules = api.get("/v1/routing-rules")
                print(f"{'id':>4}  {'name':<24} {'on':<3} {'criteria':<56} model → destination")
                for rule in rules:
                    criteria = " ".join(f"{short}={rule[key]}" for short, key in ROUTING_CRITERIA if rule[key]) or "any"
                    destination = rule["destination"] or "(pacs_url)"
                    print(
                        f"{rule['id']:>4}  {rule['name']:<24} {'yes' if rule['enabled'] else 'no':<3} "
                        f"{criteria:<56} {rule['model_alias']} → {destination}"
                    )
            elif args.action == "create":
                body: dict[str, Any] = {
                    "name": args.name,
                    "model_alias": args.model_alias,
                    "enabled": not args.disabled,
                }
                body.update({key: getattr(args, short) for short, key in ROUTING_CRITERIA if getattr(args, short)})
                if args.destination:
                    body["destination"] = args.destination
                rule = api.post("/v1/routing-rules", json=body, expected=(201,))
                print(rule["id"])
            else:
                api.request("DELETE", f"/v1/routing-rules/{args.id}", expected=(204,))
        except ApiError as exc:
            raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="voxelflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"voxelflow {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    token_parser = commands.add_parser("tokens", help="create or revoke API tokens")
    token_parser.add_argument("action", choices=["create", "revoke"])
    token_parser.add_argument("--name", required=True)
    token_parser.add_argument("--role", choices=["pacs", "researcher", "operator", "admin"], default="pacs")
    token_parser.add_argument(
        "--expires-in",
        default="30d",
        help="lifetime: 30m, 8h, 7d, 2w, or 'never' (service-to-service tokens only); default 30d",
    )
    token_parser.add_argument(
        "--project", default=None, help="scope the token to one project (VOXELFLOW_PROJECT of the services)"
    )
    commands.add_parser("config", help="every VOXELFLOW_* variable with its default and description")
    stack_parser = commands.add_parser("stack", help="the local stack (same as python -m shared.stack)")
    stack_parser.add_argument("rest", nargs=argparse.REMAINDER)
    pa = commands.add_parser("pacs", help="pull studies from a configured PACS (DICOMweb or DIMSE): list, pull, job")
    pa_actions = pa.add_subparsers(dest="action", required=True)
    pa_actions.add_parser("list", help="the configured PACS and their URLs")
    pull = pa_actions.add_parser("pull", help="pull a study, or every study matching a query; prints the job id")
    pull.add_argument("name", help="the PACS, as configured (VOXELFLOW_PACS)")
    pull.add_argument("--study", help="StudyInstanceUID to pull")
    pull.add_argument("--query", action="append", metavar="KEY=VALUE", help="matching key (repeatable)")
    pull.add_argument("--wait", type=float, default=0, help="seconds to wait for the pull to finish (0: do not)")
    job = pa_actions.add_parser("job", help="a pull's progress")
    job.add_argument("id")
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
    ev.add_argument("--robustness", action="store_true", help="also Dice under corruptions and FGSM/PGD attacks")
    ev.add_argument("--robustness-cases", type=int, default=2, help="cases for the robustness sweep (0 = all)")
    ev.add_argument(
        "--robustness-levels", type=int, nargs="+", default=[1, 3, 5], choices=[1, 2, 3, 4, 5], help="strengths"
    )
    ev.add_argument("--corruptions", nargs="+", help="subset of the catalogue (default: all, attacks included)")
    ev.add_argument("--robustness-out", default="robustness", help="folder for robustness.json and robustness.png")
    ev.add_argument("--no-log", action="store_true", help="do not log the robustness results to MLflow")
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ru = commands.add_parser("runs", help="federated training runs: watch one live")
    ru_actions = ru.add_subparsers(dest="action", required=True)
    watch = ru_actions.add_parser("watch", help="progress bars per site and a line per round until the run ends")
    watch.add_argument("run", help="the run id (fr-…)")
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
    rr = commands.add_parser("routing-rules", help="series segmented automatically: list, create, delete rules")
    rr_actions = rr.add_subparsers(dest="action", required=True)
    rr_actions.add_parser("list", help="every rule: criteria, model alias, destination")
    rr_create = rr_actions.add_parser("create", help="a rule (empty criteria match any series); prints its id")
    rr_create.add_argument("--name", required=True)
    rr_create.add_argument("--model-alias", default="champion", help="a registry alias this service serves")
    rr_create.add_argument("--modality", help="e.g. MR")
    rr_create.add_argument("--body-part", help="BodyPartExamined, e.g. BRAIN")
    rr_create.add_argument("--description-pattern", help="regular expression searched in SeriesDescription")
    rr_create.add_argument("--sop-class", help="SOP Class UID")
    rr_create.add_argument("--calling-ae", help="AE title that C-STOREd the series")
    rr_create.add_argument("--site", help="site the series was received at")
    rr_create.add_argument("--destination", help="http(s)://DICOMweb root or dicom://AET@host:port (default pacs_url)")
    rr_create.add_argument("--disabled", action="store_true", help="create it switched off")
    rr_delete = rr_actions.add_parser("delete", help="delete a rule (requests it made keep running)")
    rr_delete.add_argument("id", type=int)
    plan_parser = commands.add_parser(
        "plan", help="the nnU-Net-style training plan of an MSD folder or a dataset version (YAML)"
    )
    plan_parser.add_argument("dataset", help="an MSD folder, or a dataset version id (ds-…: the preprocessing API)")
    plan_parser.add_argument("--memory-budget-gib", type=float, default=8.0, help="activation memory per step")
    train_parser = commands.add_parser(
        "train", help="centralised training on a dataset version (python -m shared.training.centralised)"
    )
    train_parser.add_argument("rest", nargs=argparse.REMAINDER)
    demo_parser = commands.add_parser("demo", help="the end-to-end demo on the bundled data (what `make demo` runs)")
    demo_parser.add_argument("rest", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    try:
        _dispatch(parser, argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one line for what a user can get wrong; a bug keeps its traceback
        message = user_error(exc)
        if message is None:
            raise
        command = " ".join(["voxelflow", *(word for word in argv[:2] if not word.startswith("-"))])
        sys.exit(f"{command}: {message}")


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error caused by input or environment, None for a bug."""
    import yaml
    from pydantic import ValidationError

    from shared.datasets.msd import MsdFormatError
    from shared.registry import RegistryError
    from shared.stack.process import StackError
    from shared.training.config import ConfigError
    from shared.training.data import UnknownDatasetVersion

    known = (UsageError, ApiError, StackError, RegistryError, ConfigError, MsdFormatError, UnknownDatasetVersion)
    if isinstance(exc, known):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return str(exc) if exc.filename is None else f"{exc.filename}: no such file"
    if isinstance(exc, yaml.YAMLError):
        return f"not a valid YAML file: {exc}"
    if isinstance(exc, ValidationError):
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return f"invalid {exc.title}: {errors}"
    return None


def print_plan(args: argparse.Namespace) -> None:
    """Print a plan as YAML (the fields ``apply_plan`` would fill first, then the whole plan): of an MSD folder,
    fingerprinted here, or of a dataset version, planned by the preprocessing API from its stored fingerprint."""
    import re

    import yaml

    from shared.validation import DATASET_VERSION_PATTERN

    target = str(args.dataset)
    if re.fullmatch(DATASET_VERSION_PATTERN, target) and not Path(target).exists():
        with ServiceClient("preprocessing") as api:
            try:
                planned = api.get(f"/datasets/{target}/plan", params={"memory_budget_gib": args.memory_budget_gib})
            except ApiError as exc:
                if exc.status == 404:
                    raise UsageError(str(exc)) from None
                raise
        fields, whole = planned["config"], planned["plan"]
    else:
        from shared.datasets.fingerprint import fingerprint_msd_folder
        from shared.training.plans import plan_from_fingerprint

        if not Path(target).is_dir():
            raise UsageError(f"{target} is neither an MSD folder nor a dataset version id (ds- and 16 hex digits)")
        plan = plan_from_fingerprint(fingerprint_msd_folder(Path(target)), memory_budget_gib=args.memory_budget_gib)
        fields, whole = plan.config_values(), plan.model_dump(mode="json")
    print("# training config fields the plan fills where a config leaves them unset")
    print(yaml.safe_dump(fields, sort_keys=False, default_flow_style=None), end="")
    print("# the whole plan")
    print(yaml.safe_dump(whole, sort_keys=False, default_flow_style=None), end="")


def _dispatch(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    if argv[:1] == ["train"]:  # its options (--dataset …) belong to the training CLI, not to this parser
        from shared.training.centralised import main as train_main

        train_main(argv[1:])
        return
    if argv[:1] == ["demo"]:
        from shared.demo import main as demo_main

        demo_main(argv[1:])
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
    elif args.command == "pacs":
        pacs(args)
    elif args.command == "runs":
        runs(args)
    elif args.command == "routing-rules":
        routing_rules(args)
    elif args.command == "config":
        print_config()
    elif args.command == "plan":
        print_plan(args)
    else:
        from shared.stack.__main__ import main as stack_main

        sys.argv = ["voxelflow stack", *args.rest]
        sys.exit(stack_main())


if __name__ == "__main__":
    main()
