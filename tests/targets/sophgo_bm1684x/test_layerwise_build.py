"""``make sophgo`` reads a text model one part at a time, so it builds under a memory cap
that its whole-model estimate exceeds.

A random qwen2 (hidden 1024, 6 layers of 64 MiB in float32, bf16 on disk like the hub's)
with tiny-qwen2's tokenizer: the whole-model preflight (float32 model, its checkpoint
mapped while loading, and the larger of the simulator's bf16 bmodel and the largest
tpu-mlir compile) stops it at ``CAP``, while the layer-by-layer estimate is under it and
the build completes there: the step and every tool it starts, measured together. At a
test's size the cap cannot go lower: the runtime alone is 0.75 GiB, and one block's
compile (0.4 GiB plus 11x its weights) is most of the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.backends.tpu_mlir import compile_bytes
from common.core.errors import EdgeforgeError
from common.core.memory import parse_size
from common.models.streaming import StreamedModel
from common.steps.phases import Run
from common.steps.preflight import whole_model_preflight
from tests.conftest import (
    QWEN1_CONFIG,
    build_qwen1_checkpoint,
    import_target,
    random_qwen2,
    run_python_peak,
)

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "targets" / "sophgo-bm1684x" / "build.py"
sophgo_build = import_target("sophgo-bm1684x")
CAP = "2.3GB"
#: Any recipe of the model's architecture takes MODEL_PATH; this one is a qwen2.
RECIPE = "qwen1.5-1.8b"


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    return random_qwen2(tmp_path_factory.mktemp("six") / "model", tiny_qwen2_dir, layers=6)


def test_every_model_streams_but_on_llm_convert() -> None:
    assert sophgo_build.layer_by_layer("onnx")  # text, Qwen1's patched copy, VL
    assert not sophgo_build.layer_by_layer("llm_convert")  # the vendor reads a whole copy


def test_estimate_is_the_larger_phase(six_layers: Path) -> None:
    """Six 64 MiB layers: compiling one block (0.4 GiB + 11x) outweighs its export (6x) and
    the simulator's bmodel (half of 0.38 GiB) beside a session of one; the whole-model
    preflight, which holds the float32 model through that compile, stops at the cap."""
    streamed = StreamedModel(six_layers)
    layer = streamed.part_bytes(streamed.adapter.layers()[0].name)
    parts = dict(sophgo_build.memory_estimate(streamed).parts)
    assert parts == {
        "tpu-mlir compiling the largest piece (block)": compile_bytes("block", layer),
        "pickled .bin pages (mapped)": 0,
    }
    assert compile_bytes("block", layer) > 6 * streamed.largest_part_bytes()
    with pytest.raises(EdgeforgeError, match=r"^make sophgo needs about 2\.4\d GiB"):
        whole_model_preflight(
            Run("sophgo", sophgo_build.PHASES),
            six_layers,
            "make sophgo",
            parse_size(CAP),
            sophgo_build.WHOLE_MODEL_COPIES,
            held=sophgo_build.verify_or_compile(streamed, {}),
        )


def test_builds_layer_by_layer_within_the_cap(six_layers: Path, tmp_path: Path) -> None:
    result, tree_peak = run_python_peak(
        str(SCRIPT), "--model", RECIPE, "--model-path", str(six_layers), "--build-dir",
        str(tmp_path), "--seq-len", "64", "--max-new-tokens", "2", "--max-memory", CAP,
        "--verify", "sample",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / RECIPE / "sophgo-bm1684x" / "bf16" / "report.json").read_text())
    resources = report["resources"]
    sampled = report["verify"]["simulated_blocks"]
    estimate = sophgo_build.memory_estimate(StreamedModel(six_layers), sampled).to_json()
    assert resources["estimated_peak_bytes"] == estimate
    # The cap is the contract, for the step and its tools together (the compiles are
    # admitted one at a time here: two blocks' would not fit); the estimate is an estimate.
    assert estimate["total"] <= parse_size(CAP)
    assert tree_peak <= parse_size(CAP), tree_peak
    assert report["passed"] is True
    assert report["greedy_match_tokens"] == report["greedy_total_tokens"] == 2
    # VERIFY=sample: the first, middle and last blocks on the simulator, the rest float in
    # the same chain, unscored and said so
    assert report["verify"]["mode"] == "sample"
    assert report["verify"]["simulated_blocks"] == [0, 2, 5]
    pieces = {p["name"]: p for p in report["pieces"]}
    assert pieces["block_1"]["cos"] is None and pieces["block_cache_3"]["cos"] is None
    assert pieces["block_1"]["inputs"] == "not simulated (VERIFY=sample)"
    assert pieces["block_2"]["cos"] > 0.999 and pieces["block_cache_5"]["cos"] > 0.999
    assert any(note.startswith("VERIFY=sample") for note in report["notes"])
    # the simulator loaded a bmodel of the sampled nets; the package ships every net
    assert report["verify"]["simulated_bmodel"] == "verify.bmodel"
    assert "block_1" not in report["verify"]["simulated_bmodel_nets"]
    assert report["verify"]["simulated_bmodel_bytes"] < report["bmodel_bytes"]


#: Qwen-7B-Chat's config.json fields that fix its tensors' shapes (the rest: the fixture's).
QWEN_7B = {
    "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "kv_channels": 128, "intermediate_size": 22016,
    "seq_length": 8192, "max_position_embeddings": 8192,
}  # fmt: skip


def qwen_7b_shaped(dest: Path, tokenizer_dir: Path) -> Path:
    """A Qwen-7B-shaped checkpoint whose weights are a sparse file: the fixture's remote
    code with Qwen-7B's shapes, and a safetensors header listing every bf16 tensor over
    15 GB of holes. The estimate reads shapes only, so this costs no disk and no time (a
    random 7B checkpoint would take 15 GB and hours to write)."""
    import struct

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    build_qwen1_checkpoint(dest, tokenizer_dir)  # its code and tokenizer; shapes follow
    (dest / "config.json").write_text(json.dumps(QWEN1_CONFIG | QWEN_7B, indent=2))
    config = AutoConfig.from_pretrained(dest, trust_remote_code=True, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    header, offset = {}, 0
    for name, param in model.named_parameters():
        size = 2 * param.numel()
        header[name] = {
            "dtype": "BF16",
            "shape": list(param.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    with (dest / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return dest


def test_qwen_7b_estimate_fits_16_gib(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """``make sophgo MODEL=qwen-7b`` (defaults: SEQ_LEN 256, 32 new tokens, VERIFY=auto,
    which samples at this size) is estimated within 16 GiB; with the whole bmodel in the
    simulator it would not be."""
    qwen1 = import_target("sophgo-bm1684x", "qwen1")
    streamed = StreamedModel(
        qwen_7b_shaped(tmp_path / "qwen-7b", tiny_qwen2_dir), trust_remote_code=True
    )
    adapter = streamed.adapter
    assert adapter.num_layers == 32 and streamed.largest_part_bytes() == 4 * 151936 * 4096
    options = sophgo_build.Options()
    dims = qwen1.qwen1_dims(adapter, options.seq_len)
    policy = sophgo_build.verify_policy_of(options, adapter, dims, options.max_new_tokens)
    assert policy.mode == "sample" and policy.blocks == (0, 16, 31)
    estimate = sophgo_build.memory_estimate(streamed, sophgo_build.sampled_blocks(policy))
    assert estimate.total <= parse_size("16GB"), estimate.describe()
    whole = sophgo_build.memory_estimate(streamed)
    assert whole.total > parse_size("16GB"), whole.describe()
