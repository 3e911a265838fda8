"""Reload an AutoRound export offline on CPU and measure it against the float model.

The loader is auto-round's own (transformers' ``AutoRoundConfig`` integration, CPU kernels
from ``auto-round-lib``), the way a user would load the files; a GGUF file is read back by
transformers' GGUF reader, which dequantizes every tensor through the ``gguf`` package.
The main failure mode of these exports is silent: a loader that converts nothing (random
weights), converts layers that were never quantized, or falls back to a fake kernel still
"loads". So before any number is trusted, the set of quantized modules (GGUF: tensors stored
in a quantized type) must equal the set that was planned, and no checkpoint tensor may be
missing or left over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.core.errors import EdgeforgeError

#: Leftover tensors a GPTQ checkpoint may carry: with ``desc_act`` off, ``g_idx`` is the
#: identity grouping and the kernels rebuild it.
_IGNORABLE_UNEXPECTED = (".g_idx",)


def load_export(export_dir: Path, is_vision_language: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Load one exported directory with auto-round's loader on CPU, fp32 activations."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoRoundConfig

    auto = AutoModelForImageTextToText if is_vision_language else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(
            export_dir,
            dtype=torch.float32,
            device_map="cpu",
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            quantization_config=AutoRoundConfig(backend="auto"),
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise EdgeforgeError(f"{export_dir}: auto-round's loader failed: {exc}") from None
    model.eval()
    return model, info


def gguf_file(export_dir: Path) -> Path:
    """The one ``.gguf`` file auto-round wrote into ``export_dir``."""
    files = sorted(export_dir.glob("*.gguf"))
    if len(files) != 1:
        raise EdgeforgeError(f"{export_dir}: expected one .gguf file, found {len(files)}")
    return files[0]


def load_gguf(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a GGUF file the way a transformers user would: dequantized to fp32, on CPU."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            device_map="cpu",
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise EdgeforgeError(f"{path}: transformers' GGUF reader failed: {exc}") from None
    model.eval()
    return model, info


def gguf_tensor_types(path: Path, planned: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """(``{planned layer: GGUF type}``, ``{type: tensor count}``) read from the file itself.

    Layer names map to GGUF tensor names with gguf-py's own table for the file's
    architecture (``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q``).
    """
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(path)
    arch_name = reader.fields["general.architecture"].contents()
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    names = gguf.get_tensor_name_map(arch, blocks)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    per_layer = {}
    for layer in planned:
        mapped = names.get_name(layer)
        per_layer[layer] = types.get(f"{mapped}.weight", "absent") if mapped else "unmapped"
    return per_layer, dict(sorted(Counter(types.values()).items()))


#: GGUF tensor types that are not quantized (a planned layer stored so was not quantized).
FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")
#: What :func:`gguf_tensor_types` reports for a planned layer the file does not hold.
MISSING_GGUF_TYPES = ("absent", "unmapped")


def is_quantized_gguf_type(tensor_type: str) -> bool:
    """Whether a planned layer's entry names a quantized GGUF type (Q4_0, Q4_K, Q5_0, ...)."""
    return tensor_type not in FLOAT_GGUF_TYPES + MISSING_GGUF_TYPES


def gguf_problems(info: dict[str, Any], per_layer: dict[str, str]) -> list[str]:
    """Why the reloaded GGUF is not the planned quantized model (empty when it is)."""
    problems = [
        f"{len(info.get(key) or ())} tensor(s) {what}, e.g. {sorted(map(str, info[key]))[0]}"
        for key, what in (("missing_keys", "missing from the file"),
                          ("unexpected_keys", "in the file left unused"))
        if info.get(key)
    ]  # fmt: skip
    floats = sorted(n for n, t in per_layer.items() if t in FLOAT_GGUF_TYPES)
    absent = sorted(n for n, t in per_layer.items() if t in MISSING_GGUF_TYPES)
    if absent:
        problems.append(f"{len(absent)} planned layer(s) not in the file, e.g. {absent[0]}")
    if floats:
        problems.append(f"{len(floats)} planned layer(s) stored unquantized, e.g. {floats[0]}")
    return problems


