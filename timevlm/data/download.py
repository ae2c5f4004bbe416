"""`python -m timevlm.data.download ETTh1 [ETTh2 ...]`: fetch datasets that have a direct URL."""
import sys

from timevlm.data.files import download


def main(argv: list[str]) -> None:
    for name in argv or ["ETTh1", "ETTh2", "ETTm1", "ETTm2"]:
        print(f"{name}: {download(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
