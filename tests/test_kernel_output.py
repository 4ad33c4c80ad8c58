"""What a kernel's libraries write to its file descriptors (TensorFlow's and absl's start-up lines) stays out of
the executed notebooks; what Python code prints stays in."""

import nbformat

from tlopt import cli


def test_native_writes_stay_out_of_an_executed_notebook_and_python_output_stays_in(tmp_path):
    source = tmp_path / "source.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys\n"
        "os.write(2, b'I0000 00:00:1 cpu_feature_guard.cc:227] written by a C++ library\\n')\n"
        "os.write(1, b'native standard output\\n')\n"
        "print('printed')\n"
        "print('warned', file=sys.stderr)\n"
    )]), source)

    cli.execute(source, tmp_path / "executed.ipynb", {})

    outputs = nbformat.read(tmp_path / "executed.ipynb", as_version=4).cells[0].outputs
    text = {output.name: output.text for output in outputs if output.output_type == "stream"}
    assert text == {"stdout": "printed\n", "stderr": "warned\n"}
