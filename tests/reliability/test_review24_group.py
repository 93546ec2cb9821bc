"""``SpectralLens(group=...)`` takes a process group or nothing: anything else (a ``DeviceMesh``, a string) is a
``TypeError`` at construction saying what to pass, not torch's "Group ... is not registered" at the first
``measure`` (in a single process a wrong group was not noticed at all)."""
import pytest
import torch
import torch.nn as nn

import spectral_lens as sl


def _lens(group):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    return sl.SpectralLens(model, [torch.randn(8, 4)], layers=["0"], params=(), group=group)


class DeviceMesh:  # stands for torch.distributed.device_mesh.DeviceMesh (named alike; no process group needed)
    pass


def test_a_device_mesh_is_refused_naming_get_group():
    with pytest.raises(TypeError, match=r"group= takes a torch.distributed process group, got DeviceMesh: .*"
                                        r"mesh\['dp'\]\.get_group\(\)"):
        _lens(DeviceMesh())


@pytest.mark.parametrize("group", ["world", 0, [0, 1]])
def test_other_objects_are_refused_naming_their_type(group):
    with pytest.raises(TypeError, match=rf"got {type(group).__name__}: pass a group made by torch.distributed.new_group"):
        _lens(group)


def test_no_group_is_accepted_and_measures():
    lens = _lens(None)
    assert lens.group is None
    assert "act:0" in lens.measure(0, 0).spectra


def test_what_new_group_gives_a_rank_outside_it_is_accepted():
    import torch.distributed as dist

    assert _lens(dist.GroupMember.NON_GROUP_MEMBER).group == dist.GroupMember.NON_GROUP_MEMBER
