"""ParallelDims: degrees validated against the world with one line per misfit; rank <->
coordinates; every dimension's groups, the same list on every rank."""
import pytest

from hpcllm.errors import HpcllmError
from hpcllm.parallel.dims import ParallelDims


def test_coordinates_round_trip_and_pipeline_ranks_are_consecutive():
    dims = ParallelDims.for_world(8, pp=4)
    assert (dims.pp, dims.dp, dims.world) == (4, 2, 8)
    for r in range(8):
        assert dims.rank_of(**dims.coords(r)) == r
    assert dims.coords(5) == {"pp": 1, "dp": 1}
    assert dims.group_ranks("pp", 5) == [4, 5, 6, 7]   # one pipeline: consecutive ranks
    assert dims.group_ranks("dp", 5) == [1, 5]         # a stage's replicas, pp apart
    assert dims.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.groups("pp") == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pure_data_parallel_and_single_process():
    assert ParallelDims.for_world(3) == ParallelDims(pp=1, dp=3)
    assert ParallelDims.for_world(1).groups("dp") == [[0]]


@pytest.mark.parametrize("world,pp,msg", [
    (2, 4, "needs at least 4 ranks, one per stage"),
    (6, 4, "6 ranks are not a multiple of 4"),
    (4, 0, "must be >= 1"),
])
def test_misfits_are_one_line_errors(world, pp, msg):
    with pytest.raises(HpcllmError, match=msg) as e:
        ParallelDims.for_world(world, pp)
    assert "\n" not in str(e.value)
