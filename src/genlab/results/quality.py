"""How good an image model's pictures are: the Frechet Inception Distance (FID, Heusel et al. 2017)
and the Kernel Inception Distance (KID, Binkowski et al. 2018) between generated images and the
held-out real ones (``data.val_fraction``), computed by torchmetrics on InceptionV3 features.

- The extractor is torchmetrics' InceptionV3 on torch-fidelity's weights: the file named by
  ``paths.inception_weights`` (or the ``GENLAB_INCEPTION_WEIGHTS`` variable), else torch hub's cache,
  where the library downloads them on first use. Where they cannot be had, a run says so once and
  trains without the figures; a study that minimises FID refuses to start (``require_weights``).
- ``metrics.images`` images of each side: the first of the held-out split, and the generator's
  images for one fixed noise set (``seed``), so a curve moves only as the model does and a resumed
  run continues it.
- The real images' features are computed once and cached under ``<data_dir>/quality/``, keyed by
  the images' bytes, their size and the extractor's weights.
- Features are extracted once per image and fed to both metrics (an identity "feature" module),
  rather than each metric running the network again."""

from __future__ import annotations

import hashlib
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from genlab.errors import ConfigError
from genlab.run.outputs import atomic_torch_save

log = logging.getLogger("genlab")

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's URL_INCEPTION_V3
WEIGHTS_SETTING, WEIGHTS_ENV = "paths.inception_weights", "GENLAB_INCEPTION_WEIGHTS"
BATCH = 50  # images through the extractor at a time
KID_SUBSET = 1000  # torchmetrics' default subset size, lowered to the images there are
KID_SUBSETS = 100


def hub_file() -> Path:
    """Where torch hub keeps (and downloads) the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def missing_weights_message(err: Exception | None = None) -> str:
    why = f" ({err.__class__.__name__}: {str(err)[:120]})" if err is not None else ""
    return (f"the InceptionV3 weights for FID and KID are not in {hub_file()} and could not be downloaded{why}. "
            f"Fetch {INCEPTION_URL} and set {WEIGHTS_SETTING}=/path/to/file (or {WEIGHTS_ENV}), "
            "or put the file at that path")


def inception_extractor(weights: str | None) -> nn.Module | None:
    """InceptionV3's 2048 pool features of uint8 images (any size: it resizes them to 299x299);
    None, after one warning, where the weights cannot be had."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{WEIGHTS_SETTING}={weights}: no such file; give the InceptionV3 weights "
                              f"({INCEPTION_URL}), or leave it unset to use torch hub's cache ({hub_file()})")
        try:
            return NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path))
        except Exception as err:  # not a weights file: torch.load's or load_state_dict's error
            raise ConfigError(f"{WEIGHTS_SETTING}={weights} holds no InceptionV3 weights ({err.__class__.__name__}: "
                              f"{str(err)[:120]}); fetch them from {INCEPTION_URL}") from None
    try:
        return NoTrainInceptionV3("inception-v3-compat", ["2048"])  # the hub cache, or a download into it
    except Exception as err:  # offline: URLError; a cut-short download: torch.load's error
        log.warning("no FID or KID in this run: %s", missing_weights_message(err))
        return None


def require_weights(weights: str | None) -> None:
    """Before a study that minimises FID: the weights must be there (downloading them if it can)."""
    if not weights and not hub_file().exists():
        try:
            hub_file().parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(hub_file()), progress=False)
        except Exception as err:
            sys.exit(f"error: this study minimises FID, but {missing_weights_message(err)}.")
    inception_extractor(weights)  # a bad paths.inception_weights: its ConfigError


