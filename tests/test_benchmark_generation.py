"""The generation benchmark runs at the tiny size, and (a) the library and (b) the authors' algorithm agree."""

import json
import pathlib
import runpy

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generation_benchmark_tiny_identical_greedy_codes(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks/generation.py"), run_name="not_main")["main"]
    threads = torch.get_num_threads()  # main() sets the thread count: keep the test process's
    results = main(["--sizes", "tiny", "--repeats", "1", "--warmup", "0", "--head-batches", "1,3",
                    "--head-repeats", "1", "--curve-batches", "1,2", "--threads", str(threads),
                    "--json", str(tmp_path / "g.json")])  # fmt: skip
    assert torch.get_num_threads() == threads
    tiny = results["sizes"]["tiny"]
    assert tiny["grid"] == 4 and tiny["pixel_depth"] == 4
    for mode in ("greedy", "sampled"):
        entry = tiny[mode]
        assert {"a", "b", "codes_identical", "speedup_end_to_end_best", "speedup_depth_head_best"} <= set(entry)
        for name in ("a", "b", "c"):
            assert entry[name]["best_s"] > 0
            assert set(entry[name]["parts_of_best"]) == {
                "llm", "depth_head_layers", "depth_head_classifiers", "depth_loop_sampling_and_rest",
                "compiled_position_step", "other",
            }  # fmt: skip
        for name in ("a", "b"):
            assert entry[name]["depth_head_best_s"] > 0 and entry[name]["parts_of_best"]["compiled_position_step"] == 0
    assert tiny["greedy"]["codes_identical"] is True
    assert tiny["greedy"]["static_codes_identical"] is True and tiny["sampled"]["static_codes_identical"] is True
    assert tiny["greedy"]["c"]["parts_of_best"]["compiled_position_step"] > 0  # timed as a whole
    assert tiny["greedy"]["positions_identical_before_first_difference"] == 16
    assert set(tiny["depth_head_by_batch"]) == {"1", "3"}
    assert all(h["codes_identical"] and h["static_codes_identical"] for h in tiny["depth_head_by_batch"].values())
    assert results["paper_size_multiply_adds_per_position"]["head_ratio"] > 2
    curve = tiny["images_per_second_by_batch"]
    assert set(curve) == {"1", "2"}
    for point in curve.values():
        assert point["codes_identical"] is True and point["static_codes_identical"] is True
        assert point["a_best_images_per_s"] > 0 and point["b_best_images_per_s"] > 0
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["sizes"]["tiny"]["greedy"]["codes_identical"] is True
    # the timing wrappers are gone afterwards
    from evotok_hf.modeling import generation

    assert generation._sample_depths.__name__ == "_sample_depths"
    assert generation._llm_step.__name__ == "_llm_step"
    assert generation._compiled_position_step.__name__ == "_compiled_position_step"


def test_few_row_linear_benchmark_checks_both_forms_against_float64(tmp_path):
    """benchmarks/few_row_linear.py on one weight shape: both forms agree with the float64 product, every row count
    takes the few-row form (beyond the shipped limit too), and the shipped limit is restored afterwards."""
    from evotok_hf.modeling import generation

    main = runpy.run_path(str(ROOT / "benchmarks/few_row_linear.py"), run_name="not_main")["main"]
    shipped = generation.FEW_ROW_LINEAR_MAX_ROWS
    results = main(["--shapes", "3", "--rows", "2,16", "--repeats", "1", "--calls", "1", "--threads",
                    str(torch.get_num_threads()), "--json", str(tmp_path / "f.json")])  # fmt: skip
    assert generation.FEW_ROW_LINEAR_MAX_ROWS == shipped == results["shipped_max_rows"]
    (entry,) = results["shapes"]
    assert entry["shape"] == [448, 448] and set(entry["rows"]) == {2, 16} and entry["read_gb_per_s"] > 0
    for timings in entry["rows"].values():
        for variant in ("linear", "few-row"):
            assert timings[variant]["max_relative_error"] < 1e-5 and timings[variant]["microseconds"] > 0
    assert json.loads((tmp_path / "f.json").read_text())["shapes"][0]["name"] == "LLM attention q / o"
