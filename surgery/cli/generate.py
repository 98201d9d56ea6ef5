"""`surgery generate`: greedy answers from a checkpoint, and from a baseline beside it."""

import click

from surgery.base.errors import SurgeryError
from surgery.cli.errors import friendly_errors
from surgery.cli.options import ALLOW_PICKLE


@click.command()
@click.argument("checkpoint")
@click.option("--prompt", default="Write one sentence about the sea.", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--baseline", default=None, help="Also answer with this model (e.g. the source), for a side-by-side look.")
@ALLOW_PICKLE
@friendly_errors
def generate(checkpoint, prompt, max_new_tokens, baseline, allow_pickle):
    """Greedy-generate from CHECKPOINT (and --baseline), using the chat template when there is one."""
    if not prompt.strip():
        raise SurgeryError("--prompt is empty", hint='pass some text, e.g. --prompt "Name three rivers in Europe."')
    from surgery.evals.evaluate import resolve_inputs
    from surgery.checkpoint.loading import load_source_model

    source, base_source, tokenizer = resolve_inputs(checkpoint, baseline, allow_pickle)
    answers = [(checkpoint, load_source_model(source))]
    if base_source is not None:
        answers.append((baseline, load_source_model(base_source)))
    for name, model in answers:
        text = greedy_answer(model, tokenizer, prompt, max_new_tokens)
        click.echo(f"{name}: {text}" if base_source is not None else text)


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
