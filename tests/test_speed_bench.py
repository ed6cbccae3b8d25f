"""``efficientad bench model``: the bare model's timing and memory, in this process."""

from __future__ import annotations

import pytest

from models.speed_bench import BenchError, ModelBenchSettings, time_model_case


def test_settings_are_checked() -> None:
    with pytest.raises(BenchError, match="model sizes"):
        ModelBenchSettings(sizes=["xl"], batches=[1]).check()
    with pytest.raises(BenchError, match=r"image size 128: each side must be in \[256, 4096\]"):
        ModelBenchSettings(sizes=["s"], batches=[1], image_size=128).check()


@pytest.mark.slow
def test_bench_model_case_reports_timing_and_memory() -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        case = time_model_case("s", 1, "cpu", False, 256, 1, 0.0, 1)
    finally:
        torch.set_num_threads(threads)
    assert case["model_size"] == "s" and case["batch"] == 1 and case["device"] == "cpu"
    assert case["ms_per_image"] > 0 and case["images_per_s"] > 0
    assert case["peak_rss_mb"] > 50
    assert case["torch_threads"] == 1
