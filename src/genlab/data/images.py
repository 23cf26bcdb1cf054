"""Face images (``data=celeba``): CelebA's aligned faces or any folder of images (flat, or
ImageFolder's one folder per class), as the notebook prepares them: ``Resize(64)``,
``CenterCrop(64)``, ``Normalize(0.5, 0.5)`` -> tensors in [-1, 1].

A seeded ``val_fraction`` of the images is held out (the same images every run with that seed and
folder): the real images that FID and KID compare generated ones with (``genlab.results.quality``).

Where ``data.root`` is not given, the data mirror's ``faces/celeba`` is used when it exists (a
10,000-image subset of ``img_align_celeba``), else torchvision downloads CelebA into
``data_dir``; its Google Drive host is often over quota, and the error then says how to point
``data.root`` at a manual download."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from genlab.data.module import GenlabDataModule
from genlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# data.num_workers=auto's ceiling: enough JPEG-decoding workers to keep one large GPU busy with the
# notebook DCGAN (make gpu-check compares auto with 4 workers; docs/performance.md)
MAX_AUTO_WORKERS = 8


def worker_count(num_workers: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a count (0: decode in the training process), or ``auto``: one decoding
    worker for each core of this process's share of the machine (``processes`` training processes
    on it) but the one that trains, at least 1 and at most ``MAX_AUTO_WORKERS``."""
    if num_workers == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(MAX_AUTO_WORKERS, max(1, cores // max(1, processes) - 1))
    if isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0:
        return num_workers
    raise ConfigError(f"data.num_workers={num_workers!r}: give a number of decoding processes (0: decode in the "
                      "training process) or auto (one per spare core, at most 8)")


def readable_images(root: Path) -> tuple[list[Path], int]:
    """The decodable images under ``root`` (any depth), and how many files failed to decode."""
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    good, bad = [], 0
    for path in candidates:
        try:
            with Image.open(path) as image:
                image.verify()  # reads the headers and checks the structure, without decoding pixels
            good.append(path)
        except Exception:
            bad += 1
    return good, bad


def folder_fingerprint(root: Path, paths: list[Path]) -> str:
    """The images' fingerprint, which the run's plan compares (``genlab.run.plan``): each image's path
    under ``root``, size and modification time (whole seconds), in order; read from the file system
    alone, so it costs no image's bytes. An image added, removed, renamed, replaced or edited makes
    another plan, and so does a copy of the folder that does not keep the times (``cp`` without ``-p``);
    the folder moved elsewhere does not."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()


class ImageFiles(Dataset):
    """The images, decoded on demand (in DataLoader workers). The folder check reads headers only,
    so a file cut short is found here: it is skipped (the next image takes its place, so batches
    stay full), named and counted in the log, and never ends the run."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform
        self.unreadable: set[int] = set()  # per worker process: each warns about a bad file once

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            if i in self.unreadable:
                continue
            try:
                with Image.open(self.paths[i]) as image:
                    return self.transform(image.convert("RGB"))
            except Exception as err:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
                self.unreadable.add(i)
                log.warning("skipped %s: it cannot be decoded (%s); %d unreadable image(s) skipped so far",
                            self.paths[i], err, len(self.unreadable))
        raise DataError(f"none of the {len(self.paths)} images could be decoded; check the folder's files")


class ImageFolderDataModule(GenlabDataModule):
    kind = "image"

    def __init__(self, root: str | None = None, data_dir: str = "data", mirror: str | None = None,
                 image_size: int = 64, batch_size: int = 128, num_workers: int | str = "auto",
                 val_fraction: float = 0.05, seed: int = 42):
        super().__init__()
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction!r}: give the share of the images held out for "
                              "FID and KID, from 0 (none: no quality figures) to below 1, e.g. 0.05")
        worker_count(num_workers)  # a bad value is refused before anything is read
        self.given_root, self.mirror = root, mirror
        self.data_dir = Path(data_dir)
        self.image_size, self.batch_size, self.num_workers, self.seed = image_size, batch_size, num_workers, seed
        self.val_fraction = val_fraction
        # what an image model validates on: the fixed noise it generates from for FID and KID, whose
        # count and seed are the quality measure's (genlab.results.quality.ImageQuality.noise_batches, given
        # by genlab.cli.train); none: no validation
        self.validation_noise = []

    def download(self) -> None:
        self.root = Path(self.given_root).expanduser() if self.given_root else self._default_root(self.data_dir,
                                                                                                   self.mirror)

    def load(self) -> None:
        image_size, batch_size, val_fraction, seed = self.image_size, self.batch_size, self.val_fraction, self.seed
        if not self.root.is_dir():
            raise DataError(f"data.root={self.root} is not a folder; give a folder of images (flat or one "
                            "sub-folder per class)")
        paths, bad = readable_images(self.root)
        if not paths:
            raise DataError(f"no readable image (.jpg, .png, ...) in {self.root}; point data.root at a folder of images")
        if bad:
            log.warning("%s: skipped %d file(s) that could not be decoded as images", self.root, bad)
        self.fingerprint = folder_fingerprint(self.root, paths)
        held_out = set(torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
                       [: int(len(paths) * val_fraction)].tolist())
        self.paths = [p for i, p in enumerate(paths) if i not in held_out]  # the training images
        self.val_paths = [p for i, p in enumerate(paths) if i in held_out]
        if len(self.paths) < batch_size:  # batches are whole (drop_last): fewer images would train 0 steps
            raise DataError(f"{self.root} has {len(paths)} readable images, {len(self.paths)} of them for training "
                            f"(data.val_fraction={val_fraction} held out), fewer than one batch of "
                            f"data.batch_size={batch_size}; add images or lower data.batch_size")
        self.skipped = bad
        self.transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])
        log.info("%s: %d images at %dx%d (%d for training, %d held out)", self.root, len(paths), image_size,
                 image_size, len(self.paths), len(self.val_paths))

    def model_sizes(self) -> dict:
        return {"image_size": self.image_size}

    @staticmethod
    def _default_root(data_dir: Path, mirror: str | None) -> Path:
        if mirror and (Path(mirror) / "faces" / "celeba").is_dir():
            return Path(mirror) / "faces" / "celeba"
        target = data_dir / "celeba"
        if (target / "celeba" / "img_align_celeba").is_dir():
            return target / "celeba" / "img_align_celeba"
        try:
            from torchvision.datasets import CelebA

            CelebA(str(target), split="all", download=True)
        except Exception as err:
            raise DataError(
                f"could not download CelebA through torchvision ({err.__class__.__name__}: {str(err)[:200]}). "
                "Its host is often over quota: download img_align_celeba.zip from the CelebA site "
                "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html), unzip it, and pass "
                "data.root=/path/to/img_align_celeba (any folder of face images works)."
            ) from None
        return target / "celeba" / "img_align_celeba"

    def train_dataloader(self):
        processes = self.trainer.num_devices if self.trainer is not None else 1  # DDP: one per device here
        workers = worker_count(self.num_workers, processes)
        return DataLoader(ImageFiles(self.paths, self.transform), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return self.validation_noise

    def real_images(self, n: int) -> tuple[list[Path], torch.Tensor]:
        """The first ``n`` held-out images (their files, and the images as the model sees them)."""
        paths = self.val_paths[:n]
        images = ImageFiles(paths, self.transform)
        return paths, torch.stack([images[i] for i in range(len(paths))]) if paths else torch.empty(0)
