"""surgery adapt: the loss, what it trains, orthogonality, and exact resume."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_convert
from surgery.checkpoint.records import read_recipe
from surgery.adapt.engine import AdaptSettings, adapt, distillation_loss, enable_checkpointing
from surgery.recipes.matryoshka import MatryoshkaKV


def test_distillation_loss_is_alpha_kl_plus_ce():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    p_t = teacher[:, :-1].softmax(-1)
    kl = (p_t * (p_t.log() - student[:, :-1].log_softmax(-1))).sum(-1).mean()
    ce = -student[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).mean()
    assert distillation_loss(student, teacher, labels, 0.25).item() == pytest.approx((0.25 * kl + 0.75 * ce).item(), rel=1e-5)


@pytest.fixture(scope="module")
def matryoshka_checkpoint(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("mkv") / "ckpt"
    return run_convert(tiny_llama, out, recipe="matryoshka", num_samples=8, seq_len=16,
                       recipe_options={"kv_fraction": 0.5, "uniform": True})


SETTINGS = dict(steps=4, batch_size=2, seq_len=16, num_samples=6, lr=5e-2, warmup_steps=1, save_every=2,
                mixed_precision="no")


def test_matryoshka_adapt_trains_orthogonal_bases_only(matryoshka_checkpoint, tiny_llama, tmp_path):
    out = adapt(matryoshka_checkpoint, tmp_path / "trained", AdaptSettings(teacher=str(tiny_llama), **SETTINGS),
                verify=False, progress=False)
    before, after = load_file(matryoshka_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".kv_projection." in name for name in changed)
    for name, tensor in after.items():
        if "_bases." in name:
            gram = tensor.T.double() @ tensor.double()
            assert (gram - torch.eye(tensor.shape[1], dtype=torch.float64)).abs().max() < 1e-5, name
    assert any("_bases." in name for name in changed)


def test_resume_ends_with_the_same_weights(matryoshka_checkpoint, tiny_llama, tmp_path):
    settings = AdaptSettings(teacher=str(tiny_llama), **SETTINGS)
    straight = adapt(matryoshka_checkpoint, tmp_path / "straight", settings, verify=False, progress=False)
    adapt(matryoshka_checkpoint, tmp_path / "resumed", settings, verify=False, progress=False, stop_after=2)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.adapt-state" / "step-2").is_dir()
    resumed = adapt(matryoshka_checkpoint, tmp_path / "resumed", settings, resume=True, verify=False, progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    record = read_recipe(resumed)["adapt"]
    assert record["resumed_from_step"] == 2  # it continued from the saved state, not from step 0
    assert record["tokens"] == (settings.steps - 2) * settings.batch_size * settings.seq_len * settings.grad_accum


def test_kvsharer_adapt_trains_sharing_layers_attention(tiny_llama, tmp_path):
    ckpt = run_convert(tiny_llama, tmp_path / "shared", recipe="kvsharer", share_layers=2, threshold=-1.0,
                       num_samples=4, seq_len=16)
    out = adapt(ckpt, tmp_path / "trained", AdaptSettings(teacher=str(tiny_llama), **SETTINGS), verify=True,
                progress=False)
    import json

    sharing = [i for i, s in enumerate(json.loads((ckpt / "config.json").read_text())["kv_source"]) if s != i]
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    allowed = {f"model.layers.{i}.self_attn.{p}.{w}" for i in sharing for p in ("q_proj", "o_proj") for w in ("weight", "bias")}
    assert changed and changed <= allowed
    import yaml

    record = yaml.safe_load((out / "recipe.yaml").read_text())
    assert record["adapt"]["steps"] == 4 and record["adapt"]["alpha"] == KVSHARER_ALPHA


KVSHARER_ALPHA = 1.0


def test_matryoshka_default_alpha_is_the_papers():
    assert MatryoshkaKV.distill_alpha == 0.25


@pytest.fixture(scope="module")
def kvsharer_checkpoint(tiny_llama, tmp_path_factory):
    return run_convert(tiny_llama, tmp_path_factory.mktemp("kvs") / "ckpt", recipe="kvsharer", share_layers=2,
                       threshold=-1.0, num_samples=4, seq_len=16)


def test_teacher_reads_the_students_frozen_tensors(kvsharer_checkpoint, tiny_llama):
    """One copy of the weights: every tensor the student holds frozen and unchanged is the same storage in the
    teacher; the teacher still computes what the family's transformers class computes."""
    from surgery.checkpoint.loading import load_source_model
    from surgery.checkpoint.sources import resolve
    from surgery.train.teacher import shared_teacher

    student = load_source_model(resolve(str(kvsharer_checkpoint)))
    trained = {"model.layers.4.self_attn.q_proj.weight"}
    teacher, own_bytes = shared_teacher(resolve(str(tiny_llama)), student, trained)
    students = dict(student.named_parameters())
    shared = [n for n, t in teacher.named_parameters() if n in students and t.data_ptr() == students[n].data_ptr()]
    own = {n for n, t in teacher.named_parameters()} - set(shared)
    sharing = [i for i, s in enumerate(student.config.kv_source) if s != i]
    expected_own = {n for n, _ in teacher.named_parameters()
                    if any(f"layers.{i}.self_attn.{p}_proj." in n for i in sharing for p in "kv")} | trained
    assert len(expected_own) == 2 * 2 * 2 + 1  # k and v, weight and bias, of the two sharing layers
    assert own == expected_own
    assert own_bytes == sum(dict(teacher.named_parameters())[n].numel() * 4 for n in expected_own)
    reference = load_source_model(resolve(str(tiny_llama)))
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert (teacher(ids).logits - reference(ids).logits).abs().max() < 1e-5


