import math

import pytest

from pio_fvlm_vllm.budget import budget, validate_visual_keep, validate_visual_turns
from pio_fvlm_vllm.settings import PioFvlmSettings, default_proxy_layer


@pytest.mark.parametrize(
    "n, keep, expected",
    [(2880, 0.111, 320), (2880, 1.0, 2880), (2880, 1e-9, 1), (1, 0.01, 1), (1, 1.0, 1),
     (3, 0.5, 2), (10, 0.25, 3), (0, 0.5, 0), (576, 0.111, 64)],
)
def test_budget_values(n, keep, expected):
    assert budget(n, keep) == expected


def test_budget_is_monotone_and_bounded():
    for n in range(1, 300, 7):
        previous = 0
        for step in range(1, 101):
            k = budget(n, step / 100)
            assert 1 <= k <= n
            assert k >= previous
            previous = k
        assert budget(n, 1.0) == n


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.5", [0.5], True, False, None])
def test_invalid_keep_names_field_and_range(bad):
    with pytest.raises(ValueError, match=r"visual_keep must be a number in \(0, 1\]"):
        validate_visual_keep(bad)


def test_settings_defaults_and_env():
    s = PioFvlmSettings()
    assert s.visual_keep == 1.0 and s.mode == "encoder_free" and s.proxy_layer is None
    env = {"PIO_FVLM_VISUAL_KEEP": "0.25", "PIO_FVLM_PROXY_LAYER": "3", "PIO_FVLM_NMS_THRESHOLD": "0.8"}
    s = PioFvlmSettings.from_env(env)
    assert (s.visual_keep, s.proxy_layer, s.nms_threshold) == (0.25, 3, 0.8)


@pytest.mark.parametrize(
    "env, message",
    [({"PIO_FVLM_VISUAL_KEEP": "abc"}, "PIO_FVLM_VISUAL_KEEP must be a number"),
     ({"PIO_FVLM_VISUAL_KEEP": "1.5"}, "visual_keep must be a number in"),
     ({"PIO_FVLM_MODE": "fast"}, "PIO_FVLM_MODE"),
     ({"PIO_FVLM_PROXY_LAYER": "0"}, "PIO_FVLM_PROXY_LAYER")],
)
def test_settings_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        PioFvlmSettings.from_env(env)


def test_proxy_layer_defaults():
    assert default_proxy_layer(32) == 2
    assert 1 <= default_proxy_layer(4) <= 4
    with pytest.raises(ValueError, match=r"proxy_layer \(PIO_FVLM_PROXY_LAYER\) must be in \[1, 4\] .* got 9"):
        PioFvlmSettings(proxy_layer=9).proxy_layer_for(4)
    with pytest.raises(ValueError, match=r"\[1, 3\] .* got 4 \(official scoring runs one more layer\)"):
        PioFvlmSettings(proxy_layer=4, scoring="official").proxy_layer_for(4)
    with pytest.raises(ValueError, match=r"backprop_layers \(PIO_FVLM_BACKPROP_LAYERS\) must be in \[1, 2\]"):
        PioFvlmSettings(proxy_layer=2, backprop_layers=3, saliency="grad_norm").proxy_layer_for(32)
    # The default saliency reads layer K's normed input: the gradient stops there.
    with pytest.raises(ValueError, match=r"grad_x_normed \(PIO_FVLM_SALIENCY, the default\) needs backprop_layers "
                                         r"\(PIO_FVLM_BACKPROP_LAYERS\) 1, got 2; set PIO_FVLM_SALIENCY to"):
        PioFvlmSettings.from_env({"PIO_FVLM_BACKPROP_LAYERS": "2"})
    assert PioFvlmSettings.from_env({"PIO_FVLM_BACKPROP_LAYERS": "2", "PIO_FVLM_SALIENCY": "grad_x_input"}).saliency \
        == "grad_x_input"


def test_paper_budget_is_an_absolute_count():
    assert budget(2880, 0.111, reference_tokens=2880) == 320
    assert budget(1500, 0.111, reference_tokens=2880) == 320  # a smaller image keeps as many
    assert budget(200, 0.111, reference_tokens=2880) == 200  # never more than it has
    assert budget(576, 0.111, reference_tokens=576) == 64


def test_official_scoring_sets_its_defaults_and_explicit_settings_win():
    s = PioFvlmSettings.from_env({"PIO_FVLM_SCORING": "official"})
    assert (s.loss_positions, s.saliency, s.nms_threshold, s.nms_inclusive) == ("four_before_last", "grad_norm",
                                                                               0.8, True)
    assert s.proxy_layer_for(32) == 3  # the gradient at layer 2's output, through layer 3
    s = PioFvlmSettings.from_env({"PIO_FVLM_SCORING": "official", "PIO_FVLM_NMS_INCLUSIVE": "false"})
    assert s.nms_inclusive is False and s.nms_threshold == 0.8


def test_handoff_layer_defaults_and_bounds():
    assert PioFvlmSettings().handoff_layer_for(32) == 2  # after layer K = 2, the paper's pruning point
    assert PioFvlmSettings(handoff_layer=1).handoff_layer_for(32) == 1
    assert PioFvlmSettings(proxy_layer=1).handoff_layer_for(32) == 1
    assert PioFvlmSettings(scoring="official").handoff_layer_for(32) == 2  # the official pruning point
    assert PioFvlmSettings(scoring="official", handoff_layer=3).handoff_layer_for(32) == 3
    assert PioFvlmSettings(selector="uniform").handoff_layer_for(32) == 0
    with pytest.raises(ValueError, match=r"handoff_layer \(PIO_FVLM_HANDOFF_LAYER\) must be in \[0, 2\]"):
        PioFvlmSettings(handoff_layer=3).handoff_layer_for(32)
    with pytest.raises(ValueError, match="PIO_FVLM_NMS_INCLUSIVE: Input should be a valid boolean"):
        PioFvlmSettings.from_env({"PIO_FVLM_NMS_INCLUSIVE": "maybe"})
    with pytest.raises(ValueError, match="PIO_FVLM_SELECTOR"):
        PioFvlmSettings.from_env({"PIO_FVLM_SELECTOR": "best"})


def test_unknown_prefixed_variables_are_listed():
    env = {"PIO_FVLM_VISUAL_KEEP": "0.5", "PIO_FVLM_VISUALKEEP": "0.5", "PIO_FVLM_STATS_DIR": "/x", "OTHER": "1"}
    assert PioFvlmSettings.unknown_env(env) == ["PIO_FVLM_VISUALKEEP"]


def test_keep_as_a_huge_integer_names_the_field():
    with pytest.raises(ValueError, match=r"^visual_keep must be a number in \(0, 1\], got an integer too large"):
        validate_visual_keep(10**400)


@pytest.mark.parametrize("value", [10**300, "x" * 500, [0.5] * 200])
def test_a_rejected_value_is_shown_cut(value):
    with pytest.raises(ValueError) as error:
        validate_visual_keep(value)
    assert len(str(error.value)) < 140 and "characters)" in str(error.value)
    with pytest.raises(ValueError) as error:
        validate_visual_turns(value)
    assert len(str(error.value)) < 200
