"""Per-family mappings between Hugging Face checkpoints and Megatron GPT models.

`family_for(config)` picks the family of a config.json (by `architectures`, else `model_type`);
`SUPPORTED_ARCHITECTURES` lists what is mapped.
"""
from typing import Dict

from ..errors import ConversionError
from ._decoder import DecoderFamily, Rules, TensorRule, VocabRows, shapes_of
from .llama import Llama
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: Dict[str, DecoderFamily] = {f.architecture: f for f in (Llama(), Qwen2(), Qwen3())}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
_BY_MODEL_TYPE = {f.preset: f for f in FAMILIES.values()}


def family_for(hf_config: dict) -> DecoderFamily:
    """The family of a config.json; ConversionError listing the supported architectures for any
    other model."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not archs and hf_config.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_config["model_type"]]
    named = ", ".join(archs) or f"model_type {hf_config.get('model_type')!r}"
    raise ConversionError(f"unsupported architecture {named}; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")


__all__ = ["DecoderFamily", "FAMILIES", "Rules", "SUPPORTED_ARCHITECTURES", "TensorRule",
           "VocabRows", "family_for", "shapes_of"]
