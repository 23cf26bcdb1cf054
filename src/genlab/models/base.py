"""The shared base of every language model: (B, T) token ids -> (B, T, V) next-token logits.

A subclass defines the network (``__init__`` and ``forward``); this base does the rest: the loss
(mean cross-entropy over real targets, -1 marks padding), training with manual optimization,
exact validation and test losses, optimizers and schedulers from Hydra configs, and ``generate``.

Speed: a tiny model's update takes well under a millisecond, less than Lightning's per-step
bookkeeping. With ``loop.updates_per_step = K`` one Lightning step gets K batches at once
(``genlab.loop.steps.UpdateGroup``) and makes K optimizer updates, each on its own batch, exactly as a
plain loop would; ``trainer.global_step`` still counts optimizer updates, so ``trainer.max_steps``
means updates, and the training curves get a point every ``trainer.log_every_n_steps`` updates
whatever K is. A subclass never sees K: it may override ``training_update``, one update on one batch.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from genlab.data.tokenizer import tokenizer_from_config
from genlab.errors import TrainingDiverged
from genlab.models.module import GenlabModule
from genlab.models.compiled_update import CUDA_GRAPH_MODES, CompiledUpdate
from genlab.loop.steps import TrainingCurve, batches_of, real_targets, updates_left


# dense bf16 peak FLOP/s of common accelerators (vendor data sheets), for MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def attached_trainer(module):
    """The module's trainer, None where it has none (``module.trainer`` raises there)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def vocab_size_of(tokenizer: dict) -> int:
    return len(tokenizer["chars"]) if tokenizer["type"] == "char" else 50257


