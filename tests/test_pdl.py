"""kernels/pdl.py: when kernels launch with programmatic dependent launch, and that it changes no result.

PDL only reorders when kernels start, never what they compute: a decode step with it must give the
same bits as one without it. A kernel that read its predecessor's output before ``gdc_wait`` (or a
launch that set the flag on a kernel that never waits) would race, and show here as a difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.kernels import pdl


@pytest.fixture(autouse=True)
def _restore_setting():
    saved = pdl.ENABLED
    yield
    pdl.configure(saved)  # a test's setting must not outlive it


def test_configure_sets_the_process_setting():
    pdl.configure(False)
    assert not pdl.ENABLED
    pdl.configure(True)
    assert pdl.ENABLED


def test_cpu_tensors_never_launch_with_pdl():
    assert not pdl.enabled(torch.zeros(1))
    assert pdl.options(torch.zeros(1)) == {"USE_PDL": False}


def test_prefetch_lines_cover_the_rows_in_a_power_of_two():
    # 8 rows of 1536 bf16 = 24 KiB = 192 lines -> 256; 8 rows of 768 fp32 = 192 lines -> 256
    assert pdl.prefetch_lines(8, 1536, 2) == 256
    assert pdl.prefetch_lines(8, 768, 4) == 256
    assert pdl.prefetch_lines(8, 512, 2) == 64  # exactly 64 lines
    assert pdl.prefetch_lines(1, 1, 2) == 1
    for rows, elems, size in [(8, 1000, 2), (3, 77, 4), (8, 4096, 2)]:
        n = pdl.prefetch_lines(rows, elems, size)
        assert n * pdl.LINE_BYTES >= rows * elems * size > n // 2 * pdl.LINE_BYTES
        assert n & (n - 1) == 0


@pytest.mark.gpu
def test_switch_turns_pdl_off():
    pdl.configure(enabled=False)
    assert pdl.options(torch.zeros(1, device="cuda")) == {"USE_PDL": False}


@pytest.mark.gpu
def test_pdl_is_on_for_sm90():
    """The H200 (sm90) must take the PDL launches: the decode step's speed depends on it."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm90+")
    assert pdl.options(torch.zeros(1, device="cuda")) == {"USE_PDL": True, "launch_pdl": True}


def _generate(model_dir: Path, dtype: str, on: bool) -> list:
    pdl.configure(on)  # before the engine compiles and captures its kernels
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, max_num_seqs=8, cuda_graph_batch_sizes=(1, 2, 4, 8))
    prompts = [[3 + i] * (5 + 9 * i) for i in range(5)]  # 5 rows: the size-8 graph, positions 5..77
    params = SamplingParams(max_tokens=40, logprobs=3, temperature=0.0, ignore_eos=True)
    outs = [r.outputs[0] for r in llm.generate(prompts, params)]
    return [(o.token_ids, [t.sampled.logprob for t in o.logprobs]) for o in outs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_graphs_give_the_same_bits_with_and_without_pdl(tiny_model_dir: Path, dtype):
    """The decode step in CUDA graphs (5 rows: the size-8 graph): every Triton kernel of it launched
    with PDL, or none (``pdl.configure``); tokens and logprobs identical over 40 steps."""
    assert _generate(tiny_model_dir, dtype, True) == _generate(tiny_model_dir, dtype, False)
