from pathlib import Path

import pytest
import yaml

from conftest import REPO
from enhanced_tft.config.overrides import canonical_key
from enhanced_tft.config.schema import Config, apply_test_mode, build_config, load_config, to_yaml, with_overrides
from enhanced_tft.errors import ConfigError


@pytest.mark.parametrize("raw, key, allowed", [
    ({"model": {"d_model": 64, "num_heads": 7}}, "model", "num_heads that divides d_model"),
    ({"data": {"sequence_length": 1}}, "data.sequence_length=1", "greater than or equal to 2"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size=0", "greater than or equal to 1"),
    ({"model": {"dropout_rate": 1.0}}, "model.dropout_rate=1.0", "less than 1"),
    ({"model": {"dropout_rate": -0.1}}, "model.dropout_rate=-0.1", "greater than or equal to 0"),
    ({"task": "forecast_everything"}, "task='forecast_everything'", "'classification_binary'"),
    ({"model": {"d_model": "big"}}, "model.d_model='big'", "valid integer"),
    ({"train": {"micro_batch_size": 8.5}}, "train.micro_batch_size=8.5", "valid integer"),
    ({"train": {"gradient_accumulation_steps": 0}}, "train.gradient_accumulation_steps=0", ">= 1".replace(">= ", "greater than or equal to ")),
])
def test_bad_values_name_key_value_and_what_is_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    message = str(err.value)
    assert key in message
    assert allowed in message


def test_num_heads_message_names_both_values():
    with pytest.raises(ConfigError, match=r"num_heads=7 does not divide d_model=64"):
        build_config({"model": {"d_model": 64, "num_heads": 7}})


def test_unknown_key_is_an_error_listing_allowed_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"d_modle": 64}})
    assert "model.d_modle: unknown key" in str(err.value)
    assert "d_model" in str(err.value) and "num_heads" in str(err.value)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="optimiser: unknown key"):
        build_config({"optimiser": {"lr": 1}})


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"micro_batch_size": 0}, "data": {"sequence_length": 1}})
    assert "train.micro_batch_size" in str(err.value) and "data.sequence_length" in str(err.value)


def test_default_yaml_is_exactly_the_builtin_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == Config()


SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                 if p.name != "tune_space.yaml")   # a search space, not a config: test_tune.py validates it


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "columns":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_shipped_yaml_is_covered():
    assert {"default.yaml", "seed_original.yaml", "seed_v2_1.yaml", "bench_matched.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yamls_validate_and_keep_every_value_they_set(name):
    """Every file in configs/ loads, and each value it writes is the value the config holds."""
    written = {canonical_key(k): v for k, v in _leaves(yaml.safe_load((REPO / "configs" / name).read_text()) or {}).items()}
    loaded = _leaves(load_config(REPO / "configs" / name).model_dump(mode="json"))
    assert written, name
    assert {k: loaded[k] for k in written} == written


def test_seed_presets_hold_the_seed_sizes():
    original = load_config(REPO / "configs" / "seed_original.yaml")
    assert (original.model.d_model, original.model.num_transformer_blocks, original.model.ff_dim,
            original.model.num_heads) == (256, 6, 512, 8)
    assert (original.train.micro_batch_size, original.train.gradient_accumulation_steps) == (16, 8)
    assert original.train.samples_per_step == 128
    assert original.data.sequence_length == 60 and original.model.dropout_rate == 0.3
    reduced = load_config(REPO / "configs" / "seed_v2_1.yaml")
    assert (reduced.model.d_model, reduced.model.num_transformer_blocks, reduced.model.ff_dim) == (128, 4, 256)
    assert reduced.train.samples_per_step == 32


def test_overrides_beat_yaml_and_parse_values(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"d_model": 32, "num_heads": 4}}))
    cfg = load_config(path, ["model.d_model=64", "train.mixed_precision=false", "data.return_lags=[1, 4]"])
    assert cfg.model.d_model == 64 and cfg.model.num_heads == 4
    assert cfg.train.mixed_precision is False
    assert cfg.data.return_lags == [1, 4]


