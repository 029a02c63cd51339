"""rho's use of megatron-core against megatron-core's sources (tests/compat/mcore_api.py): the
installed version (the one this suite runs on) and the newest 0.19 wheel, which needs Python 3.12
and so cannot run the suite here. ``.ci/run`` downloads that wheel into ``.ci-wheels/`` (no
network in tests); without it the check against it skips and says so."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "compat"))

import mcore_api  # noqa: E402


def _installed_tree() -> Path:
    import megatron.core

    return Path(megatron.core.__file__).resolve().parents[2]


def test_installed_megatron_core_has_everything_rho_uses():
    uses, keywords = mcore_api.rho_uses()
    # the scan sees rho's real use: dozens of names, the configs' keyword arguments
    assert len(uses) > 40 and len(keywords["TransformerConfig"]) > 30 and "OptimizerConfig" in keywords
    assert mcore_api.check(_installed_tree()) == []


def test_a_removed_name_and_field_are_reported(tmp_path):
    """The negative control: a copy of the installed tree with a function of parallel_state and a
    TransformerConfig field renamed must fail the check, naming both."""
    shutil.copytree(_installed_tree() / "megatron", tmp_path / "megatron",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc"))
    state = tmp_path / "megatron" / "core" / "parallel_state.py"
    state.write_text(state.read_text().replace("def get_data_parallel_rank(", "def get_dp_rank_renamed("))
    config = tmp_path / "megatron" / "core" / "transformer" / "transformer_config.py"
    config.write_text(config.read_text().replace("    apply_rope_fusion: bool", "    rope_fusion_renamed: bool"))
    problems = mcore_api.check(tmp_path)
    assert "megatron.core.parallel_state.get_data_parallel_rank is gone" in problems
    assert ("megatron.core.transformer.transformer_config.TransformerConfig no longer takes apply_rope_fusion"
            in problems), problems


def test_newest_megatron_core_019_has_everything_rho_uses(tmp_path):
    wheels = sorted((ROOT / ".ci-wheels").glob("megatron_core-0.19.*.whl"))
    if not wheels:
        pytest.skip(".ci-wheels/ holds no megatron-core 0.19 wheel (.ci/run downloads it; offline: skipped)")
    import zipfile

    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith("megatron/") and n.endswith(".py")])
    assert mcore_api.check(tmp_path) == [], wheels[-1].name
