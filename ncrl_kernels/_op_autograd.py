"""Fake kernels and autograd shared by the two operator families:

- the extension's ``ncrl_kernels::head_forward``, ``head_backward``, ``loss_forward`` and
  ``fused_forward`` (schemas in csrc/ops.cpp; "cpp" and "cuda" backends),
- the Triton ``ncrl_kernels::triton_*`` ops (triton_kernels/backend.py), which take the same
  arguments plus trailing ones of their own (``precision``), handed on unchanged to their
  ``head_backward``.

Forward ops return d loss / d logits along with the loss, so a backward only scales it by the
incoming gradient and runs the head backward, which recomputes the feature tiles (a family's head
backward may take the incoming gradient and scale for itself: ``OpFamily.head_backward``).
Nothing but the inputs and d loss / d logits ([N, C], or as a family's fused forward lays it out
for its backward) is saved.

Eager calls skip the operator machinery (``OpFamily``): the same kernels and the same autograd
formulas run as a plain ``torch.autograd.Function``, which also casts the weight under autocast
(``autograd_functions``); ``torch.compile`` traces the operators, with autocast's casts outside
them.
"""
import torch

from .reference import as_dtype, autocast_head, head_dtype, loss_dtype

# Whether Function.apply is the C apply itself (torch >= 2.14), which unwraps tensors kept from a
# finished functorch transform (dead wrappers) on its own; before, Function.apply's Python did.
APPLY_IS_C = torch.autograd.Function.__dict__.get("apply") is torch._C._FunctionBase.__dict__.get("apply")

HEAD_ARGS = 6  # hs, ts, weight, bias, block_size, symmetric
LOSS_ARGS = 6  # logits, labels, loss, gamma, margin_reg, reduction
FUSED_ARGS = 11  # hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction


def fake_head_forward(hs, ts, weight, bias, block_size, symmetric, *extra):
    """Logits in the weight's dtype, the head's (hs and ts may be wider: see OpFamily)."""
    return hs.new_empty((hs.shape[0], weight.shape[0]), dtype=weight.dtype)


def empty_head_grads(grad_logits, hs, ts, weight, block_size, symmetric, input_grad, weight_grad,
                     *extra, weight_grad_dtype=None):
    """Unfilled (d hs, d ts, d weight, d bias), also the fake kernel: ``empty_input_grads`` and
    ``empty_weight_grads``."""
    return (*empty_input_grads(hs, ts, input_grad), *empty_weight_grads(weight, weight_grad, weight_grad_dtype))


def empty_input_grads(hs, ts, input_grad):
    """Unfilled (d hs, d ts) in their inputs' dtypes, empty where `input_grad` is false."""
    return hs.new_empty(hs.shape if input_grad else 0), ts.new_empty(ts.shape if input_grad else 0)


def empty_weight_grads(weight, weight_grad, weight_grad_dtype=None):
    """Unfilled (d weight, d bias), empty where `weight_grad` is false: d weight in
    `weight_grad_dtype` (default: the weight's), d bias in the head's loss dtype."""
    return (weight.new_empty(weight.shape if weight_grad else 0, dtype=weight_grad_dtype or weight.dtype),
            weight.new_empty(weight.shape[0] if weight_grad else 0, dtype=loss_dtype(weight.dtype)))


def fake_loss_forward(logits, labels, loss, gamma, margin_reg, reduction, *extra):
    """(loss, d loss / d logits), both in the loss dtype."""
    dtype = loss_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=dtype), logits.new_empty(logits.shape, dtype=dtype)


def fake_fused_forward(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction,
                       *extra):
    """(loss, logits in the head's dtype (the weight's), d loss / d logits)."""
    dtype = loss_dtype(weight.dtype)
    n, classes = hs.shape[0], weight.shape[0]
    shape = (n,) if reduction == "none" else ()
    return (hs.new_empty(shape, dtype=dtype), hs.new_empty((n, classes), dtype=weight.dtype),
            hs.new_empty((n, classes), dtype=dtype))


FAKES = {
    "head_forward": fake_head_forward,
    "head_backward": empty_head_grads,
    "loss_forward": fake_loss_forward,
    "fused_forward": fake_fused_forward,
}


def scaled_grad(grad_loss, dloss_dlogits):
    """d loss / d logits for an incoming gradient: a scalar (mean, sum) or one per pair (none)."""
    return grad_loss.reshape(-1, 1) * dloss_dlogits


