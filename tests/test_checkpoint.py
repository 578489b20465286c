"""checkpoint.py's resharding arithmetic alone (slice_runs), without files: the resume tests of
test_parallel.py and test_resilience.py exercise it through real checkpoints."""
import itertools
import math

import pytest
import torch

from checkpoint import slice_runs

LAYOUTS = [((12,), 0), ((12, 6), 0), ((12, 6), 1), ((6, 12), 1), ((4, 6, 12), 1), ((4, 6, 12), 2), ((8, 4, 2), 0),
           ((12, 6), None)]

def slices(full, dim, tp):
    return [full.flatten()] if dim is None else [s.contiguous().flatten() for s in full.chunk(tp, dim)]

@pytest.mark.parametrize("shape,dim", LAYOUTS)
def test_every_element_of_a_slice_is_read_once_from_the_writers_slice_that_holds_it(shape, dim):
    full = torch.arange(math.prod(shape)).view(shape)
    splits = [1] if dim is None else [k for k in (1, 2, 3, 4, 6) if shape[dim] % k == 0]
    cases = 0
    for tp, src_tp in itertools.product(splits, repeat=2):
        writers = slices(full, dim, src_tp)
        for rank, mine in enumerate(slices(full, dim, tp)):
            n = len(mine)
            for start, end in {(0, n), (1, n - 1), (n // 3, 2 * n // 3), (n - 1, n), (n // 2, n // 2)}:
                got = torch.full((end - start,), -1)
                runs = list(slice_runs(shape, dim, tp, rank, src_tp, start, end))
                for src, src_start, length, at in runs:
                    assert length > 0 and 0 <= src_start and src_start + length <= len(writers[src])
                    assert (got[at:at + length] == -1).all()  # no element twice
                    got[at:at + length] = writers[src][src_start:src_start + length]
                assert torch.equal(got, mine[start:end])  # every element, from the right place
                assert sum(r[2] for r in runs) == end - start
                for a, b in zip(runs, runs[1:]):  # in order, each run as long as it can be
                    assert a[3] + a[2] == b[3] and not (a[0] == b[0] and a[1] + a[2] == b[1])
                cases += 1
    assert cases >= 5

def test_same_split_is_one_run_per_writer_and_a_row_split_reads_rows():
    assert list(slice_runs((4, 6), 1, 2, 1, 2, 0, 12)) == [(1, 0, 12, 0)]  # the same layout: the whole slice at once
    assert list(slice_runs((4, 6), 0, 1, 0, 2, 0, 24)) == [(0, 0, 12, 0), (1, 0, 12, 12)]  # row slices: two runs
    # a column split read whole: each row comes in tp pieces, one from each writer
    assert list(slice_runs((2, 4), 1, 1, 0, 2, 0, 8)) == [(0, 0, 2, 0), (1, 0, 2, 2), (0, 2, 2, 4), (1, 2, 2, 6)]
