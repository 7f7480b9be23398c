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
    assert dims.coords(5) == {"tp": 0, "pp": 1, "dp": 1}
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


def test_tensor_parallel_is_innermost():
    dims = ParallelDims.for_world(8, pp=2, tp=2)
    assert (dims.tp, dims.pp, dims.dp) == (2, 2, 2)
    assert dims.coords(5) == {"tp": 1, "pp": 0, "dp": 1}
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]   # a tensor-parallel group: consecutive ranks
    assert dims.group_ranks("pp", 5) == [5, 7]                       # its stage peer: the same tp rank
    assert dims.group_ranks("dp", 5) == [1, 5]
    assert dims.to_dict() == {"tp": 2, "pp": 2, "dp": 2}
    assert ParallelDims.for_world(4, pp=2).to_dict() == {"pp": 2, "dp": 2}  # layouts before TP read the same
    with pytest.raises(HpcllmError, match=r"--pipeline-stages 2 x --tensor-parallel 2: 6 ranks are not a multiple of 4"):
        ParallelDims.for_world(6, pp=2, tp=2)
    with pytest.raises(HpcllmError, match=r"--tensor-parallel 4: needs at least 4 ranks"):
        ParallelDims.for_world(2, tp=4)
