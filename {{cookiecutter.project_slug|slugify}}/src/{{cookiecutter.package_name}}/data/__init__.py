from .custom import CSVDataModule, ImageFolderDataModule
from .mnist import MNISTDataModule
from .text import TextDataModule

__all__ = ["CSVDataModule", "ImageFolderDataModule", "MNISTDataModule", "TextDataModule"]
