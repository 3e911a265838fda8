"""GPTQ rounding (common/quant/gptq.py, common/backends/sequential_gptq.py) against
round-to-nearest: same grid, smaller output error on correlated inputs, exact RTN when
inputs are white; and bit for bit against a plain reference (the paper's loop in torch, one
Hessian per linear over whole forward passes), which the fast paths must match."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from common.backends.sequential_gptq import _round_and_run, sequential_gptq
from common.core.errors import EdgeforgeError
from common.export import piece_export as pe
from common.models import ModelAdapter, get_adapter, iter_linears
from common.models.loading import load_model
from common.models.static_decoder import BlockPiece, piece_dims, rotary_table
from common.quant import gptq
from common.quant.gptq import BLOCK, DAMP, HessianObserver, gptq_levels
from common.quant.int8 import (
    column_scales,
    dequantize,
    dequantize_weight,
    qmax,
    quantize,
    quantize_weight,
    weight_scale,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(rows: int, columns: int, seed: int, rows_seed: int) -> torch.Tensor:
    """Inputs with a few dominant, mixed directions (as LLM activations have): the
    directions come from ``seed``, the rows drawn along them from ``rows_seed``."""
    basis = torch.randn(columns, columns, generator=_gen(seed))
    energy = torch.logspace(1, -2, columns)
    return torch.randn(rows, columns, generator=_gen(rows_seed)) * energy @ basis


def _hessian(x: torch.Tensor) -> torch.Tensor:
    observer = HessianObserver(x.shape[-1])
    for part in x.split(100):
        observer.observe(part)
    return observer.hessian()


def _reference_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 8,
    block: int = BLOCK,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_levels` as plain torch: the column loop tensor op by tensor op."""
    w = weight.detach().float().clone()
    columns = w.shape[1]
    scale = weight_scale(weight, "group" if group_size else "per_channel", bits, group_size)
    steps = column_scales(scale, columns)
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    order = torch.argsort(diag, descending=True, stable=True)
    w, h, steps = w[:, order], h[order][:, order], steps[:, order]
    h += torch.eye(columns, dtype=torch.float64) * (DAMP * torch.diagonal(h).mean())
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    h_inv = h_inv.float()
    lo, hi = -qmax(bits) - 1, qmax(bits)
    levels = torch.zeros_like(w)
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        chunk = w[:, start:stop].clone()
        errors = torch.zeros_like(chunk)
        inv = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            step = steps[:, start + i : start + i + 1]
            q = torch.round(chunk[:, i : i + 1] / step).clamp_(lo, hi)
            levels[:, start + i] = q[:, 0]
            error = (chunk[:, i] - (q * step)[:, 0]) / inv[i, i]
            chunk[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return levels[:, torch.argsort(order)].to(torch.int8), scale


def _reference_sequential(
    adapter: ModelAdapter, windows: torch.Tensor, bits: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sequential_gptq` written plainly: an observer per linear, whole forward
    passes, :func:`_reference_levels`."""
    seq_len = windows.shape[1]
    fixed = pe.prefill_inputs(windows[0].tolist(), seq_len)
    positions = torch.from_numpy(fixed["position_ids"]).long()
    mask = torch.from_numpy(fixed["attention_mask"])
    dims, (cos, sin) = piece_dims(adapter, seq_len), rotary_table(adapter, seq_len)
    stages = []
    for layer in adapter.layers():
        block = BlockPiece(layer, dims, cos, sin)
        stages.append(
            (
                {layer.linear_names[r]: m for r, m in layer.linears.items()},
                lambda h, b=block: b(h, positions, mask)[0],
            )
        )
    norm, head = adapter.final_norm(), adapter.lm_head()
    stages.append(({adapter.lm_head_path: head}, lambda h: head(norm(h))))
    levels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        hidden = [adapter.embed_tokens()(w[None].long()) for w in windows]
        for linears, run in stages:
            observers = {n: HessianObserver(m.in_features) for n, m in linears.items()}
            hooks = [
                m.register_forward_pre_hook(lambda _m, args, o=observers[n]: o.observe(args[0]))
                for n, m in linears.items()
            ]
            for h in hidden:
                run(h)
            for hook in hooks:
                hook.remove()
            originals = {}
            for name, linear in linears.items():
                levels[name] = _reference_levels(linear.weight, observers[name].hessian(), bits)
                originals[name] = linear.weight.data
                linear.weight.data = dequantize(*levels[name])
            hidden = [run(h) for h in hidden]
            for name, linear in linears.items():
                linear.weight.data = originals[name]
    return levels


@pytest.mark.parametrize(
    ("out", "columns", "bits", "block", "dead"),
    [
        (48, 64, 8, BLOCK, ()),
        (40, 300, 8, BLOCK, (5, 77, 299)),  # blocks of 128, 128, 44; inputs that never fire
        (33, 100, 4, 16, ()),
        (64, 257, 4, BLOCK, (0,)),
    ],
)
def test_levels_equal_the_reference_loop(
    out: int, columns: int, bits: int, block: int, dead: tuple[int, ...]
) -> None:
    """The kernel rounds exactly as the tensor loop: the same levels bit for bit, and the
    Hessian (shared by linears that read one input) is left as it was."""
    x = _correlated_inputs(1500, columns, seed=6, rows_seed=13)
    x[:, list(dead)] = 0.0
    hessian = _hessian(x)
    kept = hessian.clone()
    w = torch.randn(out, columns, generator=_gen(7))
    levels, scale = gptq_levels(w, hessian, bits, block=block)
    want, want_scale = _reference_levels(w, hessian, bits, block)
    assert torch.equal(scale, want_scale)
    assert torch.equal(levels, want), int((levels != want).sum())
    assert torch.equal(hessian, kept)


@pytest.mark.parametrize(
    ("columns", "group_size", "bits"), [(256, 64, 4), (300, 20, 4), (96, 32, 8)]
)
def test_grouped_levels_equal_the_reference_loop(columns: int, group_size: int, bits: int) -> None:
    """One step per group of input columns (QNN's block-quantized int4), fixed up front:
    the kernel visits the columns in act order, each on its own group's step, bit for bit
    as the tensor loop; a group as wide as the row is the per-channel grid."""
    hessian = _hessian(_correlated_inputs(1500, columns, seed=6, rows_seed=13))
    w = torch.randn(40, columns, generator=_gen(7))
    w[:, :group_size] *= 6.0  # a loud first group: its rows' steps differ from the rest
    levels, scale = gptq_levels(w, hessian, bits, group_size=group_size)
    want, want_scale = _reference_levels(w, hessian, bits, group_size=group_size)
    assert scale.shape == (40, columns // group_size)
    assert torch.equal(scale, want_scale)
    assert torch.equal(levels, want), int((levels != want).sum())
    whole = gptq_levels(w, hessian, bits, group_size=columns)
    per_channel = gptq_levels(w, hessian, bits)
    assert torch.equal(whole[0], per_channel[0]) and torch.equal(whole[1], per_channel[1])


def test_groups_lower_the_int4_output_error() -> None:
    """At 4 bits a step per 32 columns follows a row's quiet stretches: GPTQ on groups
    leaves less output error than on one step a row, and less than groups rounded to
    nearest (white inputs: exactly those)."""
    x = _correlated_inputs(2000, 128, seed=1, rows_seed=10)
    w = torch.randn(64, 128, generator=_gen(2))
    w[:, :32] *= 4.0
    held_out = _correlated_inputs(250, 128, seed=1, rows_seed=11)

    def error(levels: torch.Tensor, scale: torch.Tensor) -> float:
        return float(((held_out @ (w - dequantize_weight(levels, scale)).T) ** 2).mean())

    grouped = gptq_levels(w, _hessian(x), 4, group_size=32)
    rtn = quantize_weight(w, "group", 4, 32)
    assert error(*grouped) < 0.5 * error(*gptq_levels(w, _hessian(x), 4))
    assert error(*grouped) < 0.25 * error(*rtn)
    white = gptq_levels(w, torch.eye(128) * 3.0, 4, group_size=32)
    assert torch.equal(white[0], rtn[0]) and torch.equal(white[1], rtn[1])


@pytest.mark.parametrize("rows", [1, 64, 100, 150])
def test_slices_of_rows_round_as_the_whole(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix over :data:`gptq.ROW_SLICE_BYTES` (an LM head) is rounded a slice of rows
    at a time, with the same levels bit for bit as the whole matrix at once; a slice
    smaller than :data:`gptq.MIN_SLICE_ROWS` (1 row here) is made that large."""
    columns = 300
    hessian = _hessian(_correlated_inputs(1500, columns, seed=6, rows_seed=13))
    w = torch.randn(200, columns, generator=_gen(9))
    whole = gptq_levels(w, hessian, 8)
    monkeypatch.setattr(gptq, "ROW_SLICE_BYTES", rows * 4 * columns)
    sliced = gptq_levels(w, hessian, 8)
    assert torch.equal(sliced[0], whole[0]), int((sliced[0] != whole[0]).sum())
    assert torch.equal(sliced[1], whole[1])


def test_white_inputs_give_round_to_nearest() -> None:
    """With H ∝ I no column's error has anywhere useful to go: GPTQ is RTN exactly."""
    w = torch.randn(48, 64, generator=_gen(0))
    levels, scale = gptq_levels(w, torch.eye(64) * 3.0)
    want, want_scale = quantize_weight(w, "per_channel")
    assert torch.equal(scale, want_scale)
    assert torch.equal(levels, want)


@pytest.mark.parametrize("bits", [8, 4])
def test_output_error_below_round_to_nearest(bits: int) -> None:
    x = _correlated_inputs(2000, 96, seed=1, rows_seed=10)
    w = torch.randn(64, 96, generator=_gen(2))
    levels, scale = gptq_levels(w, _hessian(x), bits)
    assert levels.dtype == torch.int8
    assert int(levels.max()) <= 2 ** (bits - 1) - 1 and int(levels.min()) >= -(2 ** (bits - 1))
    assert torch.equal(scale, weight_scale(w, "per_channel", bits))  # the grid is unchanged
    rtn = quantize(w, scale, bits)
    held_out = _correlated_inputs(250, 96, seed=1, rows_seed=11)  # same directions, new rows

    def error(q: torch.Tensor) -> float:
        return float(((held_out @ (w - dequantize(q, scale)).T) ** 2).mean())

    # Measured: 0.09x of RTN's output error at 8 bits, 0.08x at 4.
    assert error(levels) < 0.25 * error(rtn)


def test_dead_inputs_and_bad_shapes() -> None:
    x = _correlated_inputs(500, 32, seed=3, rows_seed=12)
    x[:, 5] = 0.0  # an input that never fires
    w = torch.randn(16, 32, generator=_gen(4))
    levels, _ = gptq_levels(w, _hessian(x))
    assert levels.shape == (16, 32)
    with pytest.raises(EdgeforgeError, match="does not match the weight's 32 input columns"):
        gptq_levels(w, torch.eye(31))
    with pytest.raises(EdgeforgeError, match="no calibration rows"):
        HessianObserver(8).hessian()


@pytest.mark.parametrize("bits", [8, 4])
def test_sequential_gptq_equals_the_reference(tiny_qwen2_dir: Path, bits: int) -> None:
    """Shared Hessians (q/k/v, gate/up), passes stopped at the last linear's input and the
    kernel give the plain computation's levels bit for bit: a linear given another's
    Hessian, or a Hessian missing rows, changes them."""
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    calib = torch.randint(0, adapter.vocab_size, (6, 24), generator=_gen(8))
    got = sequential_gptq(adapter, calib, bits, progress=False)
    want = _reference_sequential(adapter, calib, bits)
    assert list(got) == list(want)
    for name, (levels, scale) in want.items():
        assert torch.equal(got[name][1], scale), name
        assert torch.equal(got[name][0], levels), name


def test_inputs_must_be_shared_alike() -> None:
    """Hessians are shared by input identity, so every pass must share as the first did;
    a linear that never runs has no Hessian."""
    a, b, c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
    hidden = [torch.randn(1, 8, 8, generator=_gen(9)) for _ in range(2)]
    passes = iter([True, False])

    def run(h: torch.Tensor) -> torch.Tensor:
        return a(h) + b(h if next(passes) else h.clone())

    with pytest.raises(EdgeforgeError, match="shares its input unlike in the first pass"):
        _round_and_run({"a": a, "b": b}, run, hidden, 8, {}, propagate=False)
    with pytest.raises(EdgeforgeError, match="c saw no calibration rows"):
        _round_and_run({"a": a, "c": c}, a, hidden, 8, {}, propagate=False)


def test_sequential_gptq_on_tiny_model(tiny_qwen2_dir: Path) -> None:
    """Every decoder linear and the LM head get levels; the model stays float; held-out
    logits from the GPTQ weights are closer to float than from RTN ones."""
    model = load_model(tiny_qwen2_dir)
    adapter = get_adapter(model)
    g = _gen(5)
    calib = torch.randint(0, adapter.vocab_size, (16, 32), generator=g)
    held_out = torch.randint(0, adapter.vocab_size, (4, 32), generator=g)
    before = {n: m.weight.detach().clone() for n, _r, m in iter_linears(adapter)}
    levels = sequential_gptq(adapter, calib, 8, progress=False)
    assert set(levels) == set(before)
    again = sequential_gptq(adapter, calib, 8, progress=False)  # same inputs, same bytes
    assert all(torch.equal(again[n][0], levels[n][0]) for n in levels)
    for name, _role, linear in iter_linears(adapter):
        assert torch.equal(linear.weight, before[name]), name
    with torch.no_grad():
        want = model(held_out).logits

    def logits_error(chosen: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        for name, _role, linear in iter_linears(adapter):
            linear.weight.data = dequantize(*chosen[name])
        with torch.no_grad():
            got = model(held_out).logits
        for name, _role, linear in iter_linears(adapter):
            linear.weight.data = before[name]
        return float(((got - want) ** 2).mean())

    rtn = {name: quantize_weight(w, "per_channel") for name, w in before.items()}
    assert logits_error(levels) < logits_error(rtn)