def test_malformed_override_says_how_it_should_look():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.d_model"])


def test_missing_or_broken_yaml_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_seed_mixed_precision_booleans_still_accepted():
    assert build_config({"train": {"mixed_precision": True}}).train.mixed_precision is True
    with pytest.raises(ConfigError, match="train.mixed_precision='half'"):
        build_config({"train": {"mixed_precision": "half"}})


def test_test_mode_shrinks_and_marks_the_run():
    cfg = apply_test_mode(load_config(REPO / "configs" / "seed_original.yaml"))
    assert cfg.run.test_mode and cfg.train.epochs == 2
    assert cfg.model.d_model == 32 and cfg.data.num_bars <= 800
    assert cfg.task == "classification_binary"


def test_floats_in_exponent_form_are_numbers(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3e-4\n  weight_decay: 1E-2\n")
    cfg = load_config(path, ["train.grad_clip_norm=5e-1"])
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.grad_clip_norm) == (3e-4, 1e-2, 0.5)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path):
    """A "billion laughs" config: nine levels of nine aliases would expand to 9**9 strings."""
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines.append("model: {d_model: *a9}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 700
    with pytest.raises(ConfigError, match=r"not valid YAML: .*YAML aliases \(\*a0\) are not allowed in a config"):
        load_config(path)


def test_error_messages_quote_a_huge_value_cut_short():
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"d_model": "x" * 100_000}})
    message = str(err.value)
    assert "model.d_model='xxxx" in message and "... (100002 characters)" in message
    assert len(message) < 600


def test_what_etft_writes_has_no_aliases_and_reads_back():
    """An object met twice would be dumped as an anchor and an alias, which the loader refuses."""
    from enhanced_tft.config.schema import to_yaml
    from enhanced_tft.config.yaml_io import dump_yaml, load_yaml_text
    shared = [1, 2, 4]
    text = dump_yaml({"a": shared, "b": shared})
    assert "&" not in text and "*" not in text and load_yaml_text(text) == {"a": [1, 2, 4], "b": [1, 2, 4]}
    cfg = build_config({"data": {"return_lags": [1, 2, 4], "volatility_windows": [1, 2, 4]}})
    assert build_config(load_yaml_text(to_yaml(cfg))) == cfg


def test_batch_size_is_the_older_name_of_micro_batch_size(tmp_path):
    """The seed's `batch_size` (YAML or --set) sets train.micro_batch_size; the saved config names it
    micro_batch_size; an override replaces the setting whichever name held it; both names at once must agree."""
    seed_style = tmp_path / "seed.yaml"
    seed_style.write_text("train:\n  batch_size: 16\n  gradient_accumulation_steps: 8\n")
    cfg = load_config(seed_style)
    assert (cfg.train.micro_batch_size, cfg.train.samples_per_step) == (16, 128)
    assert "micro_batch_size: 16" in to_yaml(cfg) and "\n  batch_size" not in to_yaml(cfg)
    assert load_config(seed_style, ["train.micro_batch_size=4"]).train.micro_batch_size == 4
    assert load_config(seed_style, ["train.batch_size=2"]).train.micro_batch_size == 2
    assert with_overrides(cfg, ["train.batch_size=8"]).train.micro_batch_size == 8
    assert build_config({"train": {"batch_size": 8, "micro_batch_size": 8}}).train.micro_batch_size == 8
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"batch_size": 8, "micro_batch_size": 32}})
    assert ("train.batch_size=8 and train.micro_batch_size=32 are the same setting (batch_size is the older name "
            "of micro_batch_size); give one of them") in str(err.value)
    effective = build_config({"train": {"batch_size": 16, "effective_batch_size": 64}}).train
    assert (effective.micro_batch_size, effective.gradient_accumulation_steps) == (16, 4)
