"""The output directory's settings check shared by the toy and speedrun replications."""
import dataclasses

import pytest

from examples.replicate.settings import check_settings
from examples.speedrun.presets import PRESETS


def test_a_planned_wall_time_is_not_a_setting(tmp_path):
    """Editing a preset's expected_minutes (the ETA's plan) refused to resume a finished replication,
    whose results it cannot change."""
    check_settings(tmp_path, PRESETS["tiny"], "speedrun")
    check_settings(tmp_path, dataclasses.replace(PRESETS["tiny"], expected_minutes=99.0), "speedrun")
    with pytest.raises(ValueError, match="differs in: budget"):
        check_settings(tmp_path, dataclasses.replace(PRESETS["tiny"], budget=PRESETS["tiny"].budget * 2), "speedrun")
