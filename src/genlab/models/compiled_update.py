"""``loop.compile=true``: one optimizer update (forward, loss, backward, gradient clipping and the
optimizer's step) as one ``torch.compile(fullgraph=True)`` graph, on public torch APIs only.

Compiling only ``forward`` leaves the backward, the optimizer and the Python between them eager;
on a small network that Python is most of an update's time. Here the gradients are taken
functionally (``torch.func.grad_and_value`` over ``functional_call``) and the step is torch's own
functional optimizer (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``: the maths
``torch.optim.SGD``/``Adam``/``AdamW`` run) on the optimizer's own state (``optimizer.state``), so
checkpoints, resumes and an eager run read and write the same state. The learning rates go in as a
tensor, so a scheduler changes them without a recompile. (``optimizer.step()`` itself cannot join
the gradients' graph: its hooks and bookkeeping break it.)

Sequence widths vary from batch to batch (names of different lengths): batches are padded up to a
multiple of ``WIDTH_STEP`` (padding predicts nothing: targets -1), so a run compiles a handful of
graphs, not one per width, and all of them before its first update, so that no compilation lands
midway when a rare long name first comes. ``torch.compile`` checks before every call that all a
graph read is as it was compiled for: hundreds of checks (every parameter, state tensor and module
attribute), a large share of a small model's update. The parameters, buffers and optimizer state
are the same tensors at every update and the model's code does not change within a run, so the
graphs keep only the checks that can fail in one (``guards_that_can_change``): the batch's shape,
the modules' training mode and torch's global state (grad mode, threads, autocast).

BatchNorm's running statistics are buffers that the forward updates in place: they go into the
differentiated function as inputs, which ``torch.func`` allows to be mutated."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from genlab.errors import ConfigError
from genlab.loop.steps import pad_to

WIDTH_STEP = 8  # sequence widths are padded up to a multiple of this (a graph per padded width)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


class CompiledUpdate:
    def __init__(self, model, optimizer: torch.optim.Optimizer, clip: float | None, widths: list[int] | None = None,
                 mode: str = "default"):
        """``widths``: the widths the training batches can have (the data module's ``training_widths``),
        compiled for at the first update; None: each when it first comes. ``mode``: torch.compile's;
        on a GPU, reduce-overhead and max-autotune replay each update as a CUDA graph."""
        check_supported(optimizer)
        self.model, self.optimizer, self.clip = model, optimizer, clip
        on_gpu = next(model.parameters()).is_cuda
        self.cuda_graphs = mode in CUDA_GRAPH_MODES and on_gpu
        self.widths = sorted({self.padded(w) for w in widths or []})
        self.lr_values, self.lrs = None, None  # the learning rates as the graphs take them (a tensor)
        self.adam = isinstance(optimizer, torch.optim.Adam)  # AdamW is an Adam (decoupled weight decay)
        self.step = adam_step if self.adam else sgd_step
        names = {id(p): name for name, p in model.named_parameters()}
        # each group's parameter names and settings but the learning rate, which goes in as a
        # tensor: the graph reads only these, so a scheduler's new learning rate does not recompile it
        self.groups = [([names[id(p)] for p in group["params"]],
                        {key: value for key, value in group.items() if key not in ("params", "lr")})
                       for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.init_state(p, group)
        # the optimizer's state, parameter by parameter in group order (the same dicts at every update)
        self.states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
        # views of the parameters and buffers, updated in place (the same tensors at every update)
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}
        # a graph per padded width the data can give, and past torch.compile's recompile limit (8 by
        # default) a fullgraph compile fails: a word list whose longest word is long gives more
        graphs = len({self.padded(w) for w in range(1, model.seq_len + 1)} | set(self.widths))
        torch.compiler.config.recompile_limit = max(torch.compiler.config.recompile_limit, graphs)
        # compiled functions are cached per function, across instances: a process trains one run at a
        # time (a sweep's jobs one after another), so the previous run's graphs go rather than fill the cache
        torch.compiler.reset()
        # static shapes: one graph per padded width (automatic dynamic shapes would run slower kernels)
        if mode == "default":
            # on the CPU the code that calls the kernels (and allocates their outputs) is compiled to
            # C++ too, not run as Python: a measurable share of a small model's update
            settings = {"options": {"guard_filter_fn": guards_that_can_change, "cpp_wrapper": not on_gpu}}
        else:  # torch.compile takes a mode or options, not both: a named mode keeps all its checks
            settings = {"mode": mode}
        self.graph = torch.compile(self.update, fullgraph=True, dynamic=False, **settings)

    def init_state(self, p: torch.Tensor, group: dict) -> None:
        """The state torch.optim would create at its first step, where there is none yet."""
        state = self.optimizer.state[p]
        if self.adam:
            for name in ("exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if group["amsgrad"] else [])):
                state.setdefault(name, torch.zeros_like(p, memory_format=torch.preserve_format))
            # a tensor on the parameter's device: counting it inside the graph needs no sync
            state["step"] = torch.as_tensor(state.get("step", 0.0), dtype=torch.float32).to(p.device)
        elif group["momentum"]:
            state.setdefault("momentum_buffer", torch.zeros_like(p))  # dampening 0: zero, then the first gradient

    def padded(self, width: int) -> int:
        return min(-(-width // WIDTH_STEP) * WIDTH_STEP, max(self.model.seq_len, width))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        width, padded = x.shape[1], self.padded(x.shape[1])
        if padded > width:
            x, y = pad_to(x, y, padded)
        elif not (x.is_contiguous() and y.is_contiguous()):  # a view into its training item: the graphs' layout
            x, y = x.contiguous(), y.contiguous()
        lrs = self.learning_rates(x.device)
        if self.widths:
            self.compile_widths(x, y, lrs)
        loss = self.graph(self.params, self.buffers, self.states, x, y, lrs)
        return loss.clone() if self.cuda_graphs else loss  # the graph's next replay overwrites its output

    def learning_rates(self, device: torch.device) -> torch.Tensor:
        """The groups' learning rates as one tensor, made anew only when a scheduler changed them."""
        values = [group["lr"] for group in self.optimizer.param_groups]
        if values != self.lr_values:
            self.lr_values, self.lrs = values, torch.tensor(values, device=device)
        return self.lrs

    def compile_widths(self, x: torch.Tensor, y: torch.Tensor, lrs: torch.Tensor) -> None:
        """Compile the graph of every width in ``self.widths`` by running it on a batch of zeros,
        with the parameters, buffers, optimizer state and random stream put back after. (Run on the
        tensors themselves: graphs compiled on copies would not be the ones the updates call.)"""
        widths, self.widths = self.widths, []
        state = [*self.params.values(), *self.buffers.values(), *(t for s in self.states for t in s.values())]
        saved = [t.clone() for t in state]
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            for width in widths:
                zeros = x.new_zeros((x.shape[0], width))
                self.graph(self.params, self.buffers, self.states, zeros, y.new_zeros(zeros.shape), lrs)
        with torch.no_grad():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)

    def loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.model.training_inputs(x, y)
        return self.model.loss(functional_call(self.model, (params, buffers), args, kwargs), y)

    def update(self, params, buffers, states, x, y, lrs):
        grads, loss = grad_and_value(self.loss)(params, buffers, x, y)
        if self.clip:  # torch.nn.utils.clip_grad_norm_'s scaling, on the gradients the graph holds
            scale = torch.clamp(self.clip / (torch.nn.utils.get_total_norm(list(grads.values())) + 1e-6), max=1.0)
            grads = {name: g * scale for name, g in grads.items()}
        first = 0
        with torch.no_grad():
            for g, (names, settings) in enumerate(self.groups):
                group_states = states[first:first + len(names)]
                first += len(names)
                self.step([params[n] for n in names], [grads[n] for n in names], group_states, lrs[g], settings)
        return loss.detach()


