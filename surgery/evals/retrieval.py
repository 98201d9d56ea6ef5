"""A synthetic long-context retrieval suite in the style of RULER (Hsieh et al., arXiv 2404.06654), offline.

Every sample is generated from a seed: haystacks of real prose (`stdlib-haystack`, disjoint from the calibration and
perplexity corpora, see corpora.py), needles whose keys and values come from the seeded generator, and the
reference answers. Tasks, after RULER:

- `niah_single_{number,word,uuid}`: one needle, "One of the special magic numbers for KEY is: VALUE.";
- `niah_multikey`: one needle among distractor needles of the same form with other keys;
- `niah_multivalue`: four needles with the same key and different values; all four are asked for;
- `niah_multiquery`: four needles with different keys; all four are asked for at once;
- `variable_tracking`: a chain of assignments (VAR A = 12345, VAR B = VAR A, ...) spread over the haystack;
  every variable that holds the value is asked for;
- `common_words`: a list of words in which ten appear many times and the rest a few; the ten are asked for;
- `frequent_words`: coded words drawn from a Zipf distribution; the three most frequent are asked for.

Each is scored by string-match recall, as RULER does: the share of the reference strings found in the answer.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

WORDS = (  # keys and word values: plain, distinct, single-token-ish English nouns
    "anchor", "apple", "badge", "banner", "barrel", "basket", "beacon", "blanket", "bottle", "bracelet", "bridge",
    "bucket", "button", "cabin", "camera", "candle", "canvas", "carpet", "castle", "cedar", "chapel", "cherry",
    "chimney", "circle", "cliff", "closet", "clover", "cobalt", "compass", "copper", "cotton", "crater", "crystal",
    "curtain", "dagger", "desert", "diamond", "dolphin", "dragon", "drum", "eagle", "ember", "engine", "falcon",
    "feather", "fiddle", "forest", "fountain", "garden", "garnet", "glacier", "goblet", "granite", "guitar",
    "hammer", "harbor", "harvest", "helmet", "hollow", "honey", "island", "ivory", "jacket", "jasmine", "jewel",
    "kettle", "lantern", "lemon", "lighthouse", "marble", "meadow", "mirror", "monkey", "mountain", "needle",
    "oyster", "paddle", "palace", "pepper", "pillow", "planet", "pocket", "pumpkin", "puzzle", "quartz", "rabbit",
    "ribbon", "river", "saddle", "sapphire", "scarf", "shadow", "silver", "spider", "spoon", "squirrel", "summit",
    "sunset", "tablet", "teapot", "thunder", "ticket", "timber", "tower", "trumpet", "tulip", "tunnel", "velvet",
    "violin", "volcano", "wagon", "walnut", "whistle", "willow", "window", "wizard", "zebra",
)
KINDS = {"number": "numbers", "word": "words", "uuid": "UUIDs"}
TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "variable_tracking", "common_words", "frequent_words")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
PROMPT_FORMATS = {
    "ruler": "RULER's template in the chat template's user turn: the task's instruction, the context, the question; "
             "the reply opens with RULER's answer prefix",
    "ruler-plain": "the same text without the chat template",
    "qa": "the context, then 'Question: ...' in the user turn, and the reply opens with 'Answer:'",
}
DEFAULT_FORMAT = "ruler"


@dataclass(frozen=True)
class RetrievalSample:
    """One prompt: `context` (where compression acts), then `question`; `references` are scored by recall."""

    task: str
    length: int
    depth: float
    context: str
    question: str
    references: tuple[str, ...]
    preamble: str = ""  # the task's instruction before the context (RULER's templates), not the query
    answer_prefix: str = ""  # how the reply starts (RULER's answer prefix), which names the query


def preamble_of(task: str) -> str:
    """The instruction RULER puts before the context: what to memorise, never which key will be asked."""
    if task.startswith("niah"):
        kind = KINDS[task.rsplit("_", 1)[-1]] if task.startswith("niah_single") else "numbers"
        return (f"Some special magic {kind} are hidden within the following text. Make sure to memorize them. "
                f"I will quiz you about the {kind} afterwards.")
    if task == "variable_tracking":
        return "Memorize and track the chain of variable assignments hidden in the following text."
    if task == "common_words":
        return ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.")
    return "Read the following coded text and track the frequency of each coded word."


def value_of(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice(WORDS)
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))


def sentences_of(text: str) -> list[str]:
    """The haystack as sentences, so needles go in between them, never inside one."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.strip()) > 1]


