"""What a run is: frozen dataclasses per section, TOML and `--set`, checks, run ids.

Imports nothing else of slt but its errors, so a stored config reads back anywhere.
"""

from slt.config.checks import (
    check_alternatives,
    check_optimizer,
    coerce,
    from_dict,
    split_scorer_table,
    validate,
)
from slt.config.ids import (
    config_hash,
    config_hashes,
    hashed_values,
    legacy_config_hash,
    legacy_run_id,
    run_id,
)
from slt.config.schema import (
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    RunConfig,
    SearchConfig,
    SourceConfig,
    default_data_root,
)
from slt.config.toml import (
    apply_overrides,
    describe,
    load_raw,
    parse_override,
    parse_value,
    read_toml,
    resolve_config_path,
    set_key,
    to_toml,
)

__all__ = ["Config", "DataConfig", "ModelConfig", "RunConfig", "SECTIONS", "SearchConfig",
           "SourceConfig", "apply_overrides", "check_alternatives", "check_optimizer", "coerce",
           "config_hash", "config_hashes", "default_data_root", "describe", "from_dict",
           "hashed_values", "legacy_config_hash", "legacy_run_id", "load_raw", "parse_override",
           "parse_value", "read_toml", "resolve_config_path", "run_id", "set_key",
           "split_scorer_table", "to_toml", "validate"]
