"""Write docs/config.md, the run-config key reference, from the config classes (`--check`: exit 1 if it is stale)."""
import argparse
import sys
from pathlib import Path

from qbara.train.config_reference import config_reference_markdown

PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare: exit 1 when docs/config.md is stale")
    args = parser.parse_args()
    text = config_reference_markdown()
    if args.check:
        current = PATH.read_text() if PATH.exists() else ""
        print(f"{PATH}: {'up to date' if current == text else 'stale: run python3 scripts/config_reference.py'}")
        return 0 if current == text else 1
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
