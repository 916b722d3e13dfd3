"""The run spec: one dataclass per part (data, model, train, tracking, search; scaling is the
cluster's), composed into RunSpec and loaded from YAML + --set (spec); user code named as
module:attr (user); overrides that travel to a job (overrides)."""
