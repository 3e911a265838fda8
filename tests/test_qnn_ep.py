"""The SoC table and provider options of common/backends/qnn_ep.py (no QNN wheel needed; the
emulator tests are in tests/targets/qnn/)."""

from __future__ import annotations

import pytest

from common.backends import qnn_ep
from common.core.errors import EdgeforgeError


def test_soc_table_matches_qnn_enum() -> None:
    # QnnTypes.h socModel values and Hexagon arches
    want = {"SM8550": (43, 73), "SM8650": (57, 75), "SM8750": (69, 79), "SM8850": (87, 81)}
    got = {n: (s.soc_model, s.htp_arch) for n, s in qnn_ep.SOC_TABLE.items()}
    assert got == want
    assert qnn_ep.soc_by_name("sm8650") == qnn_ep.SOC_TABLE["SM8650"]


def test_unknown_soc_lists_the_table() -> None:
    with pytest.raises(EdgeforgeError) as err:
        qnn_ep.soc_by_name("SC8380XP")
    message = str(err.value)
    assert "SC8380XP" in message
    for name in qnn_ep.SOC_TABLE:
        assert name in message


def test_provider_options_always_name_the_soc() -> None:
    options = qnn_ep.provider_options(qnn_ep.SOC_TABLE["SM8750"], vtcm_mb=4, opt_mode=2)
    assert options == {
        "backend_type": "htp",
        "soc_model": "69",
        "htp_arch": "79",
        "vtcm_mb": "4",
        "htp_graph_finalization_optimization_mode": "2",
        "enable_htp_fp16_precision": "1",  # the float residual stream runs in fp16
    }
