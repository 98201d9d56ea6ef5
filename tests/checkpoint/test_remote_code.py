"""A checkpoint ships only the code it runs: the core, plus the runtime module of each recipe and policy its plan
uses, plus what those import; `modeling_surgery.py` names them in a block that export writes per checkpoint."""

import re

import pytest

import surgery.arch.modeling_surgery as modeling
from surgery.arch import SurgeryConfig
from surgery.checkpoint import export

CORE = {"modeling_surgery.py", "configuration_surgery.py", "attention_surgery.py", "cache_surgery.py",
        "kvlayer_surgery.py", "mlp_surgery.py", "decode_surgery.py", "prefill_surgery.py"}
RECIPE_RUNTIMES = {f"{runtime.module}_surgery.py" for runtime in modeling.RUNTIMES}


def tiny(**plan) -> SurgeryConfig:
    return SurgeryConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, **plan)


def test_an_identity_checkpoint_ships_the_core_only():
    files = export.remote_code(tiny())
    assert set(files) == CORE and len(files) <= 10
    assert not set(files) & (RECIPE_RUNTIMES | {"budget_surgery.py", "policies_surgery.py"})
    assert sum(data.count(b"\n") for data in files.values()) < 2400  # 3,177 lines in 19 files before; Gemma, Phi-3 +190


def test_kvsharer_runs_on_the_core_and_ships_nothing_more():
    assert set(export.remote_code(tiny(kv_source=[0, 1, 0, 1]))) == CORE


@pytest.mark.parametrize("plan,runtime", [
    ({"kv_policy": "snapkv"}, "snapkv"), ({"kv_policy": "h2o"}, "h2o"), ({"kv_policy": "streamingllm"}, "streamingllm"),
    ({"pod_key_source": [[0, 0], [0, 1], [2, 2], [2, 3]]}, "pod"),
    ({"attention_gate_heads": 1, "attention_gate_width": 2}, "attention_gate"),
    ({"modification_layers": [1, 3]}, "modification"),
    ({"matryoshka_key_ranks": [[4, 4]] * 4, "matryoshka_value_ranks": [[4, 4]] * 4}, "matryoshka"),
])
def test_a_recipe_checkpoint_ships_its_own_runtime_and_no_other(plan, runtime):
    files = export.remote_code(tiny(**plan))
    assert f"{runtime}_surgery.py" in files
    assert set(files) & RECIPE_RUNTIMES == {f"{runtime}_surgery.py"}
    block = files["modeling_surgery.py"].decode()
    assert f"from .{runtime}_surgery import RUNTIME as {runtime}_runtime" in block
    imported = set(export.RELATIVE_IMPORT.findall(block))  # transformers < 5.23 copies only these
    assert {name.removesuffix(".py") for name in files} - {"modeling_surgery"} <= imported


def test_the_packaged_block_names_every_runtime():
    """The block in the package's own modeling_surgery.py is the one export writes for all runtimes."""
    sources = {path.name: path.read_text() for path in export.remote_code_files()}
    packaged = sources["modeling_surgery.py"]
    modules = [path.name.removesuffix("_surgery.py") for path in export.remote_code_files()
               if re.search(r"^RUNTIME = ", path.read_text(), re.MULTILINE)]
    expected = export.with_runtime_block(packaged, sources, sorted(modules))
    assert packaged == expected, "regenerate the block: export.with_runtime_block(source, sources, all modules)"


def test_a_plan_whose_runtime_is_not_shipped_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(modeling, "RUNTIMES", ())
    with pytest.raises(ValueError, match="needs snapkv_surgery.py, which this checkpoint does not ship"):
        modeling.SurgeryForCausalLM(tiny(kv_policy="snapkv"))