def register_autograd(register, head_backward):
    """Register the autograd of one family's head_forward, loss_forward and fused_forward.

    ``register(name, backward, setup_context)`` registers for the family's op ``name`` (e.g.
    ``"head_forward"``); ``head_backward`` is the family's ``OpFamily.head_backward``.
    """

    def save_head(ctx, hs, ts, weight, bias, block_size, symmetric, extra, *tensors):
        # Inference tensors (made under torch.inference_mode: features cached from a frozen encoder)
        # cannot be saved for backward, copies can (the reference saves what it computes from them).
        if (hs.is_inference() or ts.is_inference() or weight.is_inference()) and not torch.is_inference_mode_enabled():
            hs, ts, weight = (x.clone() if x.is_inference() else x for x in (hs, ts, weight))
        ctx.save_for_backward(hs, ts, weight, *tensors)
        ctx.block_size, ctx.symmetric, ctx.extra = block_size, symmetric, extra
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.weight_grad_dtype = None  # the saved weight's; an eager Function that cast it sets the input's

    def head_grads(ctx, grad_logits, hs, ts, weight, grad_scale=None):
        """Gradients of (hs, ts, weight, bias), None where not needed; `grad_scale`: see
        OpFamily.head_backward."""
        need = ctx.needs_input_grad
        dhs, dts, dweight, dbias = head_backward(grad_logits, hs, ts, weight, ctx.block_size, ctx.symmetric,
                                                 need[0] or need[1], need[2] or need[3], *ctx.extra,
                                                 weight_grad_dtype=ctx.weight_grad_dtype, grad_scale=grad_scale)
        return (dhs if need[0] else None, dts if need[1] else None, dweight if need[2] else None,
                as_dtype(dbias, ctx.bias_dtype) if need[3] else None)

    def head_setup(ctx, inputs, output):
        save_head(ctx, *inputs[:HEAD_ARGS], inputs[HEAD_ARGS:])

    def head_backward_fn(ctx, grad_logits):
        return (*head_grads(ctx, grad_logits, *ctx.saved_tensors), *[None] * (HEAD_ARGS - 4 + len(ctx.extra)))

    # The loss and fused ops' other outputs (logits, d loss / d logits) are non-differentiable, so a
    # backward uses the loss's gradient only; set_materialize_grads(False) keeps autograd from
    # allocating and zero-filling an [N, C] gradient for each of the others on every step. An
    # undefined (zero) gradient of the loss then arrives as None and gives no gradients.

    def loss_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.num_inputs = len(inputs)

    def loss_backward_fn(ctx, grad_loss, _grad_dlogits):
        (dloss_dlogits,) = ctx.saved_tensors
        return None if grad_loss is None else scaled_grad(grad_loss, dloss_dlogits), *[None] * (ctx.num_inputs - 1)

    def fused_setup(ctx, inputs, output):
        hs, ts, weight, bias, _labels, block_size, symmetric = inputs[:7]
        _, logits, dloss_dlogits = output
        save_head(ctx, hs, ts, weight, bias, block_size, symmetric, inputs[FUSED_ARGS:], dloss_dlogits)
        ctx.mark_non_differentiable(logits, dloss_dlogits)
        ctx.set_materialize_grads(False)

    def fused_backward_fn(ctx, grad_loss, _grad_logits, _grad_dlogits):
        hs, ts, weight, dloss_dlogits = ctx.saved_tensors
        grads = (None,) * 4 if grad_loss is None else head_grads(ctx, dloss_dlogits, hs, ts, weight, grad_loss)
        return (*grads, *[None] * (FUSED_ARGS - 4 + len(ctx.extra)))

    register("head_forward", head_backward_fn, head_setup)
    register("loss_forward", loss_backward_fn, loss_setup)
    register("fused_forward", fused_backward_fn, fused_setup)