def guards_that_can_change(entries) -> list[bool]:
    """torch.compile's ``guard_filter_fn``: which of a graph's checks to keep. Those on the batch
    (``x``, ``y``: its shape picks the width's graph) and on the learning rates, the modules'
    training mode and torch's global state (nameless); not those on what ``CompiledUpdate`` holds
    fixed for a run: its parameters, buffers, optimizer state, settings and the model's code."""
    return [entry.name in ("x", "y", "lrs", "") or entry.name.endswith(".training") for entry in entries]


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """The optimizers and options the compiled update runs; anything else is refused."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        raise ConfigError(f"loop.compile=true compiles the whole update for SGD, Adam and AdamW, not {name}; "
                          "use one of those (optimizer=sgd or optimizer=adamw) or loop.compile=false")
    for group in optimizer.param_groups:
        unsupported = [key for key in ("differentiable", "dampening") if group.get(key)]
        if unsupported:
            raise ConfigError(f"loop.compile=true: {name} with {', '.join(unsupported)} is not compiled into "
                              "the whole update; leave them at their defaults or set loop.compile=false")


# SGD takes torch's foreach form: in torch 2.14.1 Inductor fuses the single-tensor form's weight
# decay, grad.add(param, alpha=wd) on a gradient straight from a matmul, into addmm and drops alpha
# (a weight decay of 1); tests/test_compiled_update.py's SGD weight-decay test catches it. Adam's
# foreach form, with a tensor learning rate, needs capturable=True.
def sgd_step(params: list, grads: list, states: list[dict], lr: torch.Tensor, group: dict) -> None:
    """torch.optim.SGD's step, by torch's functional SGD."""
    buffers = [state["momentum_buffer"] for state in states] if group["momentum"] else [None] * len(params)
    sgd(params, grads, buffers, foreach=True, lr=lr, weight_decay=group["weight_decay"],
        momentum=group["momentum"], dampening=0, nesterov=group["nesterov"],
        maximize=group["maximize"])


def adam_step(params: list, grads: list, states: list[dict], lr: torch.Tensor, group: dict) -> None:
    """torch.optim.Adam's step (AdamW's: decoupled weight decay), by torch's functional Adam."""
    beta1, beta2 = group["betas"]
    adam(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states],
        foreach=True, capturable=True, decoupled_weight_decay=group.get("decoupled_weight_decay", False), amsgrad=group["amsgrad"],
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
        maximize=group["maximize"])
