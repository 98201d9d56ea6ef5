"""The RULER-style retrieval suite: deterministic generators and string-match recall on hand-made answers."""

import pytest

from surgery.evals.retrieval import (PROMPT_FORMATS, TASKS, Haystack, generate, insert_at_depths, sentences_of,
                               string_match_recall)
from surgery.evals.retrieval_eval import prompt_texts

PROSE = " ".join(f"Sentence number {i} says something plain about rivers and hills." for i in range(400))


@pytest.fixture(scope="module")
def tokenizer(demo_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_source.folder)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return Haystack(tokenizer, PROSE)


def test_string_match_recall_on_hand_made_answers():
    assert string_match_recall("The special magic number is 1234567.", ("1234567",)) == 1.0
    assert string_match_recall("It is 1234566.", ("1234567",)) == 0.0
    assert string_match_recall("Apple, PEAR and plum", ("apple", "pear", "fig", "plum")) == 0.75
    assert string_match_recall("", ("a",)) == 0.0


def test_needles_go_between_sentences_at_their_depths():
    sentences = ["A.", "B.", "C.", "D."]
    assert insert_at_depths(sentences, ["N1.", "N2."], [0.0, 1.0]) == "N1. A. B. C. D. N2."
    assert insert_at_depths(sentences, ["N."], [0.5]) == "A. B. N. C. D."
    assert sentences_of("One. Two!  Three?") == ["One.", "Two!", "Three?"]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_is_deterministic_fits_its_length_and_hides_its_answers(task, tokenizer, haystack):
    first = generate(task, tokenizer, haystack, 512, 3, seed=7)
    assert first == generate(task, tokenizer, haystack, 512, 3, seed=7)
    assert first != generate(task, tokenizer, haystack, 512, 3, seed=8)
    assert [sample.depth for sample in first] == [0.0, 0.5, 1.0]
    for sample in first:
        for prompt_format in PROMPT_FORMATS:
            tokens = len(tokenizer("".join(prompt_texts(tokenizer, sample, prompt_format)),
                                   add_special_tokens=False)["input_ids"])
            assert 400 <= tokens <= 512, (prompt_format, tokens)
        assert all(reference.lower() in sample.context.lower() for reference in sample.references)


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
def test_the_context_part_never_holds_the_question(prompt_format, tokenizer, haystack):
    """Context-only compression must not see the query: the question and the answer prefix (which names the key)
    come after the context part, and the prompt ends where the reply starts."""
    for task in TASKS:
        sample = generate(task, tokenizer, haystack, 512, 1, seed=3)[0]
        context, question = prompt_texts(tokenizer, sample, prompt_format)
        assert sample.context in context
        assert sample.question not in context and sample.question in question
        ending = "Answer:" if prompt_format == "qa" else sample.answer_prefix
        assert question.endswith(ending) and ending not in context
        assert ("<|im_start|>assistant" in question) == (prompt_format != "ruler-plain")


def test_multikey_asks_one_key_among_distractors(tokenizer, haystack):
    sample = generate("niah_multikey", tokenizer, haystack, 512, 1, seed=1)[0]
    assert sample.context.count("One of the special magic numbers for") == 4 and len(sample.references) == 1
    key = sample.question.split(" for ")[1].split(" mentioned")[0]
    assert f"for {key} is: {sample.references[0]}." in sample.context


def test_variable_tracking_chain_reaches_every_reference(tokenizer, haystack):
    sample = generate("variable_tracking", tokenizer, haystack, 512, 1, seed=3)[0]
    value = sample.question.split("value ")[1].split(" ")[0]
    holders = set(sample.references)
    assert f"VAR {sample.references[0]} = {value}." in sample.context
    for previous, name in zip(sample.references, sample.references[1:]):
        assert f"VAR {name} = VAR {previous}." in sample.context
    assert len(holders) == 5


@pytest.mark.parametrize("task,top", [("common_words", 10), ("frequent_words", 3)])
@pytest.mark.parametrize("length", [512, 2048])
def test_word_extraction_answers_are_the_strictly_most_frequent(tokenizer, haystack, task, top, length):
    sample = generate(task, tokenizer, haystack, length, 1, seed=2)[0]
    numbers, words = sample.context.split()[0::2], sample.context.split()[1::2]  # "1. apple 2. pear ..."
    assert numbers[:3] == ["1.", "2.", "3."]
    counts = sorted(((words.count(word), word) for word in set(words)), reverse=True)
    assert {word for _, word in counts[:top]} == set(sample.references)
    assert counts[top - 1][0] > counts[top][0]  # no tie at the cut


def test_left_padded_batches_answer_as_single_prompts(tiny_with_tokenizer, tokenizer, haystack, tmp_path):
    """Prompts of different lengths in one left-padded batch get the answers each gets alone."""
    from helpers import load_remote, run_convert

    from surgery.evals.retrieval_eval import answers

    model = load_remote(run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv",
                                    recipe_options={"keep": 0.3, "keep_at_least": 0}))
    samples = [*generate("niah_single_number", tokenizer, haystack, 200, 2, seed=1),
               *generate("niah_multikey", tokenizer, haystack, 260, 1, seed=1)]
    for keep in (None, 1.0):
        batched = answers(model, tokenizer, samples, "query-aware", keep, batch_size=3)
        assert batched == [answers(model, tokenizer, [s], "query-aware", keep, batch_size=1)[0] for s in samples]


def test_eval_retrieval_reports_every_setting_on_the_same_prompts(tiny_with_tokenizer, tmp_path):
    import json

    from helpers import cli, run_convert

    out = run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv", recipe_options={"keep": 0.3})
    result = cli("eval", out, "--task", "retrieval", "--tasks", "niah_single_number,common_words", "--lengths", "200",
                 "--samples", "2", "--baseline", tiny_with_tokenizer)
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "eval_results.json").read_text())["retrieval"]
    assert set(report["scores"]) == {"query-aware", "context-only", "full cache", "baseline"}
    assert set(report["scores"]["baseline"]) == {"niah_single_number", "common_words"}
    assert report["scores"]["full cache"] == report["scores"]["baseline"]  # a full cache is the source model
    assert "Retrieval" in (out / "README.md").read_text()


def test_unknown_retrieval_task_is_one_line(tiny_checkpoint):
    from helpers import assert_clean_failure, cli

    assert_clean_failure(cli("eval", tiny_checkpoint, "--task", "retrieval", "--tasks", "needle_in_space"),
                         "unknown retrieval task 'needle_in_space'")