def autograd_functions(forwards, head_backward):
    """``torch.autograd.Function``s with the formulas ``register_autograd`` gives the operators:
    name -> Function whose forward is ``forwards[name]`` (the op's implementation), taking the op's
    arguments and then the autocast dtype (None: off; always None for the loss, which has no
    weight); their backward calls ``head_backward``.

    Under autocast the forward casts the weight itself, unrecorded (grad mode is off there): no
    autograd node for the cast. The backward returns d weight in the weight's own dtype: the
    Triton kernels write it so from their fp32 accumulators (no cast kernel), the extension's in
    the cast weight's, which autograd casts to the input's dtype as it does any Function's
    gradient. hs and ts arrive as OpFamily passes them: uncast where the implementations round
    them as they load them (Triton), else cast, their casts recorded by autograd as eager
    autocast's are."""
    functions = {}

    def register(name, backward, setup_context):
        impl = forwards[name]

        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds
        # its arguments through inspect.signature on every call.
        def forward(ctx, *args_and_autocast):
            *args, autocast = args_and_autocast
            weight = args[2]
            if autocast is not None:
                args[2] = as_dtype(weight, head_dtype(weight.dtype, autocast))
            output = impl(*args)
            setup_context(ctx, args, output)
            if args[2] is not weight:
                ctx.weight_grad_dtype = weight.dtype
            return output

        # A backward that is to be differentiated again (create_graph) is refused: the gradients
        # come from kernels, or (the loss) from d loss / d logits saved as a constant, so their own
        # derivatives would silently be missing.
        def first_order_backward(ctx, *grads):
            if torch.is_grad_enabled() and not dispatches_ops(grads):
                raise RuntimeError(
                    "ncrl_kernels' fused ops have first derivatives only: their backward cannot be "
                    "differentiated again (create_graph=True, double backward, gradient penalties); use "
                    "backend='reference' for that")
            return *backward(ctx, *grads), None  # no gradient for the autocast dtype

        # Called by autograd only for inputs with a forward-mode tangent: refused with the
        # operator route's message (op_under_transform), rather than torch's about a missing jvp.
        def no_forward_mode(ctx, *tangents):
            raise RuntimeError(FORWARD_MODE_REFUSED)

        functions[name] = type(f"{name}_function", (torch.autograd.Function,),
                               {"forward": staticmethod(forward), "backward": staticmethod(first_order_backward),
                                "jvp": staticmethod(no_forward_mode)})

    register_autograd(register, head_backward)
    return functions


# Tensors the eager route takes; any other (FakeTensor, DTensor, ...) is a subclass that
# dispatches ops, so it gets the operators.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# The types of the ops' usual arguments: where `args` holds nothing else, no subclass is among
# them, which one C-level set test tells (a Python loop over an op's dozen arguments costs the
# host's step about 1 us per call on this project's CPU, twice before the weight grad's launch).
PLAIN_ARGUMENT_TYPES = frozenset((*PLAIN_TENSORS, int, float, bool, str, type(None)))


def dispatches_ops(args):
    """Whether something works on ops rather than kernels here: torch.compile and export, compiled
    autograd, torch.jit.trace, a TorchDispatchMode (FakeTensorMode, FlopCounterMode...), a functorch
    transform (vmap, grad) or tensor subclasses (FakeTensor, DTensor...) among `args`."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()
            or (not PLAIN_ARGUMENT_TYPES.issuperset(map(type, args))
                and any(isinstance(a, torch.Tensor) and type(a) not in PLAIN_TENSORS for a in args)))


def has_tangents(args):
    """Whether a tensor among `args` may carry a forward-mode tangent, which the op would drop: a
    dual tensor of plain forward AD (torch.autograd.forward_ad, linearize), or of the innermost
    functorch transform where that is a Jvp (jvp, jacfwd, hessian); a tensor wrapped at a Jvp
    level below another transform (jvp over vmap) counts as one whatever it holds, as its tangent
    cannot be read from here."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or ()
    jvp_levels = {i.level() for i in stack if i.key() == functorch.TransformType.Jvp}
    if not jvp_levels and torch.autograd.forward_ad._current_level < 0:
        return False
    innermost = stack[-1].level() if stack else None
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        level = functorch.maybe_get_level(a)
        if level == -1 or (level == innermost and level in jvp_levels):  # plain, or the innermost Jvp's
            if torch.autograd.forward_ad.unpack_dual(a).tangent is not None:
                return True
            continue
        while level >= 0:
            if level in jvp_levels:
                return True
            a = functorch.get_unwrapped(a)
            level = functorch.maybe_get_level(a) if isinstance(a, torch.Tensor) else -1
    return False


