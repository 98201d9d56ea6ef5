"""Fuzzing: whatever config.json or numeric options say, a conversion either succeeds or ends in one clear line.

Derandomized, with a bounded number of examples and `--no-verify`, so CI runs the same cases every time.
"""

import json
import shutil
from pathlib import Path

import click
import pytest
from helpers import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

odd_values = st.one_of(
    st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=8), st.sampled_from([16, 32, 64, 128]),
    st.integers(min_value=-3, max_value=300), st.none(), st.booleans(), st.text(max_size=4),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(0, 4), max_size=3), st.just({}),
)
CONFIG_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "rope_parameters", "hidden_act", "model_type", "bos_token_id", "pad_token_id")


def assert_clean_outcome(result) -> None:
    """Exit 0, or a non-zero exit with exactly one `error:` line and no traceback."""
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert "unexpected" not in errors[0], errors[0]  # the last-resort handler means a case nobody validated


@pytest.mark.slow
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), odd_values, min_size=1, max_size=3))
def test_fuzzed_config_json(tiny_models, tmp_path_factory, changes):
    root = tmp_path_factory.mktemp("fuzz")
    source = root / "src"
    shutil.copytree(tiny_models["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (source / "config.json").write_text(json.dumps(config))
    result = cli("convert", source, "--recipe", "none", "--out", root / "out", "--no-verify")
    assert_clean_outcome(result)
    assert result.exit_code != 0 or (root / "out" / "config.json").is_file()
    assert result.exit_code == 0 or not (root / "out").exists()


numbers = st.one_of(st.integers(min_value=1, max_value=4), st.integers(min_value=1, max_value=4),
                    st.floats(min_value=0.05, max_value=1.0), st.integers(min_value=-5, max_value=40), st.floats(min_value=-2, max_value=3, allow_nan=False),
                    st.sampled_from(["abc", "", "1e3", "nan", "inf", "-inf", "NaN", "1e400"]))
RECIPE_OPTIONS = {
    "kvsharer": ("--share-layers", "--ratio", "--threshold", "--calib-batch-size", "--num-samples", "--seq-len"),
    "snapkv": ("--keep", "--keep-tokens", "--window"),
    "matryoshka": ("--kv-fraction", "--search-samples", "--search-len", "--num-samples", "--seq-len"),
}


@pytest.mark.slow
@FUZZ
@given(recipe=st.sampled_from(sorted(RECIPE_OPTIONS)), data=st.data())
def test_fuzzed_numeric_options(tiny_llama, tmp_path_factory, recipe, data):
    names = data.draw(st.lists(st.sampled_from(RECIPE_OPTIONS[recipe]), min_size=1, max_size=3, unique=True))
    options = [item for name in names for item in (name, str(data.draw(numbers)))]
    if recipe != "snapkv":  # keep calibration tiny: a few short samples unless the draw chose its own
        options += [] if "--num-samples" in names else ["--num-samples", "2"]
        options += [] if "--seq-len" in names else ["--seq-len", "16"]
    out = Path(tmp_path_factory.mktemp("fuzz")) / "out"
    result = cli("convert", tiny_llama, "--recipe", recipe, "--out", out, "--no-verify", *options)
    assert_clean_outcome(result)
    assert result.exit_code == 0 or not out.exists()


def test_every_numeric_adapt_option_is_range_checked():
    """Each numeric adapt option rejects -7 with its own flag named, before anything loads."""
    from dataclasses import fields

    from surgery.adapt.engine import AdaptSettings
    from surgery.base.ranges import has_range

    for spec in fields(AdaptSettings):
        if has_range(spec):
            result = cli("adapt", "ckpt", "--teacher", "demo", "--out", "o", f"--{spec.name.replace('_', '-')}", "-7")
            assert result.exit_code == 2 and f"--{spec.name.replace('_', '-')}" in result.stderr


def float_options() -> list[tuple[str, str]]:
    """(command, flag) of every float option of every command, recipes' included."""
    from surgery.base.ranges import FiniteFloat
    from surgery.cli.main import main

    found = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag:
                float_like = isinstance(param.type, (FiniteFloat, click.FloatRange)) or param.type is click.FLOAT
                if float_like:
                    found.append((name, param.opts[0]))
    return found


def test_every_float_option_is_the_finite_float_type():
    """One click type for every float option: a plain FloatRange lets NaN through every bound."""
    from surgery.base.ranges import FiniteFloat
    from surgery.cli.main import main

    plain = [(name, param.opts[0]) for name, command in main.commands.items() for param in command.params
             if isinstance(param.type, click.FloatRange) or param.type is click.FLOAT]
    assert not plain
    assert ("convert", "--keep") in float_options() and ("convert", "--kv-fraction") in float_options()
    assert all(isinstance(p.type, FiniteFloat) for c in main.commands.values() for p in c.params
               if (c.name, p.opts[0]) in float_options())


@pytest.mark.parametrize("command,flag", float_options())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_are_refused_at_parse_time(command, flag, value):
    """Given first, the option is parsed first: exit 2 and its own name, before any argument or file is looked at."""
    result = cli(command, flag, value)
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "not a finite number" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_finite_options_from_python_are_refused_too():
    from surgery.base.errors import SurgeryError
    from surgery.base.ranges import check_ranges
    from surgery.recipes import RECIPES

    for value in (float("nan"), float("inf")):
        with pytest.raises(SurgeryError, match="--keep must be a finite number"):
            check_ranges(RECIPES["snapkv"](keep=value))
        with pytest.raises(SurgeryError, match="--kv-fraction must be a finite number"):
            check_ranges(RECIPES["matryoshka"](kv_fraction=value))


@pytest.mark.slow
@settings(max_examples=12, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_non_finite_tensors(tiny_llama, tmp_path_factory, data):
    """A NaN or inf anywhere in any tensor of the source: every recipe ends in one line naming that tensor."""
    from safetensors.torch import load_file, save_file

    from surgery.recipes import RECIPES

    root = tmp_path_factory.mktemp("fuzz")
    source = root / "src"
    shutil.copytree(tiny_llama, source)
    tensors = load_file(source / "model.safetensors")
    name = data.draw(st.sampled_from(sorted(tensors)))
    flat = tensors[name].view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from([float("nan"), float("inf"),
                                                                                  float("-inf")]))
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    recipe = data.draw(st.sampled_from(sorted(set(RECIPES) - {"adamoe"})))  # adamoe needs experts: refused first
    result = cli("convert", source, "--recipe", recipe, "--out", root / "out", "--no-verify")
    assert_clean_outcome(result)
    assert result.exit_code == 1 and f"{name} holds NaN or infinite values" in result.stderr
    assert not (root / "out").exists()
