"""lm-eval's CLI reads the demo tasks from any working folder: their data files are found beside this file.

A task YAML's ``dataset_kwargs.data_files`` are read by lm-eval relative to the folder it is started in; the
YAMLs name ``custom_dataset: !function demo_data.load``, which lm-eval calls instead, with the same data_files.
The explorer never runs this file: it reads the data files itself (``explorer.taskfiles``), and accepts the line
only beside this exact file.
"""
from pathlib import Path


def load(data_files=None, **_):
    import datasets

    here = Path(__file__).resolve().parent
    files = {split: str(here / name) for split, name in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)