class Haystack:
    """Real prose cut to a token budget: consecutive sentences from a seeded start, counted with the tokenizer."""

    def __init__(self, tokenizer, text: str):
        self.sentences = sentences_of(text)
        counts = tokenizer([" " + s for s in self.sentences], add_special_tokens=False)["input_ids"]
        self.tokens = [len(ids) for ids in counts]

    def take(self, budget: int, rng: random.Random) -> list[str]:
        start = rng.randrange(len(self.sentences))
        taken, used = [], 0
        for offset in range(len(self.sentences)):
            index = (start + offset) % len(self.sentences)
            if used + self.tokens[index] > budget:
                break
            taken.append(self.sentences[index])
            used += self.tokens[index]
        return taken


def insert_at_depths(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    """The haystack with each needle placed between sentences at its depth (0: first, 1: last)."""
    placed = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        placed.insert(round(depth * len(sentences)), needle)
    return " ".join(placed)


def needle_task(task: str, rng: random.Random, depth: float) -> tuple[list[str], list[float], str, tuple[str, ...], str]:
    """(needles, their depths, question, references, answer prefix) of a needle-in-a-haystack task."""
    kind = task.rsplit("_", 1)[-1] if task.startswith("niah_single") else "number"
    noun = KINDS[kind]
    keys = rng.sample(WORDS, 4)
    if task.startswith("niah_single"):
        value = value_of(kind, rng)
        one = noun[:-1] if kind != "uuid" else "UUID"
        return [NEEDLE.format(kind=noun, key=keys[0], value=value)], [depth], \
            f"What is the special magic {one} for {keys[0]} mentioned in the provided text?", (value,), \
            f"The special magic {one} for {keys[0]} mentioned in the provided text is"
    if task == "niah_multikey":
        values = [value_of(kind, rng) for _ in keys]
        needles = [NEEDLE.format(kind=noun, key=key, value=value) for key, value in zip(keys, values)]
        spread = [depth] + [rng.random() for _ in keys[1:]]
        return needles, spread, f"What is the special magic number for {keys[0]} mentioned in the provided text?", \
            (values[0],), f"The special magic number for {keys[0]} mentioned in the provided text is"
    if task == "niah_multivalue":
        values = [value_of(kind, rng) for _ in range(4)]
        needles = [NEEDLE.format(kind=noun, key=keys[0], value=value) for value in values]
        spread = [depth] + [rng.random() for _ in values[1:]]
        return needles, spread, f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?", \
            tuple(values), f"The special magic numbers for {keys[0]} mentioned in the provided text are"
    if task == "niah_multiquery":
        values = [value_of(kind, rng) for _ in keys]
        needles = [NEEDLE.format(kind=noun, key=key, value=value) for key, value in zip(keys, values)]
        spread = [depth] + [rng.random() for _ in keys[1:]]
        asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return needles, spread, f"What are the special magic numbers for {asked} mentioned in the provided text?", \
            tuple(values), f"The special magic numbers for {asked} mentioned in the provided text are"
    raise ValueError(f"not a needle task: {task}")


def variable_chain(rng: random.Random, depth: float, hops: int = 4
                   ) -> tuple[list[str], list[float], str, tuple[str, ...], str]:
    names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10_000, 99_999))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    spread = sorted([depth] + [rng.random() for _ in range(hops)])
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = f"According to the chain of variable assignments in the text above, {hops + 1} variables are assigned " \
             f"the value {value}, they are:"
    return needles, spread, question, tuple(names), prefix