def test_lora_merge_is_base_plus_scaled_low_rank_delta():
    from surgery.train.lora import add_lora, merge_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    base = model[0].weight.detach().clone()
    add_lora(model, ["0"], rank=2, alpha=3.0)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    model[0].lora_A["default"].weight.data.copy_(a)
    model[0].lora_B["default"].weight.data.copy_(b)
    merge_lora(model)
    assert type(model[0]) is torch.nn.Linear
    assert torch.allclose(model[0].weight, base + (3.0 / 2) * b @ a, atol=1e-6)


def test_lora_adapt_trains_only_adapters_and_exports_low_rank_updates(kvsharer_checkpoint, tiny_llama, tmp_path):
    settings = AdaptSettings(teacher=str(tiny_llama), lora_rank=2, **SETTINGS)
    out = adapt(kvsharer_checkpoint, tmp_path / "lora", settings, verify=True, progress=False)
    before, after = load_file(kvsharer_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()  # plain weights, no adapter tensors
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    sharing = [i for i in range(6) if f"model.layers.{i}.self_attn.k_proj.weight" not in before]
    targets = {f"model.layers.{i}.self_attn.{p}.weight" for i in sharing for p in ("q_proj", "o_proj")}
    assert changed and changed <= targets
    for name in changed:
        assert torch.linalg.matrix_rank((after[name] - before[name]).double(), atol=1e-6) <= 2, name
    record = read_recipe(out)["adapt"]
    assert record["trainable_parameters"] == sum(2 * sum(before[name].shape) for name in targets)  # r·(in + out)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama, tmp_path):
    """Sharing layers read K/V from another layer's cache, and MatryoshkaKV projects it: the rerun in backward
    must see the same cache, so every gradient, the owners' k_proj/v_proj included, matches a plain backward."""
    from surgery.checkpoint.loading import load_source_model
    from surgery.checkpoint.sources import resolve

    ckpt = run_convert(tiny_llama, tmp_path / "both", recipe="kvsharer,matryoshka", num_samples=4, seq_len=16,
                       share_layers=2, threshold=-1.0, recipe_options={"kv_fraction": 0.5, "uniform": True})
    model = load_source_model(resolve(str(ckpt))).train()
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    enable_checkpointing(model)
    assert model.model.gradient_checkpointing
    checkpointed_loss, checkpointed = loss_and_grads()
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == checkpointed.keys() and any("layers.1.self_attn.k_proj" in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_with_the_global_batch(kvsharer_checkpoint, tiny_llama, tmp_path):
    """torchrun, 2 processes over gloo, 1 sequence each, gives the weights of 1 process with 2 sequences a step:
    DDP averages the two halves' gradients, which is the mean over the global batch."""
    import os
    import subprocess
    import sys

    options = dict(steps=3, seq_len=16, num_samples=6, lr=5e-2, warmup_steps=1, save_every=0, mixed_precision="no")
    single = adapt(kvsharer_checkpoint, tmp_path / "one", AdaptSettings(teacher=str(tiny_llama), batch_size=2, **options),
                   verify=False, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "surgery", "--quiet",
               "adapt", str(kvsharer_checkpoint), "--teacher", str(tiny_llama), "--out", str(tmp_path / "two"),
               "--batch-size", "1", "--no-verify"]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote") == 1
    assert read_recipe(tmp_path / "two")["adapt"]["processes"] == 2
    a, b = load_file(single / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    changed = [name for name in a if not torch.equal(a[name], load_file(kvsharer_checkpoint / "model.safetensors")[name])]
    assert changed
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_fsdp_example_is_a_valid_accelerate_config():
    """The FSDP example ships untested on GPUs; at least accelerate must read it, and wrap our decoder layers."""
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    from surgery.arch.modeling_surgery import SurgeryDecoderLayer

    config = ClusterConfig.from_yaml_file(str(Path(__file__).parents[2] / "examples" / "fsdp.yaml"))
    assert config.distributed_type == "FSDP"
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == SurgeryDecoderLayer.__name__
