"""surgery adapt: the loss, what it trains, orthogonality, and exact resume."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_convert
from surgery.card import read_recipe
from surgery.adapt import AdaptSettings, adapt, distillation_loss
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
                       recipe_options={"budget": 0.5, "uniform": True})


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
