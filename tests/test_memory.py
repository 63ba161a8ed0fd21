import math

import pytest
import torch

from course_lib.memory import bytes_of, estimate_serving_memory_gb, measure_peak_memory, tensor_bytes

from .conftest import tiny_llama


def test_seed_formula_matches_the_seed_example():
    assert math.isclose(estimate_serving_memory_gb(7e9, 16), 16.8)  # "around 17 GB"
    assert math.isclose(estimate_serving_memory_gb(7e9, 4), 4.2)
    with pytest.raises(ValueError, match="bits must be in 1..32"):
        estimate_serving_memory_gb(1e9, 0)


def test_tensor_bytes_counts_tied_weights_once():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    assert tensor_bytes(untied) - tensor_bytes(tied) == tied.lm_head.weight.numel() * 4


def test_bytes_of_counts_each_tensor_by_its_dtype_and_shared_memory_once():
    a, b = torch.zeros(10), torch.zeros(3, 4, dtype=torch.bfloat16)
    assert bytes_of([a, b]) == 10 * 4 + 12 * 2
    assert bytes_of([a, a, b]) == bytes_of([a, b]) and bytes_of([]) == 0


def test_peak_memory_sees_a_large_temporary_allocation():
    def allocate():
        x = torch.ones(50_000_000)  # 200 MB, freed before returning
        return float(x[0])
    result, peak = measure_peak_memory(allocate)
    assert result == 1.0
    assert 180e6 < peak.peak_bytes < 400e6, peak
