"""On the real demo classifier (MiniLM fine-tuned on movie-sentiment; built once, a few minutes):
STAT at μ = 0.5 keeps the accuracy, the magnitude baseline does not."""
import pytest

import prune_bert
from scripts.build_demo_classifier import DEFAULT_OUT, build_classifier


@pytest.fixture(scope="module")
def demo_classifier():
    return build_classifier(DEFAULT_OUT)


def test_stat_beats_magnitude_on_the_real_classifier(demo_classifier, tmp_path):
    argv = ["--model_name", "all-minilm-l6-v2", "--task_name", "movie-sentiment", "--mu", "0.5", "--seed", "0",
            "--model_dir", demo_classifier, "--output_dir", str(tmp_path), "--device", "cpu"]
    stat = prune_bert.main(argv)
    magnitude = prune_bert.main(argv + ["--method", "magnitude"])
    assert stat["dense_metric"] > 0.8  # the fine-tuned classifier is real
    assert stat["mac_ratio"] <= 0.5 and magnitude["mac_ratio"] <= 0.5
    assert stat["pruned_metric"] >= stat["dense_metric"] - 0.03
    assert stat["pruned_metric"] > magnitude["pruned_metric"] + 0.1
