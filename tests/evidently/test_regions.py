"""Which projects a forwarder for one region can deliver (evidently/protocol.py, region_error)."""

from __future__ import annotations

import pytest

from forwarder.config import ConfigError, from_dict
from forwarder.evidently.protocol import project_region, region_error


@pytest.mark.parametrize("project, region", [
    ("shop", None),
    ("arn:aws:evidently:eu-west-1:123456789012:project/shop", "eu-west-1"),
    ("arn:aws-cn:evidently:cn-north-1:123456789012:project/shop", "cn-north-1"),
    ("arn:aws:evidently::123456789012:project/shop", ""),
])
def test_a_project_arn_names_its_region_and_a_plain_name_none(project, region):
    assert project_region(project) == region


@pytest.mark.parametrize("project, deliverable", [
    ("shop", True),  # a name: the forwarder's own region
    ("arn:aws:evidently:eu-west-1:123456789012:project/shop", True),
    ("arn:aws:evidently:us-east-1:123456789012:project/shop", False),
    ("arn:aws:evidently::123456789012:project/shop", False),
])
def test_only_projects_of_the_forwarders_own_region_are_deliverable(project, deliverable):
    problem = region_error(project, "eu-west-1")
    assert (problem is None) is deliverable
    if problem is not None:
        assert "evidently.region" in problem and "'eu-west-1'" in problem


def test_a_default_project_in_another_region_stops_start_up_naming_the_key():
    with pytest.raises(ConfigError, match="evidently.default_project is invalid: .*'us-east-1'"):
        from_dict({"evidently": {"region": "eu-west-1",
                                 "default_project": "arn:aws:evidently:us-east-1:123456789012:project/shop"}})
