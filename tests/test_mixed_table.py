"""A table as it comes (text categories, a 200-value column, a boolean, blanks), on the local
3-node cluster: it trains as well as the same table one-hot encoded and imputed by hand, and its
logged model predicts raw rows, a category it never saw and blanks included."""

from __future__ import annotations

import runpy
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from conftest import pyfunc_elsewhere, train
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
churn = runpy.run_path(str(ROOT / "examples" / "churn.py"))


def by_hand(df: pd.DataFrame) -> pd.DataFrame:
    """What a user does before trainyard took mixed tables: medians into the numeric blanks,
    every category (blank too) one-hot, 218 columns."""
    df = df.assign(**{c: df[c].fillna(df[c].median()) for c in ("age", "income")})
    df["autopay"] = df["autopay"].astype(str)
    categories = ["plan", "region", "autopay", "city"]
    return pd.get_dummies(df, columns=categories, dummy_na=True, dtype=float)


def test_a_mixed_table_trains_like_one_encoded_by_hand_and_predicts_raw_rows(
    ray_cluster, tracking_uri, tmp_path
):
    table = churn["table"]()
    table.astype({"autopay": "boolean"}).to_parquet(tmp_path / "churn.parquet", index=False)
    by_hand(table).to_csv(tmp_path / "by-hand.csv", index=False)
    config = ROOT / "configs" / "churn.yaml"
    common = ["train.epochs=10", "tracking.experiment=test-mixed"]
    ours = train(config, tmp_path / "ours", f"data.path={tmp_path / 'churn.parquet'}", *common)
    hand = train(
        config,
        tmp_path / "hand",
        f"data.path={tmp_path / 'by-hand.csv'}",
        "data.missing=error",
        *common,
    )
    # The two tables split differently (a row's side hashes its values): 600 validation
    # rows leave each accuracy ±0.016 (one standard error); 0.03 is two of them.
    accuracy = ours["metrics"]["val_accuracy"]
    print(f"mixed table: {accuracy:.4f}, by hand: {hand['metrics']['val_accuracy']:.4f}")
    assert accuracy >= hand["metrics"]["val_accuracy"] - 0.03 and accuracy > 0.75

    run = MlflowClient(tracking_uri).get_run(ours["run_id"])
    params = run.data.params
    assert params["features.onehot"] == "plan,region" and params["features.hashed"] == "city"
    assert params["features.boolean"] == "autopay" and params["features.numeric"] == "2"
    assert params["features.categories"] == "plan=3,region=6,autopay=2,city=200"
    assert int(params["features.blank"]) > 0 and "basic" not in str(params)
    # Most customers stay: the example records F1 and AUROC too, and keeps the epoch of the
    # best AUROC (train.monitor) as its model.
    metrics = run.data.metrics
    assert 0 < metrics["val_f1"] <= 1 and 0.5 < metrics["val_auroc"] <= 1
    history = MlflowClient(tracking_uri).get_metric_history(ours["run_id"], "val_auroc")
    best = max(history, key=lambda m: m.value)
    assert metrics["best_val_auroc"] == best.value
    assert run.data.tags["trainyard.best_epoch"] == str(best.step)

    # The logged model takes raw rows: an unseen plan, region and city, and blanks anywhere.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(ours["model_uri"])
    rows = pd.DataFrame(
        {
            "plan": ["basic", "enterprise", None],
            "region": ["north", "mars", "south"],
            "autopay": [True, None, False],
            "city": ["city005", "atlantis", None],
            "age": [30.0, np.nan, 50.0],
            "income": [np.nan, 40000.0, 50000.0],
        }
    )
    logits = np.asarray(model.predict(rows))
    assert logits.shape == (3, 2) and np.isfinite(logits).all()
    # ... and predicts the whole table about as well as it did its validation rows, read back
    # with pandas (nullable booleans, the label left in).
    raw = pd.read_parquet(tmp_path / "churn.parquet")
    predicted = np.asarray(model.predict(raw)).argmax(1)
    assert (predicted == (table["churn"] == "yes").to_numpy()).mean() > 0.75

    # A CSV as a user has it: autopay without blanks (pandas reads it as bool), a region never
    # seen and a blank region (none in training). pyfunc.predict on it as pandas reads it, in
    # a fresh process elsewhere, gives what `trainyard predict` gives.
    from trainyard.pipelines import cli

    rows = table.head(200).assign(autopay=table["autopay"].head(200).fillna(False).astype(bool))
    rows.loc[0, "region"], rows.loc[1, "region"] = "mars", None
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert pd.read_csv(tmp_path / "new.csv")["autopay"].dtype == bool
    args = ["predict", ours["model_uri"], str(tmp_path / "new.csv"), "--out", str(tmp_path / "p")]
    args.append("--probabilities")
    assert cli.main(args) == 0
    out = pd.read_parquet(tmp_path / "p")
    read = f"pd.read_csv({str(tmp_path / 'new.csv')!r})"
    logits = np.asarray(pyfunc_elsewhere(tracking_uri, ours["model_uri"], read, tmp_path / "e"))
    assert out["prediction"].tolist() == np.array(["no", "yes"])[logits.argmax(1)].tolist()
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(out["probability_yes"], probabilities[:, 1], rtol=1e-5)