def op_under_transform(op, args):
    """`op` on `args` inside a functorch transform or under forward AD, on the operator route.
    Derivatives cannot be taken there (torch 2.11 to 2.14): forward mode gives the op zero
    derivatives, silently, so a tangent among its arguments is refused; and torch.func.grad, vjp
    and jacrev differentiate through autograd.Functions with a setup_context only, which the
    autograd torch registers for custom operators has none of, so their error, which names neither
    this op nor a way out, is replaced. vmap, and transforms whose variables do not reach the op,
    run it."""
    if has_tangents(args):
        raise RuntimeError(FORWARD_MODE_REFUSED)
    try:
        return op(*args)
    except (RuntimeError, SystemError) as error:  # 2.14 can raise that error as a SystemError's cause
        if "setup_context" not in str(error) + str(error.__cause__):
            raise
        raise RuntimeError(FUNC_GRAD_REFUSED) from error


@torch.compiler.assume_constant_result
def forward_ad_level():
    """forward_ad's current level as it is at this call, also while Dynamo traces: Dynamo reads a
    module global once per frame, so a plain read after a dual_level or jvp entered in the same
    frame would give the level from before it."""
    return torch.autograd.forward_ad._current_level


# A graph break: has_tangents on the real tensors, dual or functorch-wrapped, which Dynamo's fakes
# do not show as such.
has_tangents_outside_the_graph = torch.compiler.disable(has_tangents)


def refuse_forward_mode_while_compiling(args):
    """What ``op_under_transform`` refuses in forward mode, under torch.compile, where torch's
    derivatives for the op would be zeros without a word. Dynamo runs the transforms' nesting as it
    traces, so the op meets the real interpreter stack, but it cannot trace has_tangents' walk down
    the wrappers. A tangent is read in the trace where the trace shows it: the innermost level of
    a single functorch jvp (jvp, jacfwd), and a dual made inside the compiled function. Elsewhere
    the graph breaks to ``has_tangents`` on the real tensors: under plain forward AD (a dual graph
    input looks plain to Dynamo), under nested jvps, and where another transform is innermost
    (hessian, jvp over vmap). Without forward AD (plain compile, vmap, grad) nothing is added to
    the graph."""
    forward_ad = torch.autograd.forward_ad
    # The plain read makes Dynamo guard the graph on the level it was traced at (one traced outside
    # forward AD is not reused on dual inputs); forward_ad_level() is the level at this call.
    level = max(forward_ad._current_level, forward_ad_level())
    if level < 0:
        return
    transforms = torch._C._are_functorch_transforms_active()
    innermost_jvp = transforms and (torch._functorch.pyfunctorch.retrieve_current_functorch_interpreter().key()
                                    == torch._C._functorch.TransformType.Jvp)
    if not transforms or innermost_jvp:
        if any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a, level=level).tangent is not None
               for a in args):
            raise RuntimeError(FORWARD_MODE_REFUSED)
        if innermost_jvp and torch._functorch.eager_transforms.JVP_NESTING == 1:
            return
    if has_tangents_outside_the_graph(args):
        raise RuntimeError(FORWARD_MODE_REFUSED)


FORWARD_MODE_REFUSED = (
    "ncrl_kernels' fused ops have no forward-mode derivatives (torch.func.jvp, jacfwd, hessian, linearize, "
    "torch.autograd.forward_ad): use reverse mode (backward(), torch.autograd.grad, is_grads_batched=True for "
    "batched vector-Jacobian products), or backend='reference'")
FUNC_GRAD_REFUSED = (
    "ncrl_kernels' fused ops cannot be differentiated by torch.func.grad, vjp or jacrev: torch does not support "
    "them for custom operators. Use torch.autograd.grad (is_grads_batched=True for batched vector-Jacobian "
    "products), or backend='reference'")


