from .custom import CSVDataModule, ImageFolderDataModule
from .mnist import MNISTDataModule

__all__ = ["CSVDataModule", "ImageFolderDataModule", "MNISTDataModule"]
