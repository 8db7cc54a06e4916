"""Every choice list is defined once, in dsd2.config; the registries that implement the choices agree with it."""

import dsd2.config as config


def test_models_registry_matches_the_model_choices():
    from dsd2.models import REGISTRY

    assert tuple(REGISTRY) == config.MODELS
    assert set(config.CONV_MODELS) <= set(REGISTRY)


def test_dataset_sources_match_the_dataset_choices():
    from dsd2.data.sources import SOURCES

    assert tuple(SOURCES) == config.DATASETS


def test_pruning_criteria_match():
    from dsd2.pruning import CRITERIA

    assert tuple(CRITERIA) == config.CRITERIA


def test_every_early_stop_rule_of_the_config_is_decided():
    from dsd2.analysis.early_stop import decide

    for rule in config.EARLY_STOP_RULES:
        assert decide(rule, [0.5, 0.4], [0.8, 0.8], patience=1).level == 1


def test_every_granularity_of_the_config_counts():
    from dsd2.ops import CountingReLU

    for granularity in config.GRANULARITIES:
        assert CountingReLU(granularity=granularity).granularity == granularity


def test_noise_types_match():
    from dsd2.data.noise import NOISE_FUNCTIONS

    assert set(NOISE_FUNCTIONS) == set(config.NOISE_TYPES)


def test_sweep_launchers_are_the_config_ones():
    from dsd2.sweep import LAUNCHERS

    assert LAUNCHERS is config.LAUNCHERS