def tokenizer_check(
    source_dir: Path, candidate_dir: Path, candidate_name: str, gguf: Path | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """(check record, problems) of an export's tokenizer against the source's.

    A checkpoint folder is loaded with ``AutoTokenizer`` as its users load it; a GGUF file
    through transformers' GGUF reader (``gguf_file=``), which reads the tokenizer stored
    in the file.
    """
    from common.core.errors import CheckFailed
    from common.models.tokenizer_fidelity import (
        check_tokenizer_dir,
        compare_tokenizers,
        fidelity_texts,
        load_as_user,
        load_gguf_tokenizer,
    )

    try:
        if gguf is None:
            check = check_tokenizer_dir(source_dir, candidate_dir, candidate_name=candidate_name)
        else:
            reference, stored = load_as_user(source_dir), load_gguf_tokenizer(gguf)
            check = compare_tokenizers(
                reference, stored, fidelity_texts(), str(source_dir), candidate_name
            )
    except CheckFailed as exc:
        return None, [str(exc)]
    return check.record(), []


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: class name}`` of every module holding packed weights (``qweight``)."""
    return {name: type(m).__name__ for name, m in model.named_modules() if hasattr(m, "qweight")}


def structure_problems(
    model: nn.Module, info: dict[str, Any], planned: list[str], quant_config: dict[str, Any]
) -> list[str]:
    """Why the reloaded model is not the planned quantized model (empty when it is)."""
    problems = []
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}")
    unexpected = sorted(
        str(k)
        for k in info.get("unexpected_keys") or ()
        if not (str(k).endswith(_IGNORABLE_UNEXPECTED) and not quant_config.get("desc_act"))
    )
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) left unused, e.g. {unexpected[0]}")
    got = quantized_modules(model)
    extra, absent = sorted(set(got) - set(planned)), sorted(set(planned) - set(got))
    if absent:
        problems.append(f"{len(absent)} planned layer(s) not quantized, e.g. {absent[0]}")
    if extra:
        problems.append(f"{len(extra)} layer(s) quantized that should not be, e.g. {extra[0]}")
    fake = sorted({cls for cls in got.values() if "fake" in cls.lower()})
    if fake:
        problems.append(f"loader fell back to fake-quant layers {fake}")
    return problems


@contextmanager
def outputs_caught(
    modules: dict[str, nn.Module], when: Callable[[], bool] = lambda: True
) -> Iterator[dict[str, torch.Tensor]]:
    """Each named module's output hidden states (float64 ``[tokens, hidden]``), caught by
    forward hooks while ``when()`` holds (hooks on a streamed model's meta modules survive
    each part's load and release)."""
    caught: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if when():
                hidden = output[0] if isinstance(output, tuple | list) else output
                caught[name] = hidden.detach().double().reshape(-1, hidden.shape[-1])

        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()


def layer_cosines(
    model: nn.Module, reference: nn.Module, names: list[str], window: torch.Tensor
) -> dict[str, float]:
    """Mean per-token cosine of each named block's output hidden states, model vs reference.

    Both models see the same window; the blocks' outputs are caught with forward hooks, so
    the number per layer is the accumulated error up to and including that layer.
    """

    def capture(net: nn.Module) -> dict[str, torch.Tensor]:
        with (
            outputs_caught({name: net.get_submodule(name) for name in names}) as caught,
            torch.inference_mode(),
        ):
            net(input_ids=window[None], use_cache=False)
        return caught

    got, want = capture(model), capture(reference)
    return {
        name: F.cosine_similarity(got[name], want[name], dim=-1).mean().item() for name in names
    }


def image_inputs(processor: Any, image_path: Path, prompt: str) -> dict[str, torch.Tensor]:
    """Processor inputs for one user turn holding ``image_path`` and ``prompt``."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with Image.open(image_path) as image:
        rgb = image.convert("RGB")
    return dict(processor(text=[text], images=[rgb], return_tensors="pt"))


def image_prompt_check(
    model: nn.Module,
    reference: nn.Module,
    processor: Any,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Logits agreement on an image prompt and both models' greedy answers to it."""
    with torch.inference_mode():
        got = model(**inputs, use_cache=False).logits[0].double()
        want = reference(**inputs, use_cache=False).logits[0].double()
    answers = [_greedy(net, processor, inputs, max_new_tokens) for net in (model, reference)]
    return {
        "cosine_mean": F.cosine_similarity(got, want, dim=-1).mean().item(),
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).double().mean().item(),
        "answer": answers[0],
        "answer_fp": answers[1],
        "same_answer": answers[0] == answers[1],
    }


def _greedy(
    model: nn.Module, processor: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int
) -> str:
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    prompt_len = inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
