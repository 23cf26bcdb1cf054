"""``loop.compile=true``: one optimizer update (forward, loss, backward, gradient clipping and the
optimizer's step) as one ``torch.compile(fullgraph=True)`` graph.

Compiling only ``forward`` leaves the backward, the optimizer and the Python between them eager;
on a small network that Python is most of an update's time. Here the gradients are taken
functionally (``torch.func.grad_and_value`` over ``functional_call``), and the optimizer's step is
written out in tensor operations on the optimizer's own state (``optimizer.state``, in the names
torch.optim uses), so checkpoints, resumes and an eager run read and write the same state.

The optimizers: ``torch.optim.SGD`` (momentum, weight decay, Nesterov) and ``torch.optim.Adam`` /
``AdamW``; other options are refused with the setting to change. The learning rates go in as a
tensor, so a scheduler changes them without a recompile. Sequence widths vary from batch to batch
(names of different lengths): batches are padded up to a multiple of ``WIDTH_STEP`` (padding
predicts nothing: targets -1), so a run compiles a handful of graphs, not one per width, and all of
them before its first update, so that no compilation stops a run midway when a rare long name
first comes. Each is compiled ahead of time for its shape and then called without
``torch.compile``'s per-call checks (``CompiledUpdate.graph``).

BatchNorm's running statistics are buffers that the forward updates in place: they go into the
differentiated function as inputs, which ``torch.func`` allows to be mutated."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.func import functional_call, grad_and_value

from genlab.errors import ConfigError
from genlab.steps import pad_to

WIDTH_STEP = 8  # sequence widths are padded up to a multiple of this (a graph per padded width)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


class CompiledUpdate:
    def __init__(self, model, optimizer: torch.optim.Optimizer, clip: float | None, widths: list[int] | None = None,
                 mode: str = "default"):
        """``widths``: the widths the training batches can have (the data module's ``training_widths``),
        compiled for at the first update; None: each when it first comes. ``mode``: torch.compile's;
        on a GPU, reduce-overhead and max-autotune replay each update as a CUDA graph."""
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.cuda_graphs = mode in CUDA_GRAPH_MODES and next(model.parameters()).is_cuda
        # torch.compile's own dispatch (CUDA graphs) compiles a width by running it: widths come as they come
        self.widths = [] if self.cuda_graphs else sorted({self.padded(w) for w in widths or []})
        self.graphs: dict[tuple, Callable] = {}  # (batch shape, training mode) -> the update compiled for it
        self.lr_values, self.lrs = None, None  # the learning rates as the graphs take them (a tensor)
        self.adam = isinstance(optimizer, torch.optim.Adam)  # AdamW is an Adam (decoupled weight decay)
        check_supported(optimizer)
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.groups = [[self.names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        # the groups' settings but the learning rate, which goes in as a tensor (a scheduler changes it):
        # the graph reads only these, so a new learning rate does not recompile it
        self.settings = [{key: value for key, value in group.items() if key not in ("params", "lr")}
                         for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.init_state(p, group)
        # the optimizer's state, parameter by parameter in group order (the same dicts at every update)
        self.states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
        # views of the parameters and buffers, updated in place (the same tensors at every update)
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}
        if self.cuda_graphs:  # the state stays where it is: a CUDA graph updates it in place
            for t in [*self.params.values(), *self.buffers.values(), *(v for s in self.states for v in s.values())]:
                torch._dynamo.mark_static_address(t)
        # graphs are cached per function, across instances: a process trains one run at a time (a
        # sweep's jobs one after another), so the previous run's graphs go rather than fill the cache
        torch._dynamo.reset()
        # static shapes: one graph per padded width (automatic dynamic shapes would run slower kernels)
        if self.cuda_graphs:
            self.compiler = torch.compile(self.update, fullgraph=True, dynamic=False, mode=mode)
        else:  # compiled ahead of time and called without guards (see graph): none are kept
            if torch.compiler.config.force_disable_caches:  # aot_compile refuses to run without them
                raise ConfigError("loop.compile=true compiles each update ahead of time, which needs "
                                  "torch.compile's caches, and they are disabled: unset "
                                  "TORCHINDUCTOR_FORCE_DISABLE_CACHES, or set loop.compile=false")
            options = {key: value for key, value in torch._inductor.list_mode_options(mode).items()
                       if key != "triton.cudagraphs"}
            options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
            # on the CPU the code that calls the kernels (and allocates their outputs) is compiled to
            # C++ too, not run as Python: a measurable share of a small model's update
            options["cpp_wrapper"] = not next(model.parameters()).is_cuda
            self.compiler = torch.compile(self.update, fullgraph=True, dynamic=False, options=options)

    def init_state(self, p: torch.Tensor, group: dict) -> None:
        """The state torch.optim would create at its first step, where there is none yet."""
        state = self.optimizer.state[p]
        if self.adam:
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
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
        graph = self.graph(x, y, lrs)
        # the optimizer's step hooks (the insight callback's update ratios) run as around optimizer.step()
        for hook in tuple(self.optimizer._optimizer_step_pre_hooks.values()):
            hook(self.optimizer, (), {})
        loss = graph(self.params, self.buffers, self.states, x, y, lrs)
        for hook in tuple(self.optimizer._optimizer_step_post_hooks.values()):
            hook(self.optimizer, (), {})
        # what an LR scheduler's wrapper of optimizer.step() marks: the step came before scheduler.step()
        # (else the scheduler's first step warns that the optimizer has not stepped)
        self.optimizer._opt_called = True
        return loss.clone() if self.cuda_graphs else loss  # the graph's next replay overwrites its output

    def learning_rates(self, device: torch.device) -> torch.Tensor:
        """The groups' learning rates as one tensor, made anew only when a scheduler changed them."""
        values = [group["lr"] for group in self.optimizer.param_groups]
        if values != self.lr_values:
            self.lr_values, self.lrs = values, torch.tensor(values, device=device)
        return self.lrs

    def graph(self, x: torch.Tensor, y: torch.Tensor, lrs: torch.Tensor) -> Callable:
        """The update compiled for this batch's shape, compiled now if it is new.

        A graph called through ``torch.compile`` first runs Dynamo's checks that every input still
        matches what it was compiled for: a large share of a small model's update time.
        Here each shape is compiled ahead of time (``aot_compile``: traced, not run) and called
        without guards: this dictionary is the guard, and nothing else a graph depends on changes
        within a run. CUDA graphs keep ``torch.compile``'s own dispatch, which records them."""
        key = (x.shape, self.model.training)
        graph = self.graphs.get(key)
        if graph is None:
            if self.cuda_graphs:
                graph = self.compiler
            else:
                compiled = self.compiler.aot_compile(((self.params, self.buffers, self.states, x, y, lrs), {}))
                compiled.disable_guard_check()
                graph = functools.partial(compiled, self)  # compiled from a method: it takes self first
            self.graphs[key] = graph
        return graph

    def compile_widths(self, x: torch.Tensor, y: torch.Tensor, lrs: torch.Tensor) -> None:
        """Compile the graph of every width in ``self.widths`` (ahead-of-time compilation traces the
        update without running it: the state and the random stream are untouched)."""
        for width in self.widths:
            shape = (x.shape[0], width)
            self.graph(x.new_zeros(shape), y.new_zeros(shape), lrs)
        self.widths = []

    def loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.model.training_inputs(x, y)
        return self.model.loss(functional_call(self.model, (params, buffers), args, kwargs), y)

    def update(self, params, buffers, states, x, y, lrs):
        grads, loss = grad_and_value(self.loss)(params, buffers, x, y)
        if self.clip:
            clip_grad_norm(grads, self.clip)
        step = adam_step if self.adam else sgd_step
        i = 0
        with torch.no_grad():
            for g, (group, names) in enumerate(zip(self.settings, self.groups)):
                for name in names:
                    step(params[name], grads[name], states[i], lrs[g], group)
                    i += 1
        return loss.detach()


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """The optimizers and options the compiled update writes out; anything else is refused."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        raise ConfigError(f"loop.compile=true compiles the whole update for SGD, Adam and AdamW, not {name}; "
                          "use one of those (optimizer=sgd or optimizer=adamw) or loop.compile=false")
    for group in optimizer.param_groups:
        unsupported = [key for key in ("amsgrad", "maximize", "differentiable") if group.get(key)]
        if group.get("dampening"):
            unsupported.append("dampening")
        if unsupported:
            raise ConfigError(f"loop.compile=true: {name} with {', '.join(unsupported)} is not written out in the "
                              "compiled update; leave them at their defaults or set loop.compile=false")


def clip_grad_norm(grads: dict, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` on the gradients: scale them so that their global norm is
    at most ``max_norm``."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(scale)


def sgd_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: torch.Tensor, group: dict) -> None:
    """torch.optim.SGD's step (dampening 0)."""
    if group["weight_decay"]:
        grad = grad + group["weight_decay"] * p
    if group["momentum"]:
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(grad)
        grad = grad + group["momentum"] * buffer if group["nesterov"] else buffer
    p.sub_(lr * grad)


def adam_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: torch.Tensor, group: dict) -> None:
    """torch.optim.Adam's step; AdamW's (decoupled_weight_decay) decays the weight itself first."""
    beta1, beta2 = group["betas"]
    if group["weight_decay"]:
        if group.get("decoupled_weight_decay"):
            p.mul_(1 - lr * group["weight_decay"])
        else:
            grad = grad + group["weight_decay"] * p
    step = state["step"]
    step.add_(1)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # bias corrections: the moving averages start at zero
    denominator = (state["exp_avg_sq"].sqrt() / torch.sqrt(1 - beta2**step)).add_(group["eps"])
    p.sub_(lr / (1 - beta1**step) * state["exp_avg"] / denominator)
