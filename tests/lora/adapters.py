"""LoRA adapters for the tests, made with PEFT itself: random factors (not PEFT's zero B), saved into a folder."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def make_adapter(base: Path, folder: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1,
                 targets: tuple[str, ...] = DEFAULT_TARGETS, std: float = 0.5, **config) -> Path:
    """Save a PEFT LoRA adapter for the model folder ``base`` with random weights into ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, **config))
    with torch.no_grad():  # larger than PEFT's random init, so an adapter visibly changes the output
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(folder)
    return folder


def merged_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], max_tokens: int,
                  eos: int | None = None) -> list[int]:
    """The tokens the adapter merged into the base model (PEFT's merge_and_unload) generates greedily in
    float32: what serving the adapter must give token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    # None: no end of sequence at all (the server's ignore_eos), not the model's default.
    model.generation_config.eos_token_id = eos
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokens


def merged_model(base: Path, adapter: Path, folder: Path) -> Path:
    """The base model with the adapter merged into its weights (PEFT's merge_and_unload), saved with the base's
    tokenizer into ``folder``: a model an adapter's answers must equal."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folder)
    for path in base.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, folder / path.name)
    return folder