class LanguageModel(GenlabModule):
    kind = "text"
    several_updates_per_step = True
    block_size: int | None = None  # tokens each prediction sees; None: unbounded (recurrent)
    # True where the context is what the model can read at all (a GPT's position table), so a
    # longer prompt would be cut; False where a fixed window slides over any text (MLP, WaveNet)
    reads_whole_context = False
    eval_logits = 1 << 24  # the most logits an evaluation computes at once (64 MiB of float32)

    def __init__(
        self,
        tokenizer: dict,
        seq_len: int,
        sequential: bool = False,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vocab_size = vocab_size_of(tokenizer)
        self.seq_len = seq_len
        # data.sampling=sequential: consecutive training batches continue each other row by row (text
        # read in order), so a recurrent model may carry its state from one batch to the next
        self.sequential = sequential
        self._eval_totals = None
        self.tokens_seen = 0  # real target tokens trained on, for tokens/s
        self.training_words: list[str] | None = None  # set for names: sampling measures novelty
        self.step_losses: list[torch.Tensor] = []  # the losses of the last Lightning step's updates
        self.best_val_loss = math.inf  # the lowest validation loss so far (kept in checkpoints)
        self.compiled_update: CompiledUpdate | None = None  # loop.compile: set at the start of training
        self.curve = TrainingCurve(1)  # the training curves' points (set at the start of training)
        self._curve_to_restore: list[float] = []  # a resumed run's open window of the curve

    # --- what the insight callback looks at (genlab.insight) ------------------------------------
    def tanh_layers(self) -> dict[str, torch.nn.Module]:
        """Named tanh layers (``nn.Tanh``, or a vanilla ``nn.RNN`` whose outputs are tanh's)."""
        return {}

    def token_embeddings(self) -> torch.nn.Embedding | None:
        """The table of token vectors, if the model has one."""
        return getattr(self, "embedding", None)

    def count_table(self) -> torch.Tensor | None:
        """A square (V, V) table of counts of (this token, next token), if the model is one."""
        return None

    # --- the loss ------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)

    # --- training ------------------------------------------------------------------------------
    def training_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One update on one batch (x, y); returns its loss. The loop counts it and calls the
        update hooks around it. A model that learns otherwise (the counting bigram: a batch
        counted into its table) overrides this, and returns None where it has no loss."""
        if self.compiled_update is not None:
            return self.compiled_update(x, y)
        loss = self.loss(self.training_forward(x, y), y)
        self.update(self._training_optimizer, loss, clip=self.loop.grad_clip)
        return loss

    def training_step(self, batch, batch_idx):
        scheduler = self.lr_schedulers()
        losses = []
        # the last group may hold more updates than are left before trainer.max_steps
        updates = min(self.updates_per_step, updates_left(self.trainer))
        for x, y in itertools.islice(batches_of(batch), updates):
            with self.one_update():
                loss = self.training_update(x, y)
            if scheduler is not None:
                scheduler.step()
            if loss is not None:
                losses.append(loss.detach())
        self.tokens_seen += real_targets(batch, updates)
        self.step_losses = losses  # every update's loss, for the insight callback's curves
        if not losses:
            return None
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.global_step}; lower the "
                "learning rate or clip gradients (loop.grad_clip).", step=self.global_step)
        points = self.curve.add(losses, self.global_step)
        if points:
            tokens_per_second = self.rate_since_last_point(self.tokens_seen)  # one figure for the step's points
            lr = self._training_optimizer.param_groups[0]["lr"]
            for update, value in points:
                self.log_training_point(update, value, lr, tokens_per_second)
        return loss  # Lightning's LR finder reads the loss from here

    def log_training_point(self, update: int, loss: float, lr: float, tokens_per_second: float | None) -> None:
        """A point of the training curves (every ``trainer.log_every_n_steps`` updates, see
        ``genlab.loop.steps.TrainingCurve``), written at its update, whatever Lightning step it falls in;
        the progress bar shows the latest."""
        metrics = {"loss/train": loss, "optimizer/lr": lr}
        if tokens_per_second is not None:
            metrics["perf/tokens_per_second"] = tokens_per_second
            peak = peak_flops(self.device)
            if peak and hasattr(self, "flops_per_token"):
                metrics["perf/mfu"] = self.flops_per_token() * tokens_per_second / peak
        for logger in self.loggers:
            logger.log_metrics(metrics, step=update)
        self.log("loss/train", loss, prog_bar=True, logger=False)

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, dict]:
        """What ``forward`` takes in training (args, kwargs); a model that needs the targets' padding
        mask (BatchNorm statistics) adds it."""
        return (x,), {}

    def training_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logits for a training batch; a model that carries state between batches overrides this."""
        args, kwargs = self.training_inputs(x, y)
        return self(*args, **kwargs)

    def whole_update_compiles(self) -> bool:
        """Whether this model's update can be compiled whole (``CompiledUpdate``): not where
        ``training_forward`` carries state from batch to batch."""
        return type(self).training_forward is LanguageModel.training_forward

    def compiles_whole_update(self) -> bool:
        """Whether ``loop.compile`` compiles the whole update in this run: where it can, but not
        under DDP (its gradients go through DDP's reducer) or 16-mixed (the loss scaler), which
        compile ``forward`` instead; nor outside training (sampling compiles ``forward``)."""
        trainer = attached_trainer(self)
        return (trainer is not None and trainer.state.fn == "fit" and trainer.world_size == 1
                and str(trainer.precision) != "16-mixed" and self.whole_update_compiles())

    def on_train_start(self):
        super().on_train_start()
        self.compiled_update = None
        self.curve = TrainingCurve(self.trainer.log_every_n_steps)
        self.curve.restore(self._curve_to_restore)
        self._curve_to_restore = []
        # looked up once per run: at thousands of updates a second every lookup counts
        self._training_optimizer = self.optimizers() if self.trainer.optimizers else None
        if self.compile_mode() and self.compiles_whole_update():
            optimizer = self._training_optimizer
            widths = self.trainer.datamodule.training_widths()
            self.compiled_update = CompiledUpdate(self, getattr(optimizer, "optimizer", optimizer),
                                                  self.loop.grad_clip, widths, self.compile_mode())

    def compiled_modules(self):
        return [] if self.compiles_whole_update() else [self]

    def timed_compiled_update(self, optimizer, device: torch.device) -> CompiledUpdate | None:
        """The compiled whole update that ``loop.compile`` will train this model with, for ``auto``
        to time (``genlab.loop.steps.measure_update_seconds``); None where the update is not compiled
        whole. Timed without CUDA graphs: a copy's graphs would hold their own memory."""
        mode = self.compile_mode()
        if mode is None or not self.whole_update_compiles():
            return None
        return CompiledUpdate(self, optimizer, self.loop.grad_clip,
                              mode="default" if device.type == "cuda" and mode in CUDA_GRAPH_MODES else mode)

    def log_step(self) -> None:
        """Lightning's x-axis counts its own steps; a logged "step" makes it optimizer updates."""
        self.log("step", float(self.global_step))

    # --- evaluation: exact mean over every real target of the split -------------------------
    def characters_per_token(self) -> torch.Tensor:
        """(V,) the characters each token id stands for, on the model's device (for bits per
        character), from the data's tokenizer, or the checkpoint's where there is no data module."""
        table = getattr(self, "_characters_per_token", None)
        if table is None or table.device != self.device:
            trainer = attached_trainer(self)
            datamodule = trainer.datamodule if trainer is not None else None
            tokenizer = datamodule.tokenizer if datamodule is not None else tokenizer_from_config(self.hparams.tokenizer)
            table = torch.tensor(tokenizer.characters_per_token(), dtype=torch.float64, device=self.device)
            self._characters_per_token = table
        return table

    def _eval_step(self, batch):
        x, y = batch
        # an evaluation batch's logits at once would be (B, T, V): with GPT-2's 50,257 tokens 64 rows of
        # 64 hold 206M, with their softmax 1.6 GB; rows are evaluated a few at a time instead
        rows = max(1, self.eval_logits // max(1, y[0].numel() * self.vocab_size))
        summed = sum(self.loss(self(xs), ys, reduction="sum") for xs, ys in zip(x.split(rows), y.split(rows)))
        real = y >= 0
        # characters of the targets evaluated (a sample of a split counts the sample's own); masked,
        # not indexed by the mask, which would wait for the GPU
        characters = (self.characters_per_token()[y.clamp(min=0)] * real).sum()
        totals = torch.stack([summed.double(), real.sum().double(), characters])
        self._eval_totals = totals if self._eval_totals is None else self._eval_totals + totals

    def _eval_end(self, stage: str):
        if self._eval_totals is None:
            return
        totals = self.trainer.strategy.reduce(self._eval_totals, reduce_op="sum")
        self._eval_totals = None
        loss = (totals[0] / totals[1]).float()
        self.log(f"loss/{stage}", loss, sync_dist=False)
        # bits per character: one scale for every tokenizer (nats over the split's characters, in bits)
        self.log(f"loss/{stage}_bpc", (totals[0] / totals[2] / math.log(2)).float(), sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            # the best so far, so that TensorBoard's HPARAMS (which shows a curve's last value) has it
            self.best_val_loss = min(self.best_val_loss, loss.item())
            self.log("loss/best_val", self.best_val_loss, sync_dist=False)
        self.log_step()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    # --- sampling ------------------------------------------------------------------------------
    def next_token_logits(self, idx: torch.Tensor, state=None):
        """Logits for the token after ``idx`` (B, T); recurrent models carry ``state`` instead of
        re-reading the context."""
        if self.block_size is not None:
            idx = idx[:, -self.block_size :]
        return self(idx)[:, -1], None

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``idx`` (B, T) by sampling ``max_new_tokens`` tokens; stops early once every row has
        produced ``eos_id``."""
        for idx in self.generate_stream(idx, max_new_tokens, temperature, top_k, eos_id, generator):
            pass
        return idx

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """``generate`` one token at a time: yields ``idx`` extended by each new token, so a caller
        keeps what was made when it stops early (Ctrl-C). Runs in eval mode (BatchNorm uses its
        running statistics, dropout is off)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
            logits, state = self.next_token_logits(idx)
            for step in range(max_new_tokens):
                logits = logits.float() / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat([idx, nxt], dim=1)
                yield idx
                if eos_id is not None:
                    done |= nxt[:, 0] == eos_id
                    if done.all():
                        break
                if step + 1 < max_new_tokens:
                    logits, state = self.next_token_logits(idx, state)
        finally:
            self.train(was_training)

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        # the count auto chose, kept for a resume (genlab.loop.steps.resolve_updates_per_step)
        return {"training_words": self.training_words, "best_val_loss": self.best_val_loss,
                "updates_per_step": self.updates_per_step, "curve_window": self.curve.state()}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.best_val_loss = checkpoint.get("genlab", {}).get("best_val_loss", math.inf)
        self._curve_to_restore = checkpoint.get("genlab", {}).get("curve_window", [])
