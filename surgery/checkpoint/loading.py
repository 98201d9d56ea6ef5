"""Load models and tokenizers inside the CLI without running code that surgery did not write.

- A surgery checkpoint loads with this package's own classes (registered with transformers' Auto classes), never
  with the Python files in its folder, which anyone could have edited. Its `surgery_format` must be one this
  package knows.
- A source model loads with its family's transformers class; an `auto_map` in its config is ignored.
- A tokenizer loads from a clean copy of its files with every `auto_map` removed. A tokenizer that exists only as
  remote code is run only with `--trust-remote-code`, and is then re-saved as a standard fast tokenizer.
"""

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from surgery.arch.configuration_surgery import SURGERY_FORMAT, SurgeryConfig
from surgery.arch.modeling_surgery import SurgeryForCausalLM
from surgery.base.errors import SurgeryError, first_line, root_reason
from surgery.checkpoint.families import TOKENIZER_FILES, family_model_class, language_fields, source_config
from surgery.checkpoint.sources import Source, resolve
from surgery.checkpoint.tensor_io import LazyCheckpoint
from surgery import __version__

AutoConfig.register(SurgeryConfig.model_type, SurgeryConfig, exist_ok=True)
AutoModelForCausalLM.register(SurgeryConfig, SurgeryForCausalLM, exist_ok=True)

TOKENIZER_CONFIG = "tokenizer_config.json"
STANDARD_FAST_TOKENIZER = "PreTrainedTokenizerFast"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SurgeryError(f"cannot read {path}: {first_line(error)}", hint="fix or re-download the file") from None


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", TOKENIZER_CONFIG, "tokenizer.model"))


def _names_remote_tokenizer(folder: Path, tokenizer_config: dict) -> bool:
    """Whether the tokenizer points at code outside transformers: an auto_map, or a class transformers lacks."""
    model_config = Path(folder) / "config.json"
    model_auto_map = read_json(model_config).get("auto_map", {}) if model_config.is_file() else {}
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    unknown_class = isinstance(tokenizer_class, str) and not hasattr(transformers, tokenizer_class)
    return "auto_map" in tokenizer_config or "AutoTokenizer" in (model_auto_map or {}) or unknown_class


def write_tokenizer_files(source: Path, target: Path, trust_remote_code: bool = False) -> list[str]:
    """Copy the tokenizer files of `source` into `target` without any `auto_map`, so they never run foreign code.

    A tokenizer whose own class is remote code is replaced by the standard fast tokenizer of its `tokenizer.json`.
    Without a `tokenizer.json` it is loaded with its code only under `trust_remote_code`, and re-saved as a
    standard fast tokenizer.
    """
    source, target = Path(source), Path(target)
    tokenizer_config = read_json(source / TOKENIZER_CONFIG) if (source / TOKENIZER_CONFIG).is_file() else {}
    if not isinstance(tokenizer_config, dict):
        raise SurgeryError(f"{source / TOKENIZER_CONFIG} is not a JSON object", hint="fix or re-download the file")
    remote = _names_remote_tokenizer(source, tokenizer_config)
    if remote and not (source / "tokenizer.json").is_file():
        return _resave_remote_tokenizer(source, target, tokenizer_config, trust_remote_code)
    written = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and name != TOKENIZER_CONFIG:
            (target / name).write_bytes((source / name).read_bytes())
            written.append(name)
    if tokenizer_config:
        clean = clean_tokenizer_config(tokenizer_config, source)
        if remote:
            clean["tokenizer_class"] = STANDARD_FAST_TOKENIZER
        (target / TOKENIZER_CONFIG).write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
        written.append(TOKENIZER_CONFIG)
    return written


LOCAL_KEYS = ("auto_map", "is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir")
UNSET_MAX_LENGTH = 1e12  # transformers writes int(1e30) when a tokenizer was saved without a length