class OpFamily:
    """One family's ops (head_forward, loss_forward, fused_forward and head_backward), called the
    cheapest correct way. Eager calls: autograd.Functions around the implementations. A custom
    op's Python autograd layer (dispatch, arguments rebuilt from the schema, a generated
    autograd.Function inside) costs the host nearly as much as the rest of the step: a Triton fused
    forward + backward with its launches stubbed out took 284 us through the operator and 190 us
    through the Function (bench/host_path.py on a 2-core x86 CPU, at 4842dfa), and at DocRED's
    sizes a GPU runs the step's kernels faster than the host issues them (docs/triton.md). Wherever something
    works on ops rather than kernels (``dispatches_ops``), the registered operators, with their
    fake kernels and autograd, so the behaviour there is the operators'.

    ``ops``, ``impls``: name -> the registered operator, its implementation. ``rounds_inputs``:
    the head implementations take hs and ts in a wider dtype than the weight (fp32 under bf16
    autocast) and round them to the weight's as their kernels load them (the Triton ones), so
    under autocast the eager route leaves them uncast: no cast kernel, no autograd node and no
    16-bit copy, and their gradients are written in their own dtype from the kernels' fp32
    accumulators, not cast back from 16 bits."""

    def __init__(self, ops, impls, rounds_inputs=False):
        self.ops, self.impls, self.rounds_inputs = ops, impls, rounds_inputs
        self.functions = autograd_functions(impls, self.head_backward)
        # Each Function's C apply. Before torch 2.14, Function.apply's Python around it checked
        # for a setup_context and for functorch transforms (the eager route runs only where none
        # is active: dispatches_ops) and unwrapped dead functorch wrappers (``function`` does): a
        # frame and about 1.5-2 us of the host's step on this project's CPU, net.
        self.applies = {name: super(torch.autograd.Function, cls).apply for name, cls in self.functions.items()}

    def __call__(self, name, *args, autocast=None):
        """Op `name` on the op's arguments; for the head ops (hs, ts and weight first) the autocast
        dtype, None where autocast is off. Under autocast, where the operator runs, hs, ts and
        the weight are cast here, recorded by autograd; on the eager route the weight is cast in
        the Function (``autograd_functions``), and hs and ts here unless the implementations
        round them (``rounds_inputs``)."""
        if dispatches_ops(args):
            if autocast is not None:
                args = (*autocast_head(*args[:3], autocast), *args[3:])
            if torch.compiler.is_compiling():
                refuse_forward_mode_while_compiling(args)
            elif torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
                return op_under_transform(self.ops[name], args)
            return self.ops[name](*args)
        if autocast is not None and not self.rounds_inputs:
            args = (*(as_dtype(x, head_dtype(x.dtype, autocast)) for x in args[:2]), *args[2:])
        return self.function(name, *args, autocast=autocast)

    def function(self, name, *args, autocast=None):
        """Op `name` through its autograd.Function (the eager route), for arguments that
        ``dispatches_ops`` leaves to it. Tensors that escaped a finished functorch transform (dead
        wrappers: plain Tensors whose data Triton cannot reach) are unwrapped, as Function.apply
        does."""
        if not APPLY_IS_C:
            if torch._C._are_functorch_transforms_active():  # a direct call: Function.apply's error
                return self.functions[name].apply(*args, autocast)
            unwrap = torch._C._functorch.unwrap_if_dead
            args = [unwrap(a) if isinstance(a, torch.Tensor) else a for a in args]
        return self.applies[name](*args, autocast)

    def head_backward(self, grad_logits, *args, weight_grad_dtype=None, grad_scale=None):
        """The head backward both routes' autograd runs: the operator where that backward is batched
        (is_grads_batched, jacobian(vectorize=True)), traced, or to be differentiated (grad mode
        on: create_graph; the operator has no autograd, so that raises, where the implementation
        below it would return gradients silently cut from the graph), else the implementation,
        which takes ``weight_grad_dtype`` (d weight's dtype, None: the weight's), as the Triton
        one writes it. Where it does not, autograd casts a Function's gradients to its
        inputs' dtypes (the operator route never casts inside: ``__call__``).

        ``grad_scale``: a fused op's incoming gradient (a scalar, or one per pair for "none"), by
        which its d loss / d logits `grad_logits` is to be scaled; None where grad_logits is the
        gradient. The operator route scales it here; the implementation takes it (the Triton one
        scales within its kernels where it can, the extension's first thing)."""
        batched = torch._C._functorch.is_legacy_batchedtensor
        if (batched(grad_logits) or (grad_scale is not None and batched(grad_scale)) or torch.is_grad_enabled()
                or dispatches_ops((grad_logits, grad_scale, *args[:3]))):  # args: hs, ts, weight, then flags
            if grad_scale is not None:
                grad_logits = scaled_grad(grad_scale, grad_logits)
            return self.ops["head_backward"](grad_logits, *args)
        return self.impls["head_backward"](grad_logits, *args, weight_grad_dtype=weight_grad_dtype,
                                           grad_scale=grad_scale)
