"""``trainer.precision: auto`` (trainer=gpu, ddp, multinode): the precision chosen by the card.

bfloat16 has float32's range, so bf16 mixed precision needs no loss scaling; but only GPUs of
compute capability 8.0 and up (Ampere: A100, RTX 30xx, and later) run it natively. Older cards
(the T4 and V100 of free notebook services) emulate it, slowly, so there ``auto`` takes float16
mixed precision with Lightning's loss scaler instead (float16's small range would otherwise turn
small gradients into zeros). Where several GPUs are visible the least capable decides, so that
every process of a machine chooses alike. On a CPU or Apple's MPS ``auto`` is float32.

Any other ``trainer.precision`` (``trainer.precision=16-mixed``, a preset's value) is used as
given; the run's summary line says which it was and why."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

AUTO = "auto"
NATIVE_BF16 = (8, 0)  # the first compute capability with bfloat16 tensor cores (Ampere)


def uses_cuda(trainer_cfg) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what Python's platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "an unknown CPU"


def hardware(trainer) -> str:
    """What a run trained on, for metrics.json: ``1x NVIDIA H200`` or ``2 threads of AMD EPYC 7B13``."""
    processes = trainer.world_size
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{processes}x {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":  # Apple's MPS
        return f"{processes}x {device.type}"
    threads = torch.get_num_threads()
    where = f"{processes} processes x " if processes > 1 else ""
    return f"{where}{threads} thread{'s' * (threads != 1)} of {cpu_name()}"


def least_capable_gpu() -> tuple[str, tuple[int, int]]:
    """The name and compute capability of the visible GPU with the lowest capability."""
    cards = [(torch.cuda.get_device_capability(i), torch.cuda.get_device_name(i))
             for i in range(torch.cuda.device_count())]
    capability, name = min(cards)
    return name, capability


def card_precision() -> tuple[str, str]:
    """The mixed precision this machine's GPUs run best, and in words why."""
    name, capability = least_capable_gpu()
    card = f"{name} at compute capability {capability[0]}.{capability[1]}"
    if capability >= NATIVE_BF16:
        return "bf16-mixed", f"bf16-mixed, as {card} runs bfloat16 natively"
    native = f"{NATIVE_BF16[0]}.{NATIVE_BF16[1]}"
    return "16-mixed", f"16-mixed with loss scaling, as {card} has no native bfloat16 ({native} and up)"


def resolve_precision(cfg: DictConfig) -> str | None:
    """Replace ``trainer.precision: auto`` in ``cfg`` by the precision chosen for this machine (the
    run's recorded config then says what it trained with). On a GPU, return the words the run's
    summary line shows for it: the precision and why it is that one; elsewhere None (the summary
    shows Lightning's precision)."""
    trainer = cfg.trainer
    setting = trainer.get("precision")
    cuda = uses_cuda(trainer)
    if setting == AUTO:
        chosen, words = card_precision() if cuda else ("32-true", None)
        with open_dict(cfg):
            trainer.precision = chosen
        return words
    if setting is None or not cuda:  # None: a precision plugin in trainer.plugins decides
        return None
    setting = str(setting)
    if "bf16" in setting and card_precision()[0] != "bf16-mixed":  # used as asked; the user should know the cost
        name, (major, minor) = least_capable_gpu()
        return f"{setting} from trainer.precision; {name} at compute capability {major}.{minor} emulates bfloat16: slow"
    return f"{setting} from trainer.precision"
