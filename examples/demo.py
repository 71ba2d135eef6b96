"""The Azure Databricks + Azure ML workflow, run against the local two-backend rig.

Unchanged MLflow code trains a small scikit-learn model with the tracking URI set to azdual:
an experiment under /Users/<user>/..., params (one longer than Azure ML takes), 50 epochs of
epoch_loss, an artifact, and log_model with registered_model_name. It loads the model back through runs:/ and models:/,
then reads each server with a plain MlflowClient and prints what each backend holds.

Start the rig first (`python -m rig up`); `make demo` does both.
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEMO_USER = "demo.user@example.com"
EPOCHS = 50


def load_rig(state_path):
    from rig import Rig

    if not Path(state_path).exists():
        raise SystemExit(
            f"The rig is not running (no {state_path}). Start it with `python -m rig up` "
            "or run `make demo`."
        )
    rig = Rig.attach(state_path)
    rig.apply_env()
    return rig


def train_and_log(experiment_path, model_name):
    """Run the user's training code, which contains nothing specific to the second backend."""
    import mlflow
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    dataset = load_breast_cancer()
    features, labels = dataset.data, dataset.target
    features = StandardScaler().fit_transform(features)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.25, random_state=7
    )
    params = {"loss": "log_loss", "alpha": 1e-4, "learning_rate": "optimal", "random_state": 7}

    mlflow.set_experiment(experiment_path)
    with mlflow.start_run(run_name="sgd-breast-cancer") as run:
        mlflow.log_params({**params, "epochs": EPOCHS})
        # 513 characters: Azure ML takes at most 500, so its copy is truncated and marked.
        mlflow.log_param("features", ", ".join(dataset.feature_names))
        mlflow.set_tag("dataset", "sklearn.datasets.load_breast_cancer")
        model = SGDClassifier(**params)
        for epoch in range(EPOCHS):
            model.partial_fit(train_x, train_y, classes=np.unique(labels))
            epoch_loss = log_loss(train_y, model.predict_proba(train_x))
            mlflow.log_metric("epoch_loss", epoch_loss, step=epoch)
        accuracy = accuracy_score(test_y, model.predict(test_x))
        mlflow.log_metric("test_accuracy", accuracy)

        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / "summary.txt"
            summary.write_text(f"test accuracy: {accuracy:.4f}\nepochs: {EPOCHS}\n")
            mlflow.log_artifact(str(summary))
        model_info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=model_name, input_example=test_x[:2]
        )

    by_run = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    by_name = mlflow.pyfunc.load_model(f"models:/{model_name}/{model_info.registered_model_version}")
    expected = model.predict(test_x[:5]).tolist()
    for label, loaded in (("runs:/", by_run), ("models:/", by_name)):
        predicted = [int(value) for value in loaded.predict(test_x[:5])]
        status = "matches" if predicted == expected else "DIFFERS from"
        print(f"prediction through {label:9} {predicted} {status} the trained model")
    return run.info.run_id, model_info


def metric_history(client, run_id, key):
    """Return every point of a metric, read in pages of 999: Azure ML takes pages under 1,000,
    and MlflowClient.get_metric_history requests 25,000 at once."""
    store = client._tracking_client.store
    points, page_token = [], None
    while True:
        page = store.get_metric_history(run_id, key, max_results=999, page_token=page_token)
        points.extend(page)
        page_token = page.token
        if not page_token:
            return points


def count_files(artifact_uri):
    """Count the files under an artifact location, read from storage directly.

    MLflow 3's runs:/ listing also searches logged models, which Azure ML does not have.
    """
    from mlflow.artifacts import list_artifacts

    total = 0
    for info in list_artifacts(artifact_uri=artifact_uri):
        total += count_files(f"{artifact_uri}/{info.path.rsplit('/', 1)[-1]}") if info.is_dir else 1
    return total


def describe_backend(client, run_id, model_name, has_logged_models):
    """Read what one backend holds for a run, with a plain MlflowClient.

    On the primary the model is an MLflow 3 logged model; Azure ML has no logged-model API, so
    there the plugin keeps it in the run's artifacts, under model/.
    """
    from mlflow_azdual.id_mapping import TAG_PREFIX

    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    metric_points = sum(len(metric_history(client, run_id, key)) for key in run.data.metrics)

    run_root = run.info.artifact_uri
    run_files = count_files(run_root)
    if has_logged_models:
        model_files = sum(
            count_files(model.artifact_location)
            for model in client.search_logged_models([run.info.experiment_id])
            if model.source_run_id == run_id
        )
    else:
        model_files = count_files(f"{run_root}/model")
        run_files -= model_files
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    user_tags = {k: v for k, v in run.data.tags.items() if not k.startswith(TAG_PREFIX)}
    return {
        "experiment name": experiment.name,
        "experiment id": experiment.experiment_id,
        "run id": run_id,
        "run status": run.info.status,
        "params": len(run.data.params),
        "metric keys": len(run.data.metrics),
        "metric points": metric_points,
        "tags (without azdual.*, mlflow.user, model history)": len(
            set(user_tags) - {"mlflow.user", "mlflow.log-model.history"}
        ),
        "run artifact files": run_files,
        "model files": model_files,
        "registered model versions": ", ".join(
            f"{version.name} v{version.version}" for version in versions
        ) or "none",
    }


