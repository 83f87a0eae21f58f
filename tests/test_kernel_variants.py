"""The covering choice of kernel variants that the sm_90 compile test compiles (tests/kernel_variants.py)."""
import json

from kernel_variants import covering_variants


def _variant(head_dim: int, padded: int) -> str:
    return json.dumps({"module": "m", "kernel": "k", "signature": {"q": "*fp32", "HEAD_DIM": "constexpr",
                                                                    "HEAD_DIM_PADDED": "constexpr"},
                       "constexprs": {"HEAD_DIM": head_dim, "HEAD_DIM_PADDED": padded}, "options": {}},
                      sort_keys=True)


def test_a_padded_head_is_compiled_even_when_its_sizes_are_no_extreme():
    # 16 and 256 show every size's smallest and largest; only the padded flag asks for 96 in 128 as well.
    chosen = [json.loads(key)["constexprs"] for key in covering_variants({_variant(16, 16), _variant(256, 256),
                                                                            _variant(96, 128)})]
    assert {"HEAD_DIM": 96, "HEAD_DIM_PADDED": 128} in chosen
    assert {"HEAD_DIM": 16, "HEAD_DIM_PADDED": 16} in chosen and {"HEAD_DIM": 256, "HEAD_DIM_PADDED": 256} in chosen
