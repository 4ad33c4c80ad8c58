"""Bad datasets through `tlopt run`: a non-zero exit and one line naming the offending folder.

Every dataset error's message is tested in tests/test_data.py; these two cases show that
such an error reaches the user of `tlopt run` as that one line: a missing folder before any
run folder is made (exit 2), a split that cannot be made from notebook 00 (a kernel starts).
"""

import shutil

import pytest

from conftest import run_tlopt

pytestmark = pytest.mark.slow


def experiment(tmp_path, root):
    path = tmp_path / "exp.yaml"
    path.write_text(f"run_name: exp\nresults_dir: results\ndata: {{root: {root}, image_size: 32}}\n"
                    "backbones: [VGG16]\nweights: null\n")
    return path


def make_classes(root, source, counts):
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index, image in enumerate(sorted(source.rglob("*.jpg"))[:count]):
            shutil.copy(image, root / name / f"{index}.jpg")


@pytest.mark.parametrize("case, message", [
    ("missing", "error: dataset folder not found: {root}"),
    ("too few images", "DataError: class 'b' has 1 image(s): too few"),
])
def test_bad_dataset_stops_the_run_with_one_line(tmp_path, demo_root, case, message):
    root = tmp_path / "images"
    if case == "too few images":
        make_classes(root, demo_root, {"a": 5, "b": 1})
    result = run_tlopt("run", experiment(tmp_path, root), "--strategy", "shared")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(root=root) in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    if case == "missing":  # checked before the run folder is made: nothing to clean up before a rerun
        assert result.returncode == 2 and not (tmp_path / "results" / "exp").exists()
    else:
        assert (tmp_path / "results" / "exp" / "params.yaml").is_file(), "what was written before is kept"
