"""edgeforge's shared library, in layers that import only downward.

:data:`LAYERS` lists them bottom to top. A module may import from its own layer and the
layers before it, never from one after it; ``tests/test_layers.py`` checks every import
(lazy ones inside functions included) and fails naming the file, line and layers.

* ``core``: errors and exit codes, records (atomic writes, manifests), recipes, paths,
  pip assets, a step's measured resources (peak RSS): no torch, no model.
* ``inputs``: corpora and held-out windows, calibration files, vision-language
  preprocessing.
* ``models``: one adapter per architecture, loading, conversions, tiny models, tokenizer
  fidelity, and the static decoder (the torch modules each ONNX piece is exported from,
  with what they support).
* ``quant``: the quantization math (int8/int4, bf16, RTN, GPTQ), the named precision
  schemes (QNN presets, SOPHGO modes, AutoRound's default: one type) and rotations
  (Hadamard, QuaRot-style rotation of an adapter's model).
* ``analysis``: observers and activation profiling, the quantization plan, threshold
  sweeps, fake-quant simulation, evaluation.
* ``export``: ONNX pieces of the static decoder and the host loop that runs them, the vision
  encoder export, ``.mllm`` files, calibration archives.
* ``backends``: one vendor toolchain driver each (QNN: EP sessions, QDQ, the mllm QNN
  config, GPTQ on exported pieces; SOPHGO: tpu-mlir).
* ``steps``: the ``make`` steps shared by targets (model, eval, profile, simulate, sweep)
  and their command lines.

Targets (``targets/<name>/``) sit above all of them and import from any layer, never from
another target.
"""

#: The layers, bottom to top: each imports only from itself and the ones before it.
LAYERS: tuple[str, ...] = (
    "core",
    "inputs",
    "models",
    "quant",
    "analysis",
    "export",
    "backends",
    "steps",
)
