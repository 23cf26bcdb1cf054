"""What every genlab model shares, language model or GAN: plain optimizer updates, each counted as
a step with the update hooks called around it (``one_update``, genlab.loop.steps), ``torch.compile``
without renaming parameters, and checkpoints that name their model class and carry the random
stream (for an exact resume)."""

from __future__ import annotations

import contextlib
import time

import hydra
import lightning as L
import torch

from genlab.run.checks import compile_mode
from genlab.loop.steps import LoopSettings, check_same_count, count_update, update_hooks


class GenlabModule(L.LightningModule):
    kind = "text"  # the data kind this model consumes ("text" or "image")
    single_pass = False  # True: trained by one pass over the data (counting), not by updates
    # True where a Lightning step may make loop.updates_per_step updates, each on its own batch (the
    # language models); False: one update per step (the GAN's step is one update of both networks)
    several_updates_per_step = False
    updates_per_step = 1  # K, for a fit (genlab.loop.steps.fit)
    monitor: str | None = "loss/val"  # the figure validation measures and best.ckpt minimises; None: none
    loop = LoopSettings()  # conf/loop's settings, given by train.build_model (a loaded model: the defaults)

    def __init__(self):
        super().__init__()
        self._update_hooks = []  # the callbacks that act on updates (genlab.loop.steps.UpdateHook), at the start of training
        self._due_updates = []  # automatic optimization: the hooks called before the update Lightning is making
        self._rate_clock = None  # (time, running total) at the previous rate_since_last_point

    def rate_since_last_point(self, total: int) -> float | None:
        """How fast the running ``total`` (tokens, images) grew since the previous call, per second."""
        now = time.perf_counter()
        previous, self._rate_clock = self._rate_clock, (now, total)
        if previous is None or now <= previous[0]:
            return None
        return (total - previous[1]) / (now - previous[0])

    def log_rate(self, name: str, total: int) -> None:
        rate = self.rate_since_last_point(total)
        if rate is not None:
            self.log(name, rate)

    # --- optimizers from the config (optimizer=, scheduler=: Hydra partials in the hyper-parameters) --
    def configure_optimizers(self):
        if not self.hparams.get("optimizer"):
            return None
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=self.parameter_groups())
        if not self.hparams.get("scheduler"):
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        # stepped after every update: under automatic optimization by Lightning ("interval": "step"; by
        # default it would step once an epoch), under manual optimization by the model's training_step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self):
        """What the optimizer gets; a model may return groups (e.g. no weight decay on norms)."""
        return self.parameters()

    def compiled_modules(self) -> list[torch.nn.Module]:
        """The modules whose ``forward`` ``loop.compile=true`` compiles."""
        return [self]

    def compile_mode(self) -> str | None:
        return compile_mode(self.loop.compile)

    def configure_model(self) -> None:
        """``loop.compile=true``: run ``forward`` through ``torch.compile``. The compiled function replaces
        the bound method on the instance, so parameter names (and checkpoints) are unchanged: no
        ``_orig_mod.`` prefix."""
        mode = self.compile_mode()
        if mode is None:
            return
        for module in self.compiled_modules():
            if "forward" not in vars(module):  # the instance's own forward: compiled already
                module.forward = torch.compile(module.forward, mode=mode)

    @contextlib.contextmanager
    def one_update(self):
        """What a model does inside is one update (the GAN: one step of each network): counted in
        ``trainer.global_step``, with the update hooks that are due called before and after it."""
        due = self.hooks_before_update()
        yield
        count_update(self.trainer)
        self.hooks_after_update(due)

    def hooks_before_update(self) -> list:
        """The update hooks due at the coming update, called before it; returns them."""
        update = self.trainer.global_step + 1
        due = [hook for hook in self._update_hooks if update % hook.every_n_updates == 0]
        for hook in due:
            hook.before_update(self.trainer, self, update)
        return due

    def hooks_after_update(self, due: list) -> None:
        for hook in due:
            hook.after_update(self.trainer, self, self.trainer.global_step)

    # under automatic optimization Lightning makes (and counts) the update: the hooks come around it
    def on_before_optimizer_step(self, optimizer) -> None:
        if self.automatic_optimization:
            self._due_updates = self.hooks_before_update()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.automatic_optimization:
            self.hooks_after_update(self._due_updates)
            self._due_updates = []

    def update(self, optimizer, loss: torch.Tensor, clip: float | None = None) -> None:
        """One optimizer step as a plain loop makes it. Lightning's own path (``manual_backward``,
        ``optimizer.step()``) calls hooks and plugins around every update, which costs a tiny model
        much of its speed (docs/performance.md). Under 16-mixed the loss is scaled with Lightning's gradient
        scaler (its state is saved in checkpoints); the scaler skips an update whose gradients
        overflowed. Under DDP the backward goes through Lightning, which prepares DDP's gradient
        reduction for each backward: several updates (or the GAN's two networks) per step stay in sync."""
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch's
        torch_optimizer.zero_grad(set_to_none=True)
        scaler = self._scaler
        if self._distributed:
            self.manual_backward(loss)  # DDP: readies the gradient all-reduce; scales the loss under 16-mixed
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if scaler is not None:
            scaler.unscale_(torch_optimizer)  # clipping and the step see the true gradients
        if clip:
            params = [p for group in torch_optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(torch_optimizer)
            scaler.update()
        else:
            torch_optimizer.step()

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        """Model-specific state to keep in the checkpoint's "genlab" entry."""
        return {}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["genlab"] = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "rng": torch.get_rng_state(),  # dropout's / the noise's random stream, for an exact resume
            **self.checkpoint_extras(),
        }

    def on_load_checkpoint(self, checkpoint):
        self._rng_to_restore = checkpoint.get("genlab", {}).get("rng")

    def on_train_start(self):
        # looked up once per run: at thousands of updates a second every attribute chain counts
        self._scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed only
        self._distributed = self.trainer.world_size > 1
        self._update_hooks = update_hooks(self.trainer)
        check_same_count(self.trainer, self.updates_per_step)
        if getattr(self, "_rng_to_restore", None) is not None:  # resuming: continue the random stream
            torch.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
