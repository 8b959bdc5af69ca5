"""ProvisioningOptions refuse a bad value when made, naming the option and what it allows
(nothing is provisioned first); the runner and AzureCluster take these keywords too."""

from __future__ import annotations

import math

import pytest

from prefect_azmanagers.azure.provisioning import ProvisioningOptions
from prefect_azmanagers.exceptions import ConfigurationError

SPOT = dict(spot=True)


@pytest.mark.parametrize("options, named", [
    (dict(spot="yes"), "spot must be True or False, got 'yes'"),
    (dict(spot=1), "spot must be True or False"),
    (dict(SPOT, max_price=True), "max_price must be -1 (pay up to the regular price) or a positive"),
    (dict(SPOT, max_price="0.5"), "max_price must be -1"),
    (dict(SPOT, max_price=math.nan), "max_price must be -1"),
    (dict(SPOT, max_price=math.inf), "max_price must be -1"),
    (dict(SPOT, max_price=-2), "max_price must be -1"),
    (dict(SPOT, spot_regular_percentage_above_base="50"),
     "spot_regular_percentage_above_base must be an integer within 0..100, got '50'"),
    (dict(SPOT, spot_regular_percentage_above_base=True), "spot_regular_percentage_above_base must be an integer"),
    (dict(SPOT, spot_regular_percentage_above_base=50.5), "spot_regular_percentage_above_base must be an integer"),
    (dict(SPOT, spot_regular_percentage_above_base=101), "within 0..100, got 101"),
    (dict(SPOT, spot_base_regular_priority_count=1.5),
     "spot_base_regular_priority_count must be an integer >= 0, got 1.5"),
    (dict(SPOT, spot_base_regular_priority_count=True), "spot_base_regular_priority_count must be an integer"),
    (dict(SPOT, spot_base_regular_priority_count=-1), ">= 0, got -1"),
    (dict(os_disk_size=True), "os_disk_size must be a size in GB within 1..4095, got True"),
    (dict(os_disk_size=30.0), "os_disk_size must be a size in GB within 1..4095, got 30.0"),
    (dict(os_disk_size=4096), "within 1..4095, got 4096"),
    (dict(image_name=""), "image_name must be a non-empty string or None, got ''"),
    (dict(image_version=2), "image_version must be a non-empty string or None, got 2"),
])
def test_a_bad_provisioning_option_is_refused_naming_it_and_its_range(options, named):
    from prefect_azmanagers.cluster.cluster import AzureCluster

    for make in (lambda: ProvisioningOptions(**options), lambda: AzureCluster("t", 1, **options)):
        with pytest.raises(ConfigurationError) as refused:
            make()
        assert named in str(refused.value)


@pytest.mark.parametrize("options", [
    dict(),
    dict(spot=True, max_price=-1),
    dict(spot=True, max_price=0.25, spot_base_regular_priority_count=2,
         spot_regular_percentage_above_base=100),
    dict(os_disk_size=4095, image_name="ubuntu", image_version="1.0.0"),
])
def test_good_provisioning_options_are_kept_as_given(options):
    made = ProvisioningOptions(**options)
    assert {k: getattr(made, k) for k in options} == options
