"""The data modules' contract (genlab.data.module.GenlabDataModule): built from settings alone,
their files put on disk by prepare_data() and loaded by setup(), once; and nothing in genlab probes a
data module for what it has."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from genlab.run.checkpoints import genlab_classes
from genlab.data.images import ImageFolderDataModule
from genlab.data.module import GenlabDataModule, ready
from genlab.data.names import NamesDataModule
from genlab.data.text import TextDataModule
from genlab.errors import DataError


def test_every_data_module_of_genlab_keeps_the_contract():
    import lightning as L

    modules = genlab_classes("genlab.data", L.LightningDataModule)
    assert set(modules) >= {"genlab.data.names.NamesDataModule", "genlab.data.text.TextDataModule",
                            "genlab.data.images.ImageFolderDataModule"}
    assert all(issubclass(cls, GenlabDataModule) for cls in modules.values())


@pytest.mark.parametrize("build", [
    lambda missing: NamesDataModule(path=str(missing)),
    lambda missing: TextDataModule(path=str(missing)),
    lambda missing: ImageFolderDataModule(root=str(missing)),
])
def test_building_reads_nothing_and_setting_up_says_what_is_missing(build, tmp_path):
    missing = tmp_path / "nothing-here"
    datamodule = build(missing)  # settings only: no file is looked for yet
    assert datamodule.fingerprint is None
    with pytest.raises(DataError, match=re.escape(str(missing.name))):
        ready(datamodule)


def test_setup_loads_once_however_often_lightning_asks(names_file, tmp_path, monkeypatch):
    datamodule = NamesDataModule(data_dir=tmp_path, path=str(names_file))
    loads = []
    monkeypatch.setattr(datamodule, "load", lambda: loads.append(1) or NamesDataModule.load(datamodule))
    ready(datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("validate")
    assert loads == [1] and datamodule.fingerprint is not None and len(datamodule.names) == 300


def test_nothing_probes_a_data_module_for_what_it_has():
    probing = re.compile(r"\b(hasattr|getattr)\(\s*[\w.]*datamodule\b")
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in sorted((REPO / "src").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if probing.search(line)]
    assert not found, "\n".join(found)


def test_a_data_module_asks_its_model_for_nothing():
    """Data flows to the model, never back: no data module reaches the model through its trainer
    (the image data module's validation noise is given to it by the run)."""
    asking = re.compile(r"\blightning_module\b|\bmodel\.")
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in sorted((REPO / "src/genlab/data").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if asking.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "'"))]
    assert not found, "\n".join(found)