def coded_words(rng: random.Random, count: int) -> list[str]:
    """Distinct made-up lower-case words, so that no word's frequency in ordinary text gives it away."""
    words: dict[str, None] = {}
    while len(words) < count:
        words["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7)))] = None
    return list(words)


def numbered(tokenizer, words: list[str]) -> tuple[list[str], list[int]]:
    """Numbered list entries and the tokens each takes."""
    entries = [f"{index + 1}. {word}" for index, word in enumerate(words)]
    return entries, [len(ids) for ids in tokenizer([" " + e for e in entries], add_special_tokens=False)["input_ids"]]


def word_list_task(task: str, tokenizer, length: int, rng: random.Random) -> tuple[str, str, tuple[str, ...], str]:
    """(context, question, references, answer prefix) of common-words or frequent-words extraction, at most `length` tokens.

    Common words, as RULER builds them: ten words repeated c times each among rare words that appear r < c times
    (c = 30, r = 3 in long prompts, fewer in short ones), so the ten are unambiguous. Frequent words: words drawn
    from a Zipf distribution; the three most frequent are asked for (ties broken away by construction)."""
    entries_wanted = max(length // 5, 40)  # a numbered entry is about five tokens
    if task == "common_words":
        repeats = min(30, max(3, entries_wanted // 25))
        rare_repeats = max(1, repeats // 10)
        rare_count = max(1, (entries_wanted - 10 * repeats) // rare_repeats)
        vocabulary = coded_words(rng, 10 + rare_count)
        common, rare = vocabulary[:10], vocabulary[10:]
        question = "What are the 10 most common words in the list above?"
        prefix = "The 10 words that appear most often in the list are:"
        references = tuple(common)
        while True:
            pool = common * repeats + rare * rare_repeats
            rng.shuffle(pool)
            entries, costs = numbered(tokenizer, pool)
            if sum(costs) <= length or not rare:
                break
            rare = rare[: max(0, len(rare) - max(1, len(rare) // 10))]  # too long: fewer rare words
    else:
        vocabulary = coded_words(rng, 60)
        weights = [1 / (rank + 1) ** 1.3 for rank in range(len(vocabulary))]
        pool = rng.choices(vocabulary, weights=weights, k=entries_wanted)
        entries, costs = numbered(tokenizer, pool)
        while sum(costs) > length:
            entries, costs = entries[:-1], costs[:-1]
        kept = [entry.split(". ", 1)[1] for entry in entries]
        counts = {word: kept.count(word) for word in vocabulary}
        ranked = sorted(vocabulary, key=lambda w: -counts[w])
        references = tuple(ranked[:3])
        if counts[ranked[2]] == counts[ranked[3]]:  # a tie at the cut: make the third strictly more frequent
            entries.append(f"{len(entries) + 1}. {ranked[2]}")
        question = "What are the 3 most frequently appearing coded words in the text above?"
        prefix = "According to the coded text above, the three most frequently appearing words are:"
    return " ".join(entries), question, references, prefix


TEMPLATE_TOKENS = 48  # a chat template's turns and the separators between the prompt's parts


def generate(task: str, tokenizer, haystack: Haystack, length: int, count: int, seed: int) -> list[RetrievalSample]:
    """`count` samples of `task` at about `length` prompt tokens, depths spread evenly, deterministic for a seed."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}")
    samples = []
    for index in range(count):
        depth = index / max(count - 1, 1)
        if task in ("common_words", "frequent_words"):
            context, question, references, prefix = word_list_task(task, tokenizer, length - 100, rng)
        else:
            needles, depths, question, references, prefix = (variable_chain(rng, depth) if task == "variable_tracking"
                                                     else needle_task(task, rng, depth))
            around = [preamble_of(task), question, prefix, *needles]  # and TEMPLATE_TOKENS for the chat template
            room = length - TEMPLATE_TOKENS - sum(len(ids) for ids in tokenizer(around, add_special_tokens=False)["input_ids"])
            context = insert_at_depths(haystack.take(room, rng), needles, depths)
        samples.append(RetrievalSample(task, length, depth, context, question, tuple(references), preamble_of(task),
                                       prefix))
    return samples


def string_match_recall(prediction: str, references: tuple[str, ...]) -> float:
    """RULER's string_match_all: the share of references that appear in the prediction, case-insensitively."""
    text = prediction.lower()
    return sum(reference.lower() in text for reference in references) / len(references)

