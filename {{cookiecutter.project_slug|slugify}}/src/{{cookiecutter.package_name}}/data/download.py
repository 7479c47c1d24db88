"""Fetch the MNIST-family files now, for a machine that will train without internet.

    python -m {{ cookiecutter.package_name }}.data.download mnist fashion_mnist --data_dir data

Run it where there is internet (a cluster's login node, say), then train where there is none:
the files land in `<data_dir>/<name>/`, the folder the configs read. It is the same MD5-checked
download that `fit` does, so a file that is already there is not fetched again.
"""

import argparse
import sys

from ..errors import UserError, print_error
from .mnist import DATASETS, FILES, MNISTDataModule

NAMES = [name for name, info in DATASETS.items() if "embedded" not in info]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.data.download",
        description="Download MNIST-family datasets into the folder the configs read.",
    )
    parser.add_argument("names", nargs="+", choices=NAMES, metavar="NAME", help=f"one or more of: {', '.join(NAMES)}")
    parser.add_argument("--data_dir", "--data-dir", default="data", help="the configs' data_dir (default: data)")
    parser.add_argument("--mirror", help="a base URL to download from instead of the public mirrors")
    args = parser.parse_args(argv)
    for name in dict.fromkeys(args.names):
        data = MNISTDataModule(data_dir=args.data_dir, name=name, mirror=args.mirror)
        try:
            data.prepare_data()
        except UserError as err:
            return print_error(err)
        print(f"{name}: ready in {data.folder_of(FILES[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