def clean_tokenizer_config(tokenizer_config: dict, source: Path) -> dict:
    """The tokenizer config a checkpoint should carry: no auto_map (never foreign code), no keys describing the
    machine it was saved on, and the model's context length instead of transformers' "unset" 1e30."""
    clean = {k: v for k, v in tokenizer_config.items() if k not in LOCAL_KEYS}
    length = clean.get("model_max_length")
    if isinstance(length, (int, float)) and length > UNSET_MAX_LENGTH:
        config = read_json(source / "config.json") if (source / "config.json").is_file() else {}
        context = language_fields(config).get("max_position_embeddings") if isinstance(config, dict) else None
        if isinstance(context, int):
            clean["model_max_length"] = context
        else:
            clean.pop("model_max_length")
    return clean


def _resave_remote_tokenizer(source: Path, target: Path, tokenizer_config: dict, trust_remote_code: bool) -> list[str]:
    name = tokenizer_config.get("tokenizer_class") or "a custom tokenizer"
    if not trust_remote_code:
        raise SurgeryError(f"the tokenizer of {source} ({name}) exists only as remote code, which surgery does not run",
                           hint="pass --trust-remote-code if you trust it; it is then re-saved as a standard tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    except Exception as error:  # foreign code raises anything
        raise SurgeryError(f"the remote tokenizer of {source} failed to load: {first_line(error)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise SurgeryError(f"the remote tokenizer of {source} ({name}) has no fast (tokenizer.json) form",
                           hint="convert from a model whose tokenizer ships a tokenizer.json")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return write_tokenizer_files(Path(scratch), target)


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The tokenizer of `folder` from a clean copy of its files, or None for a weights-only folder."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    with tempfile.TemporaryDirectory() as clean:
        write_tokenizer_files(folder, Path(clean), trust_remote_code)
        model_config = folder / "config.json"
        config = read_json(model_config) if model_config.is_file() else None
        if isinstance(config, dict) and config.get("model_type") in transformers.CONFIG_MAPPING:
            # lets AutoTokenizer infer the class when tokenizer_config.json names none; no auto_map
            clean_config = {k: v for k, v in config.items() if k != "auto_map"}
            (Path(clean) / "config.json").write_text(json.dumps(clean_config))
        try:
            return AutoTokenizer.from_pretrained(clean)
        except Exception as error:  # transformers raises many types for a broken tokenizer
            raise SurgeryError(f"cannot load the tokenizer of {folder}: {first_line(error)}",
                               hint="fix or re-download the tokenizer files") from None


# Format 2 names every recipe's config keys after the recipe (`attention_gate_*`, `modification_*`, ...). A format-1
# checkpoint keeps loading with stock transformers through the remote code it carries; this package reads it by
# renaming its keys.
FORMAT_1_KEYS = {"kv_gate_heads": "attention_gate_heads", "kv_gate_width": "attention_gate_width",
                 "kv_gate_threshold": "attention_gate_threshold", "mod_layers": "modification_layers",
                 "mod_threshold": "modification_threshold", "kv_key_source": "pod_key_source",
                 "kv_sink_tokens": "pod_sink_tokens", "kv_recent_tokens": "pod_recent_tokens",
                 "kv_distant_skip": "pod_distant_skip", "kv_key_ranks": "matryoshka_key_ranks",
                 "kv_value_ranks": "matryoshka_value_ranks", "moe_null_experts": "adamoe_null_experts"}


def upgraded(raw: dict[str, Any], found: int) -> dict[str, Any]:
    """A config.json of an older format, in the keys of the current one. Before format 3 a gate sat on every
    K/V-owning layer, sliding ones included, which this package no longer builds: such a checkpoint is refused
    rather than run with some of its gates left out."""
    if found == 1:
        raw = {FORMAT_1_KEYS.get(key, key): value for key, value in raw.items()}
    sliding = raw.get("sliding_window") and "sliding_attention" in (raw.get("layer_types") or [])
    if found < 3 and raw.get("attention_gate_heads") and sliding:
        raise SurgeryError("this checkpoint (surgery format {}) gates sliding-window layers, which surgery now leaves "
                           "ungated".format(found), hint="load it with its own code (trust_remote_code=True in "
                                                          "transformers) or convert the source again")
    return {**raw, "surgery_format": SURGERY_FORMAT}


def read_checkpoint_config(folder: Path) -> SurgeryConfig:
    """The config of a surgery checkpoint, refused when its format is newer than this package or its plan is invalid;
    an older format is read in the current keys."""

    raw = read_json(Path(folder) / "config.json")
    found = raw.get("surgery_format", 1) if isinstance(raw, dict) else None
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise SurgeryError(f"{folder}/config.json has an invalid surgery_format {found!r}",
                           hint="re-export the checkpoint with `surgery convert`")
    if found > SURGERY_FORMAT:
        raise SurgeryError(f"{folder} is surgery format {found}; surgery {__version__} reads formats up to {SURGERY_FORMAT}",
                           hint="upgrade surgery: pip install -U surgery")
    try:
        if found == SURGERY_FORMAT:
            return SurgeryConfig.from_pretrained(folder)
        return SurgeryConfig.from_dict(upgraded(raw, found))
    except Exception as error:  # validation of the plan and of field types raises several types
        raise SurgeryError(f"{folder}/config.json is not a valid surgery config: {root_reason(error)}",
                           hint="re-export the checkpoint with `surgery convert`") from None


def offload_options(max_memory: int | None) -> dict:
    """from_pretrained options that keep at most `max_memory` bytes of weights resident; accelerate offloads the
    rest to a temporary folder and streams it in, layer by layer, during each forward."""
    if not max_memory:
        return {}
    folder = tempfile.mkdtemp(prefix="surgery-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"device_map": "auto", "max_memory": {"cpu": max_memory}, "offload_folder": folder}


def _from_pretrained(model_class, folder: Path, config, max_memory: int | None = None) -> torch.nn.Module:
    LazyCheckpoint(folder)  # a missing, truncated or corrupt shard is one clear line
    try:
        model, info = model_class.from_pretrained(folder, config=config, dtype=torch.float32, output_loading_info=True,
                                                  **offload_options(max_memory))
    except Exception as error:  # missing weights, bad shapes, I/O: each becomes one line
        raise SurgeryError(f"cannot load the weights of {folder}: {first_line(error)}",
                           hint="re-export or re-download the model") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SurgeryError(f"{folder} lacks {len(missing)} weights the model needs, e.g. {missing[0]}",
                           hint="re-export or re-download the model")
    return model.eval()


def load_source_model(source: Source, max_memory: int | None = None) -> torch.nn.Module:
    """A resolved model in float32: surgery checkpoints with our classes, sources with their family's class.
    `max_memory` (bytes) bounds the resident weights; the rest is offloaded to disk."""
    if source.model_type == SurgeryConfig.model_type:
        return _from_pretrained(SurgeryForCausalLM, source.folder, read_checkpoint_config(source.folder), max_memory)
    config = source_config(source.config)
    return _from_pretrained(family_model_class(config.model_type), source.folder, config, max_memory)


def load_model(spec: str, allow_pickle: bool = False, trust_remote_code: bool = False, max_memory: int | None = None):
    """A checkpoint folder or any MODEL that `surgery convert` accepts, in float32, and its tokenizer (or None)."""
    source = resolve(spec, allow_pickle=allow_pickle)
    return load_source_model(source, max_memory), load_tokenizer(source.folder, trust_remote_code)


def check_same_vocabulary(model: Source, other: Source, role: str) -> None:
    """Refuse to compare or distil across vocabularies: token ids would mean different things."""
    sizes = language_fields(model.config).get("vocab_size"), language_fields(other.config).get("vocab_size")
    if sizes[0] != sizes[1]:
        raise SurgeryError(f"the {role} {other.name} has a vocabulary of {sizes[1]} tokens, the model {sizes[0]}",
                           hint=f"pass a {role} with the same tokenizer")
    if has_tokenizer(model.folder) and has_tokenizer(other.folder):
        mine, theirs = load_tokenizer(model.folder), load_tokenizer(other.folder)
        if mine.get_vocab() != theirs.get_vocab():
            raise SurgeryError(f"the {role} {other.name} uses a different tokenizer than the model",
                               hint=f"pass a {role} with the same tokenizer")
