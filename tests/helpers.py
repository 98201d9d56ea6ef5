"""Shared test helpers: convert in-process and load checkpoints the way users do."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from click.testing import CliRunner

from surgery.cli.main import main
from surgery.pipelines.convert import ConvertRequest, convert
from surgery.recipes import recipe_class


def run_convert(model: str | Path, out: Path, recipe: str = "none", verify: bool = False,
                recipe_options: dict | None = None, **options) -> Path:
    """Convert in-process; KVSharer's options may be passed directly, any recipe's through `recipe_options`."""
    recipe_options = dict(recipe_options or {})
    recipe_options.update({k: options.pop(k) for k in list(options) if k in ("share_layers", "ratio", "threshold", "order")})
    classes = [recipe_class(name) for name in recipe.split(",")]
    unused = set(recipe_options) - {key for cls in classes for key in cls.__dataclass_fields__}
    assert not unused, f"no recipe in {recipe} takes {unused}"
    recipes = [cls(**{k: v for k, v in recipe_options.items() if k in cls.__dataclass_fields__}) for cls in classes]
    request = ConvertRequest(model=str(model), recipes=recipes, out=out, verify=verify, progress=False, **options)
    return convert(request)


def load_remote(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def load_reference(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def decode_stepwise(model, ids: torch.Tensor, prompt: int, mask: torch.Tensor | None = None, **prefill_kwargs):
    """Prefill `prompt` tokens, then feed the rest one at a time through the cache; the logits of every position."""
    out = model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt], use_cache=True,
                **prefill_kwargs)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(prompt, ids.shape[1]):
        step_mask = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def cli(*args, verbose: bool = False):
    """Run the CLI in-process, as a user would from a shell (progress bars off)."""
    return CliRunner().invoke(main, ["-v" if verbose else "-q", *map(str, args)])


def assert_clean_failure(result, *needles, code: int | None = None):
    """A non-zero exit, no traceback, and one `error:` line that contains every needle."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    message = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in message
    errors = [line for line in message.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, message
    assert message.splitlines()[-1].startswith("error:"), message
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def widened_surgery_model(implementation: str, seed: int = 0, **options):
    """A tiny float64 surgery model (4 layers, 4 query and 2 KV heads of width 8) with every weight drawn from
    N(0, 0.3): attention far from uniform, so gates and routers decide differently per token."""
    from surgery.arch import SurgeryConfig, SurgeryForCausalLM

    torch.manual_seed(seed)
    config = SurgeryConfig(**{**dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), **options})
    config._attn_implementation = implementation
    model = SurgeryForCausalLM(config).double().eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.3)
    return model
