"""Calibration and evaluation text: files, dataset folders, Hub datasets, or offline defaults that download nothing.

Offline defaults (`corpora.py`: three disjoint corpora that ship with CPython):
- calibration and adapt's training text: `stdlib-docstrings`, real prose;
- held-out evaluation: `python-reference`, which calibration never sees;
- `self-generated`, on request: text the source model samples itself from its BOS token (seeded). It reads like
  chat filler on an instruction-tuned model, and costs the recipes that fit statistics (README, Calibration).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.calibrate.corpora import DEFAULT_CALIBRATION, HELDOUT, NAMES, SELF_GENERATED, corpus_text
from surgery.base.errors import SurgeryError, first_line

log = logging.getLogger(__name__)

GPTQ_DATASETS = ("wikitext2", "c4", "c4-new")
TEXT_FIELDS = ("text", "content", "document")


@dataclass(frozen=True)
class CalibrationSettings:
    """What calibration ran on; recorded in recipe.yaml so the conversion can be reproduced."""

    source: str
    num_samples: int
    seq_len: int
    seed: int

    @property
    def description(self) -> str:
        if self.source == SELF_GENERATED:
            return "self-generated (the source model samples from BOS)"
        if self.source in NAMES:
            return f"{self.source} (offline, ships with Python)"
        return self.source


def heldout_text() -> str:
    """Real English prose available offline on every Python install, disjoint from the calibration default."""
    return corpus_text(HELDOUT)


def read_text(source: str, split: str = "train") -> str:
    """All the text of a named offline corpus, a .txt/.jsonl/.parquet file, a local dataset folder, or a Hub
    dataset name."""
    if source in NAMES:
        return corpus_text(source)
    check_text_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_folder(path)
    return _read_hub_dataset(source, split)


def check_text_source(source: str) -> None:
    """Fail at once, before any model loads, when a text source that names a local path does not exist."""
    if source in NAMES or source == SELF_GENERATED or source in GPTQ_DATASETS:
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    if source.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".parquet", ".json"):
        raise SurgeryError(f"no such calibration file or folder: {source}", hint="check the --calib path")


DATA_EXTRA_HINT = "pip install 'surgery[data]'"


def _missing_extra(package: str, what: str) -> SurgeryError:
    return SurgeryError(f"{what} needs the {package} package, which is not installed", hint=DATA_EXTRA_HINT)


def _read_file(path: Path) -> str:
    try:
        return _read_file_unchecked(path)
    except UnicodeDecodeError as error:
        raise SurgeryError(f"{path} is not UTF-8 text (byte {error.start})", hint="pass a UTF-8 text file") from None


def _read_file_unchecked(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace")
    if suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SurgeryError(f"{path}:{number} is not valid JSON", hint="one JSON object per line") from None
            texts.append(_text_of(record, path))
        return "\n\n".join(texts)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise _missing_extra("pyarrow", f"reading {path.name}") from None

        table = pq.read_table(path)
        column = next((name for name in TEXT_FIELDS if name in table.column_names), None)
        if column is None:
            raise SurgeryError(f"{path} has no text column", hint=f"name one of {', '.join(TEXT_FIELDS)}")
        return "\n\n".join(str(value) for value in table.column(column).to_pylist())
    raise SurgeryError(f"unsupported calibration file {path.name}", hint="use .txt, .jsonl or .parquet")


def _text_of(record, path: Path) -> str:
    if isinstance(record, str):
        return record
    for name in TEXT_FIELDS:
        if isinstance(record, dict) and isinstance(record.get(name), str):
            return record[name]
    raise SurgeryError(f"{path} has a record without a text field", hint=f"give each record one of {', '.join(TEXT_FIELDS)}")


def _read_folder(folder: Path) -> str:
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise _missing_extra("datasets", f"reading the dataset folder {folder}") from None

        dataset = load_from_disk(str(folder))
        if hasattr(dataset, "keys"):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        column = next((name for name in TEXT_FIELDS if name in dataset.column_names), None)
        if column is None:
            raise SurgeryError(f"dataset {folder} has no text column", hint=f"name one of {', '.join(TEXT_FIELDS)}")
        return "\n\n".join(dataset[column])
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".txt", ".jsonl", ".parquet"))
    if not files:
        raise SurgeryError(f"{folder} holds no .txt, .jsonl or .parquet files", hint="point --calib at text data")
    return "\n\n".join(_read_file(path) for path in files)


def _read_hub_dataset(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise _missing_extra("datasets", f"the Hub dataset {name!r}") from None
    try:
        dataset = load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types for an unreachable or unknown dataset
        reason = first_line(error)
        raise SurgeryError(f"cannot load dataset {name!r}: {reason}", hint="check the name and connection, or pass a local file") from None
    column = next((c for c in TEXT_FIELDS if c in dataset.column_names), None)
    if column is None:
        raise SurgeryError(f"dataset {name} has no text column", hint=f"name one of {', '.join(TEXT_FIELDS)}")
    return "\n\n".join(dataset[column])


def windows(token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets into one long token stream."""
    available = token_ids.numel() - seq_len
    if available < 0:
        raise SurgeryError(
            f"calibration text has {token_ids.numel()} tokens, fewer than --seq-len {seq_len}", hint="give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available + 1, (num_samples,), generator=generator)
    return torch.stack([token_ids[start : start + seq_len] for start in starts.tolist()])


@torch.no_grad()
def self_generated(model, tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample calibration sequences from the model itself, starting at BOS: offline and deterministic per seed."""
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = model.config.bos_token_id if bos is None else bos
    start = torch.full((num_samples, 1), bos, dtype=torch.long)
    torch.manual_seed(seed)
    out = model.generate(
        start,
        attention_mask=torch.ones_like(start),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=seq_len - 1,
        min_new_tokens=seq_len - 1,
        pad_token_id=bos,
        eos_token_id=None,
    )
    return out[:, :seq_len]


def calibration_ids(settings: CalibrationSettings, tokenizer, model) -> torch.Tensor:
    """Token windows for calibration, per the settings. Deterministic for a given seed."""
    if settings.num_samples <= 0 or settings.seq_len <= 1:
        raise SurgeryError("--num-samples must be positive and --seq-len at least 2")
    if settings.source == SELF_GENERATED:
        if model is None:
            raise SurgeryError("self-generated calibration text needs the source model loaded", hint=f"pass --calib {DEFAULT_CALIBRATION}")
        return self_generated(model, tokenizer, settings.num_samples, settings.seq_len, settings.seed)
    if tokenizer is None:
        raise SurgeryError("the source folder has no tokenizer to read calibration text", hint="add its tokenizer files")
    if settings.source in GPTQ_DATASETS:
        try:
            import datasets  # noqa: F401  optimum's helpers need it
            from optimum.gptq.data import get_dataset
        except ImportError:
            raise _missing_extra("datasets", f"--calib {settings.source}") from None

        try:
            samples = get_dataset(settings.source, tokenizer, settings.num_samples, settings.seq_len, settings.seed)
        except Exception as error:  # network or datasets failures surface as many types
            raise SurgeryError(f"cannot load dataset {settings.source!r}: {error}", hint="check the connection or pass a file") from None
        return torch.cat([sample["input_ids"] for sample in samples])
    text = read_text(settings.source)
    token_ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    return windows(token_ids, settings.num_samples, settings.seq_len, settings.seed)
