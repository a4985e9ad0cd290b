"""Post-training: LoRA adapters, SFT, distillation losses and FSDP2 scale-out (merging is `gemmakit.merge`).

The LoRA API is the part other areas build on (e.g. safety's agile classifiers), so it is re-exported here:

    from gemmakit.train import LoraConfig, apply_lora, lora_parameters, merge_lora, save_adapter, load_adapter
"""

from gemmakit.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

__all__ = [
    "LoraConfig", "LoraLinear", "apply_lora", "load_adapter", "lora_parameters", "lora_state_dict", "merge_lora",
    "remove_lora", "save_adapter", "unmerge_lora",
]