def weights_id(module: nn.Module) -> str:
    """A hash of the extractor's weights: what its features depend on."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (a tanh's output, the data's normalisation) -> uint8 pixels."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class Features(nn.Module):
    """The "feature extractor" handed to torchmetrics: the features are extracted already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class NoiseBatches:
    """Batches of noise as one iterable: Lightning would take a list for several loaders, and gives a
    DataLoader a distributed sampler, where every process should generate the whole set."""

    def __init__(self, batches: tuple[torch.Tensor, ...]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageQuality:
    """FID and KID of an image model against ``datamodule``'s held-out images, ``images`` a side."""

    def __init__(self, extractor: nn.Module, datamodule, images: int, seed: int = 0):
        self.extractor = extractor.eval()
        self.datamodule, self.seed = datamodule, seed
        self.real_count = min(images, len(datamodule.val_paths))
        self.fake_count = images
        self._real: torch.Tensor | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) features of images in [-1, 1], on the images' device."""
        self.extractor.to(images.device)
        # in float32 whatever the run's precision: the real images' features are, and FID compares the two
        with torch.autocast(images.device.type, enabled=False):
            return torch.cat([self.extractor(to_uint8(chunk)) for chunk in images.split(BATCH)]).double()

    def cache_file(self, paths: list[Path]) -> Path:
        made_from = hashlib.sha256()
        for path in paths:
            made_from.update(hashlib.sha256(path.read_bytes()).digest())
        made_from.update(f"|{self.datamodule.image_size}|{weights_id(self.extractor)}".encode())
        return self.datamodule.data_dir / "quality" / f"real.{made_from.hexdigest()[:16]}.pt"

    def real_features(self, device: torch.device) -> torch.Tensor:
        if self._real is None:
            paths, images = self.datamodule.real_images(self.real_count)
            cache = self.cache_file(paths)
            if cache.exists():
                self._real = torch.load(cache, map_location="cpu", weights_only=True)
                log.info("FID: the real images' features from %s", cache)
            else:
                self._real = self.features(images.to(device)).cpu()
                atomic_torch_save(self._real, cache)
                log.info("FID: the features of %d held-out images, cached in %s", len(paths), cache)
        return self._real.to(device)

    def noise_batches(self, latent_shape: tuple[int, ...]) -> "NoiseBatches":
        """The fixed noise the generated images come from (the image model's validation data)."""
        z = torch.randn(self.fake_count, *latent_shape, generator=torch.Generator().manual_seed(self.seed))
        return NoiseBatches(z.split(BATCH))

    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """FID, and KID's mean and spread over subsets, of generated images' features ``fake``."""
        real = self.real_features(fake.device)
        with warnings.catch_warnings():  # KID's note that it keeps every feature: so it does, a few thousand
            warnings.simplefilter("ignore", UserWarning)
            fid = FrechetInceptionDistance(feature=Features(real.shape[1])).to(fake.device)
            subset = min(KID_SUBSET, len(real), len(fake))
            kid = KernelInceptionDistance(feature=Features(real.shape[1]), subsets=KID_SUBSETS,
                                          subset_size=subset).to(fake.device)
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        with torch.random.fork_rng(devices=[fake.device] if fake.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # KID's subsets: the same draw every time, the training stream untouched
            kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def image_quality(cfg, datamodule) -> ImageQuality | None:
    """The run's quality measure, or None (no held-out images, ``metrics.images=0``, no weights)."""
    images = cfg.metrics.images
    if not isinstance(images, int) or isinstance(images, bool) or images < 0 or images == 1:
        raise ConfigError(f"metrics.images={images!r}: give how many images FID and KID compare, at least 2 "
                          "(0: none)")
    if images == 0:
        return None
    if len(datamodule.val_paths) < 2:  # FID needs two images a side for a covariance
        log.warning("no FID or KID in this run: data.val_fraction=%s holds out %d images; raise it",
                    cfg.data.get("val_fraction"), len(datamodule.val_paths))
        return None
    extractor = inception_extractor(cfg.paths.get("inception_weights"))
    return ImageQuality(extractor, datamodule, images, seed=cfg.seed) if extractor is not None else None
