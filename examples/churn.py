"""A customer-churn table as real tables come: text categories (`plan`, `region`), a
high-cardinality one (`city`, 200 values), a boolean (`autopay`) and blanks (5% of `age`,
`income`, `plan` and `autopay`). Churn depends on all of them, through a logistic model.

    .venv/bin/python examples/churn.py data/churn.csv        (or .parquet)
    .venv/bin/trainyard train configs/churn.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = ["north", "south", "east", "west", "central", "islands"]
PLAN_EFFECT = {"basic": 1.0, "plus": 0.0, "pro": -1.2}


def table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(list(PLAN_EFFECT), n, p=[0.5, 0.3, 0.2])
    region = rng.choice(REGIONS, n)
    autopay = rng.random(n) < 0.6
    city_number = rng.integers(0, 200, n)
    age = rng.normal(45, 12, n).round()
    income = rng.lognormal(10.5, 0.5, n).round(-2)
    z = (
        np.vectorize(PLAN_EFFECT.get)(plan)
        - 1.5 * autopay
        + 0.04 * (age - 45)
        - 0.8 * (np.log(income) - 10.5)
        + 0.8 * np.isin(region, ["islands", "central"])
        + 0.6 * (city_number % 5 == 0)
    )
    churn = np.where(rng.random(n) < 1 / (1 + np.exp(-2 * z)), "yes", "no")
    blank = rng.random((n, 4)) < 0.05
    return pd.DataFrame(
        {
            "plan": pd.Series(plan).where(~blank[:, 0]),
            "region": region,
            "autopay": pd.Series(autopay, dtype=object).where(~blank[:, 1]),
            "city": [f"city{i:03d}" for i in city_number],
            "age": pd.Series(age).where(~blank[:, 2]),
            "income": pd.Series(income).where(~blank[:, 3]),
            "churn": churn,
        }
    )


def main(path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = table()
    if out.suffix == ".parquet":
        df.astype({"autopay": "boolean"}).to_parquet(out, index=False)
    else:
        df.to_csv(out, index=False)
    print(f"wrote {len(df)} rows to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/churn.csv")
