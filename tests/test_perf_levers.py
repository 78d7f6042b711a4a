"""The lever table's bookkeeping: which levers each variant turns on, and the ratios it prints."""

from experiments.perf import perf_levers


def test_cumulative_variants_add_one_lever_each():
    previous = ()
    for variant in perf_levers.CUMULATIVE:
        levers, changes = perf_levers.levers_of(variant)
        assert changes == {}
        assert levers[:len(previous)] == previous and len(levers) == len(previous) + (variant != "baseline")
        previous = levers
    assert perf_levers.levers_of("baseline")[0] == ()
    # fused_stem, the end of the chain, is the default; xla_default is it without oneDNN.
    assert set(perf_levers.levers_of("fused_stem")[0]) == {
        "fermsca_pools", "fermsca_batchnorm", "hugepage_malloc", "onednn_conv", "argmax_pools", "fused_stem"}
    assert set(perf_levers.levers_of("xla_default")[0]) == {
        "fermsca_pools", "fermsca_batchnorm", "hugepage_malloc", "argmax_pools", "fused_stem"}
    assert set(perf_levers.levers_of("xla_default")[0]) - set(perf_levers.levers_of("xla_plain_stem")[0]) == {
        "fused_stem"}
    assert set(perf_levers.levers_of("argmax_pools")[0]) - set(perf_levers.levers_of("nn_batchnorm")[0]) == {
        "fermsca_batchnorm"}
    assert perf_levers.levers_of("bfloat16")[1] == {"dtype": "bfloat16"}
    assert set(perf_levers.NOTES) == set(perf_levers.VARIANTS)


def test_markdown_ratios():
    record = {"table": [
        {"variant": "baseline", "median_images_per_second": 100.0},
        {"variant": "fermsca_pools", "median_images_per_second": 150.0},
        {"variant": "hugepage_malloc", "median_images_per_second": 120.0},
        {"variant": "no_donation", "median_images_per_second": 140.0},
        {"variant": "bfloat16", "median_images_per_second": None},
    ]}
    lines = perf_levers.markdown(record).splitlines()
    assert "| 150.0 | 1.50x | 1.50x |" in lines[3]
    assert "| 120.0 | 0.80x | 1.20x |" in lines[4]
    assert "| 140.0 | (ablation) | 1.40x |" in lines[5]
    assert "failed" in lines[6]
    subset = perf_levers.markdown({"table": [{"variant": "argmax_pools", "median_images_per_second": 200.0},
                                             {"variant": "fused_stem", "median_images_per_second": 210.0}]})
    assert subset.splitlines()[3].endswith("| 210.0 | 1.05x | - |")


def test_earlier_3x3_pool_equals_flax_pooling():
    """The `fermsca_pools` lever's 3x3 pool computes what nn.max_pool computes (values; its 2x2 pool
    is `pooling.reshape_max_2x2`, tested in test_pooling.py)."""
    import flax.linen as nn
    import jax
    import numpy as np

    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    np.testing.assert_array_equal(perf_levers.separable_max_pool_3x3(x),
                                  nn.max_pool(x, (3, 3), (1, 1), "SAME"))


def test_building_blocks_of_each_lever():
    """Each variant's pool is nn.max_pool's values; the default variant gets perf's blocks."""
    import flax.linen as nn
    import jax
    import numpy as np

    from configs import default
    from fermsca.perf import batchnorm, pooling, stem

    model_config = default.get_config().model
    base = perf_levers.building_blocks(perf_levers.levers_of("baseline")[0], model_config)
    assert base == {"conv": nn.Conv, "norm": nn.BatchNorm, "pool": nn.max_pool}
    pools = perf_levers.building_blocks(("fermsca_pools",), model_config)["pool"]
    assert pools is perf_levers.reshape_max_pool
    model_config.conv_impl = "onednn"  # as the worker sets it for the oneDNN variants
    full = perf_levers.building_blocks(perf_levers.levers_of("argmax_pools")[0], model_config)
    assert full["pool"] is pooling.max_pool and full["norm"] is batchnorm.BatchNorm
    assert repr(full["conv"].keywords["conv_general_dilated"]) == "conv_function('onednn')"
    assert "stem" not in full
    assert perf_levers.building_blocks(perf_levers.levers_of("fused_stem")[0], model_config)["stem"] is (
        stem.FusedStem)
    x = jax.random.normal(jax.random.key(1), (2, 8, 6, 3))
    for args in (((2, 2), (2, 2), "VALID"), ((3, 3), (1, 1), "SAME"), ((2, 2), (1, 1), "SAME")):
        np.testing.assert_array_equal(perf_levers.reshape_max_pool(x, *args), nn.max_pool(x, *args))
