"""The run spec: one dataclass per part, YAML + --set (spec), user code named as module:attr
(user), overrides that travel to a job (overrides)."""