def describe_differences(primary, secondary, run_id, secondary_run_id):
    """Print what the plugin changed on purpose on the Azure ML side: truncated params, tags
    Azure ML refuses, and the model history of a model kept as run artifacts."""
    from mlflow_azdual.tracking_store import TRUNCATED_PARAM_TAG_PREFIX

    primary_run, secondary_run = primary.get_run(run_id), secondary.get_run(secondary_run_id)
    for tag, original_length in secondary_run.data.tags.items():
        if tag.startswith(TRUNCATED_PARAM_TAG_PREFIX):
            key = tag[len(TRUNCATED_PARAM_TAG_PREFIX):]
            print(
                f"param {key!r}: {original_length} characters on the primary, "
                f"{len(secondary_run.data.params[key])} on the secondary, marked by tag {tag}"
            )
    if "mlflow.user" in primary_run.data.tags and "mlflow.user" not in secondary_run.data.tags:
        print("tag 'mlflow.user': on the primary only, because Azure ML rejects it")
    if "mlflow.log-model.history" in secondary_run.data.tags:
        print(
            "tag 'mlflow.log-model.history': on the secondary only, where it lists the model "
            "kept in the run's artifacts (model/)"
        )


def print_side_by_side(primary, secondary):
    width = max(len(key) for key in primary) + 2
    column = max(len(str(value)) for value in primary.values()) + 2
    print()
    print(f"{'':{width}}{'primary (Databricks stand-in)':{column}}secondary (Azure ML stand-in)")
    for key in primary:
        print(f"{key:{width}}{str(primary[key]):{column}}{secondary[key]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rig-state",
        default=os.environ.get("AZDUAL_RIG_STATE", str(REPO_ROOT / ".rig" / "state" / "state.json")),
        help="state.json of a running rig (default: .rig/state/state.json)",
    )
    parser.add_argument("--experiment", default="churn-baseline", help="experiment leaf name")
    parser.add_argument("--model-name", default="azdual-demo-classifier")
    arguments = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rig = load_rig(arguments.rig_state)

    import mlflow
    from mlflow import MlflowClient

    from mlflow_azdual.id_mapping import SECONDARY_RUN_ID_TAG

    tracking_uri = rig.dual_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    print(f"export MLFLOW_TRACKING_URI='{tracking_uri}'")

    experiment_path = f"/Users/{DEMO_USER}/azdual-demo/{arguments.experiment}"
    run_id, _ = train_and_log(experiment_path, arguments.model_name)
    # The secondary is written in the background; wait for it before reading it back.
    import mlflow_azdual

    if not mlflow_azdual.flush(timeout_s=120):
        print("the secondary did not receive every write within 120 s; see the warnings above")

    primary = MlflowClient(tracking_uri=rig.primary_uri, registry_uri=rig.primary_uri)
    secondary = MlflowClient(tracking_uri=rig.secondary_uri, registry_uri=rig.secondary_uri)
    secondary_run_id = primary.get_run(run_id).data.tags.get(SECONDARY_RUN_ID_TAG)
    if secondary_run_id is None:
        raise SystemExit(f"run {run_id} has no mirror on the secondary; see the warnings above")

    primary_view = describe_backend(primary, run_id, arguments.model_name, True)
    secondary_view = describe_backend(secondary, secondary_run_id, arguments.model_name, False)
    print_side_by_side(primary_view, secondary_view)
    print()
    describe_differences(primary, secondary, run_id, secondary_run_id)

    counted = [key for key, value in primary_view.items() if isinstance(value, int)]
    unequal = [key for key in counted if primary_view[key] != secondary_view[key]]
    print()
    print("counts equal on both backends" if not unequal else f"counts differ: {unequal}")
    print(f"open the primary's MLflow UI:   {rig.primary_uri}")
    print(f"open the secondary's MLflow UI: {rig.secondary_uri}")
    print("stop the rig with: make rig-down")
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
