"""Where the repository's parts are, for the tests in every folder, and the tools as modules."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TOOLS = ROOT / "tools"
# The session's dge_synthetic_* datasets (tests/conftest.py), small enough for CPU training
# tests: 12 train / 4 val images of 128×160.
SMALL_DATA = dict(num_train=12, num_val=4, image_size=(128, 160))


def load_tool(name: str):
    """tools/<name>.py as a module (its ``main(argv)`` callable in the test's process)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def read_csv(path) -> list:
    """The rows of a CSV file a tool wrote, as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
