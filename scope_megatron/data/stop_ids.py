"""The token ids that end a response of a Hugging Face model (rollouts, evaluation and grading).

A model stops on more than its tokenizer's eos_token_id: generation_config.json and config.json
of its directory may name others (an int or a list: Qwen2.5-Instruct / Qwen3 [151645, 151643],
Llama-3-Instruct [128001, 128008, 128009]), and SGLang and transformers stop on all of them. A
response ending on any of them is finished; so every one must be a stop id (the SGLang engine
refuses a response stopped on an id outside its stop ids).

Only local directories are read (plain JSON, no network): a tokenizer named by a hub id, or
loaded from memory, contributes its own eos only; an explicit model_dir must be a directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple, Union

# the files of a Hugging Face model directory whose eos_token_id is read, in this order
EOS_FILES = ("generation_config.json", "config.json")


def _as_ids(value, where: str) -> List[int]:
    """eos_token_id as found (None, an int or a list of ints) -> a list of ints."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: eos_token_id must be an integer or a list of integers, "
                             f"got {value!r}")
    return [int(v) for v in values]


def file_eos_ids(path: Union[str, Path]) -> List[int]:
    """The eos_token_id of one JSON file (a missing file, or one without the key: [])."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read its eos_token_id: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _as_ids(data.get("eos_token_id"), str(path))


def stop_token_ids(tokenizer, model_dir: Optional[Union[str, Path]] = None) -> Tuple[int, ...]:
    """The stop ids of a Hugging Face tokenizer's model: the tokenizer's eos_token_id, then those
    of `model_dir`'s generation_config.json and config.json, in that order, each id once. The
    first is the one callers use as the pad id when the tokenizer has none.

    model_dir: the model's Hugging Face directory, or None for the tokenizer's name_or_path (the
    directory from_pretrained loaded it from; when that is not a local directory, e.g. a hub name,
    the tokenizer's eos only). Raises ValueError when an explicit model_dir is not a local
    directory (its stop ids would be silently missing), when there is no stop id at all, or when a
    file names an id outside the tokenizer's vocabulary (naming the file)."""
    ids = _as_ids(getattr(tokenizer, "eos_token_id", None), "the tokenizer")
    if model_dir is None:
        model_dir = getattr(tokenizer, "name_or_path", None) or None
    elif not Path(model_dir).is_dir():
        raise ValueError(f"model directory {model_dir} is not a local directory: its generation_config.json / "
                         "config.json stop ids cannot be read. Download the model to a directory and name that "
                         "(e.g. `huggingface-cli download NAME --local-dir DIR`)")
    local = model_dir is not None and Path(model_dir).is_dir()
    if local:
        size = len(tokenizer)
        for name in EOS_FILES:
            path = Path(model_dir) / name
            found = file_eos_ids(path)
            outside = [i for i in found if not 0 <= i < size]
            if outside:
                raise ValueError(f"{path}: eos_token_id {outside} is outside the tokenizer's vocabulary "
                                 f"[0, {size}): is this the tokenizer of that model?")
            ids += found
    ids = list(dict.fromkeys(ids))
    if not ids:
        where = f" (nor do {' / '.join(EOS_FILES)} in {model_dir})" if local else ""
        raise ValueError(f"the tokenizer has no eos_token_id{where}: responses could never end")
    return tuple(ids)
