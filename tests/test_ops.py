"""The registered operators: torch.library.opcheck (schema, fake kernels, autograd registration,
AOT dispatch), torch.compile(fullgraph=True) through every backend, and autocast."""
import contextlib
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ncrl_kernels
from ncrl_kernels import _dispatch, _extension

from conftest import (all_backends, assert_close, dtypes_for, fp64, fused_backends, leaves, make_head_inputs,
                      make_logits, upstream)

pytestmark = pytest.mark.usefixtures("ieee_fp32")


def extension_devices():
    return [pytest.param(dev, id=dev, marks=[pytest.mark.gpu] if dev == "cuda" else [])
            for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if _extension.has_kernel(key) and (dev == "cpu" or torch.cuda.is_available())]


def op_families():
    """(device, family) of every operator family that runs here: the extension's ops and the
    Triton ops (which take a trailing precision)."""
    families = [pytest.param(*p.values, "extension", id=f"{p.id}-extension", marks=p.marks)
                for p in extension_devices()]
    for dev in ("cpu", "cuda"):
        if (dev == "cpu" or torch.cuda.is_available()) and "triton" in ncrl_kernels.available_backends(dev):
            families.append(pytest.param(dev, "triton", id=f"{dev}-triton",
                                         marks=[pytest.mark.gpu] if dev == "cuda" else []))
    return families


def family_routes(family):
    """The family's OpFamily: eager calls take its autograd.Functions, torch.compile its ops."""
    if family == "extension":
        return _extension._FAMILY
    from ncrl_kernels.triton_kernels import backend

    return backend._FAMILY


def family_ops(family, dtype):
    """The family's four ops and the trailing arguments of its head and fused ops for inputs of
    `dtype` (the Triton ops take the tl.dot precision the backend passes: TF32 or 3xTF32 for fp32)."""
    ops = family_routes(family).ops
    if family == "extension":
        extra = ()
    else:
        from ncrl_kernels.triton_kernels.backend import precision_for

        extra = (precision_for(dtype),)
    return (ops["head_forward"], ops["head_backward"], ops["loss_forward"], ops["fused_forward"]), extra


@pytest.mark.parametrize("device,family", op_families())
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(device, family, symmetric, reduction):
    """Schemas, fake kernels, autograd registration and AOT dispatch of the four operators."""
    (head_forward, head_backward, loss_forward, fused_forward), extra = family_ops(family, torch.float64)
    hs, ts, weight, bias, labels = make_head_inputs(20, 16, 4, 5, dtype=torch.float64, device=device)
    hs, ts, weight, bias = leaves(hs, ts, weight, bias)
    torch.library.opcheck(head_forward, (hs, ts, weight, bias, 4, symmetric, *extra))
    torch.library.opcheck(head_forward, (hs, ts, weight, None, 4, symmetric, *extra))
    grad = make_logits(20, 5, dtype=torch.float64, device=device)
    inputs = (hs.detach(), ts.detach(), weight.detach())
    torch.library.opcheck(head_backward, (grad, *inputs, 4, symmetric, True, True, *extra))
    torch.library.opcheck(head_backward, (grad, *inputs, 4, symmetric, False, True, *extra))
    for loss in ("ncrl", "atl", "bce"):
        logits = make_logits(20, 5, dtype=torch.float64, device=device).requires_grad_()
        torch.library.opcheck(loss_forward, (logits, labels.double(), loss, 0.05, True, reduction))
        torch.library.opcheck(fused_forward,
                              (hs, ts, weight, bias, labels.double(), 4, symmetric, loss, 0.05, True, reduction, *extra))


@pytest.mark.parametrize("device,family", op_families())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_function_matches_operator(device, family, reduction):
    """The autograd.Function that eager calls take and the registered operator (with its registered
    autograd) give the same bits, forward and backward, for the three differentiable ops."""
    routes = family_routes(family)
    extra = family_ops(family, torch.float32)[1]
    hs, ts, weight, bias, labels = make_head_inputs(20, 16, 4, 5, device=device)
    grad_logits = make_logits(20, 5, device=device)
    calls = {
        "head_forward": lambda h, t, w, b: (h, t, w, b, 4, True, *extra),
        "fused_forward": lambda h, t, w, b: (h, t, w, b, labels, 4, True, "ncrl", 0.05, True, reduction, *extra),
    }
    for name, make_args in calls.items():
        results = []
        for run in (functools.partial(routes.function, name), routes.ops[name]):
            inputs = leaves(hs, ts, weight, bias)
            out = run(*make_args(*inputs))
            value = out if name == "head_forward" else out[0]
            grads = torch.autograd.grad(value, inputs, upstream(value))
            results.append((*(out if isinstance(out, tuple) else (out,)), *grads))
        for got, want in zip(*results):
            assert torch.equal(got, want), name
    logits = leaves(grad_logits)[0]
    results = []
    for run in (functools.partial(routes.function, "loss_forward"), routes.ops["loss_forward"]):
        x = logits.detach().clone().requires_grad_()
        value, dlogits = run(x, labels, "atl", 0.0, False, reduction)
        results.append((value, dlogits, *torch.autograd.grad(value, x, upstream(value))))
    for got, want in zip(*results):
        assert torch.equal(got, want), "loss_forward"


@pytest.mark.parametrize("device,backend", fused_backends())
def test_two_backwards_accumulate(device, backend):
    """Two backwards of one fused loss (retain_graph=True) under different incoming gradients: each
    accumulates its gradients, against the reference."""
    hs, ts, weight, bias, labels = make_head_inputs(20, 16, 4, 5, dtype=torch.float64, device=device)
    params = leaves(hs, ts, weight, bias)
    want = leaves(hs, ts, weight, bias)
    loss = ncrl_kernels.fused_ncrl(*params, labels, block_size=4, symmetric=True, backend=backend)
    expected = ncrl_kernels.fused_ncrl(*want, labels.cpu(), block_size=4, symmetric=True, backend="reference")
    for scale in (0.3, 2.5):
        (loss * scale).backward(retain_graph=True)
        (expected * scale).backward(retain_graph=True)
        for p, w in zip(params, want):
            assert_close(p.grad, w.grad, torch.float64, f"x{scale}")


@pytest.mark.parametrize("needs_grad", ["hs", "weight", "bias", "hs+bias"])
@pytest.mark.parametrize("device,backend", fused_backends())
def test_some_inputs_need_gradients(device, backend, needs_grad):
    """Only some of hs, ts, weight and bias require gradients (frozen weights, bias-only tuning):
    theirs match the reference under an incoming gradient other than 1, the others stay None."""
    hs, ts, weight, bias, labels = make_head_inputs(20, 16, 4, 5, dtype=torch.float64, device=device)
    names = ("hs", "ts", "weight", "bias")
    results = []
    for run_backend in (backend, "reference"):
        inputs = [x.detach().clone().requires_grad_(name in needs_grad.split("+")) for name, x in zip(names, (
            hs, ts, weight, bias))]
        loss = ncrl_kernels.fused_ncrl(*inputs, labels, block_size=4, backend=run_backend)
        (loss * 0.3).backward()
        results.append([x.grad for x in inputs])
    for name, got, want in zip(names, *results):
        assert (got is None) == (want is None) == (name not in needs_grad.split("+")), name
        if got is not None:
            assert_close(got, want, torch.float64, name)


class PassThroughMode(TorchDispatchMode):
    """A dispatch mode that runs every op as it is: where one is active, OpFamily calls take the
    registered operators, as under torch.compile."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", fused_backends())
def test_autocast_through_the_operator(device, backend):
    """Where ops are dispatched (torch.compile, dispatch modes) autocast's casts of hs, ts and the
    weight run before the registered operator, recorded by autograd as eager autocast's are, and
    give the eager route's loss and logits, and its gradients up to their rounding to 16 bits
    (which the eager route skips where its kernels write them in fp32)."""
    hs, ts, weight, bias, labels = make_head_inputs(30, 32, 8, 5, device=device)
    results = []
    for mode in (contextlib.nullcontext(), PassThroughMode()):
        args = leaves(hs, ts, weight, bias)
        with mode, torch.autocast(device, dtype=torch.float16):
            loss, logits = ncrl_kernels.fused_ncrl(*args, labels, block_size=8, return_logits=True, backend=backend)
            casts = [type(node).__name__ for node, _ in loss.grad_fn.next_functions[:3]]
            grads = torch.autograd.grad(loss, args)
        assert casts == (["ToCopyBackward0"] * 3 if isinstance(mode, PassThroughMode)
                         else eager_autocast_nodes(device, backend)), casts
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((loss, logits, *grads))
    eager, operator = results
    for got, want in zip(eager[:2], operator[:2]):
        assert torch.equal(got, want)
    for got, want in zip(eager[2:], operator[2:]):
        assert_close(got, want, torch.float16, "gradient")


@pytest.mark.parametrize("device,backend", fused_backends())
def test_operator_backward_cannot_be_differentiated(device, backend):
    """Through the registered operator too (its forward run under a dispatch mode, the backward
    outside one), a gradient penalty raises rather than running on gradients cut from the graph
    (wrong second derivatives, silently): where the gradients are taken (C++) or where the
    penalty is differentiated (Triton's operator, which has no autograd). Only the eager route's
    Function says why."""
    hs, ts, weight, bias, labels = make_head_inputs(20, 16, 4, 5, device=device)
    params = leaves(hs, ts, weight, bias)
    with PassThroughMode():
        loss = ncrl_kernels.fused_ncrl(*params, labels, block_size=4, backend=backend)
    with pytest.raises(RuntimeError):
        grads = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum((g ** 2).sum() for g in grads)).backward()


@pytest.mark.parametrize("device,family", op_families())
def test_compile_traces_the_operator(device, family):
    """Under torch.compile the graph holds the registered operator (which Inductor sees whole), not
    the eager autograd.Function."""
    torch._dynamo.reset()
    hs, ts, weight, bias, labels = make_head_inputs(8, 16, 4, 5, device=device)
    backend = "triton" if family == "triton" else ("cpp" if device == "cpu" else "cuda")
    targets = set()

    def record(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda *a: ncrl_kernels.fused_ncrl(*a, labels, block_size=4, backend=backend),
                       fullgraph=True, backend=record)
    fn(*leaves(hs, ts, weight, bias)).backward()
    name = "ncrl_kernels.triton_fused_forward" if family == "triton" else "ncrl_kernels.fused_forward"
    assert any(target.startswith(name) for target in targets), sorted(targets)


@pytest.mark.parametrize("device,backend", fused_backends())
def test_fake_tensor_mode(device, backend):
    """Under FakeTensorMode (shape inference, memory planning) the fused ops run their fake
    kernels: no kernel sees a fake tensor, forward or backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hs, ts, weight, bias, labels = make_head_inputs(6, 16, 4, 3, device=device)
        hs, ts, weight, bias = leaves(hs, ts, weight, bias)
        loss, logits = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=4, reduction="none",
                                               return_logits=True, backend=backend)
        loss.sum().backward()
        head = ncrl_kernels.group_bilinear(hs, ts, weight, bias, block_size=4, backend=backend)
        assert ncrl_kernels.ncrl_loss(head, labels, backend=backend).shape == ()
    assert loss.shape == (6,) and logits.shape == head.shape == (6, 3)
    assert hs.grad.shape == hs.shape and weight.grad.shape == weight.shape and bias.grad.shape == (3,)


@pytest.mark.parametrize("device,backend", fused_backends())
def test_tensor_subclass_arguments_take_the_operators(device, backend):
    """Fake tensors used outside their FakeTensorMode (no mode on the dispatch stack: a tensor
    subclass among the arguments is all that tells) take the operators and their fake kernels,
    forward and backward, as any subclass that dispatches ops does; the eager route would hand
    them to the kernels."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        hs, ts, weight, bias, labels = make_head_inputs(6, 16, 4, 3, device=device)
        hs, ts, weight, bias = leaves(hs, ts, weight, bias)
    loss = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=4, backend=backend)
    loss.backward()
    assert isinstance(loss, FakeTensor) and loss.shape == ()
    assert isinstance(weight.grad, FakeTensor) and weight.grad.shape == weight.shape


@pytest.mark.parametrize("device,backend", fused_backends())
def test_double_backward_is_refused(device, backend):
    """The fused ops have first derivatives only: differentiating their backward again (here a
    gradient penalty) raises and says so, for the head, the fused op and the loss alone, rather
    than silently leaving out the second-order terms."""
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    calls = {
        "fused": lambda h, t, w: ncrl_kernels.fused_ncrl(h, t, w, bias, labels, block_size=4, backend=backend),
        "head": lambda h, t, w: ncrl_kernels.group_bilinear(h, t, w, bias, block_size=4, backend=backend).sum(),
        "loss": lambda h, t, w: ncrl_kernels.ncrl_loss(ncrl_kernels.group_bilinear(h, t, w, bias, block_size=4),
                                                       labels, backend=backend),
    }
    for name, call in calls.items():
        h, t, w = leaves(hs, ts, weight)
        with pytest.raises(RuntimeError, match="first derivatives only"):
            grads = torch.autograd.grad(call(h, t, w), (h, t, w), create_graph=True)
            sum((g ** 2).sum() for g in grads).backward()


@pytest.mark.parametrize("device,backend", fused_backends())
def test_func_transforms_are_refused_with_a_way_out(device, backend):
    """torch.func.grad and jacrev cannot differentiate custom operators' registered autograd
    (torch's own limit), and forward mode (jvp, jacfwd, linearize, forward_ad, nested in vmap too)
    would give them zero derivatives, silently: each raises an error that says so and names
    torch.autograd.grad and the reference, for the fused op, the head and the loss alone. A
    forward-mode transform whose variable does not reach the op still runs it."""
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    calls = {
        "fused": lambda w: ncrl_kernels.fused_ncrl(hs, ts, w, bias, labels, block_size=4, backend=backend),
        "head": lambda w: ncrl_kernels.group_bilinear(hs, ts, w, bias, block_size=4, backend=backend).sum(),
        "loss": lambda w: ncrl_kernels.ncrl_loss(ncrl_kernels.group_bilinear(hs, ts, w, bias, block_size=4),
                                                 labels, backend=backend),
    }
    func = torch.func
    transforms = {
        "grad": lambda f: func.grad(f)(weight),
        "jacrev": lambda f: func.jacrev(f)(weight),
        "jacfwd": lambda f: func.jacfwd(f)(weight),
        "vmap(jvp)": lambda f: func.vmap(lambda t: func.jvp(f, (weight,), (t,))[1])(torch.stack([weight, -weight])),
        "jvp(vmap)": lambda f: func.jvp(func.vmap(f), (torch.stack([weight, -weight]),),
                                        (torch.ones(2, *weight.shape, device=device),)),
        "linearize": lambda f: func.linearize(f, weight)[1](weight),
    }
    for name, call in calls.items():
        for transform, run in transforms.items():
            with pytest.raises(RuntimeError, match="torch.autograd.grad.*backend='reference'"):
                run(call)
        with torch.autograd.forward_ad.dual_level():  # the eager route, then the operator route
            dual = torch.autograd.forward_ad.make_dual(weight, torch.ones_like(weight))
            for mode in (contextlib.nullcontext(), PassThroughMode()):
                with mode, pytest.raises(RuntimeError, match="no forward-mode derivatives"):
                    call(dual)
    # The variable x does not reach the op: its value is a constant there, and jvp's answer right.
    x = torch.tensor(1.5, device=device)
    for name, call in calls.items():
        value = call(weight)
        _, tangent = func.jvp(lambda x: call(weight) * x ** 2, (x,), (torch.ones_like(x),))
        assert_close(tangent, 2 * x * value, torch.float32, f"{name} jvp of a constant")


@pytest.mark.parametrize("device,backend", fused_backends())
def test_forward_mode_under_torch_compile_is_refused(device, backend):
    """Under torch.compile, forward mode reaching the op is refused as in eager calls (torch traces
    the operator, and its derivatives came out as zeros, or no tangent at all): a compiled jvp,
    jacfwd, hessian, nested jvp, or dual_level inside the compiled function, also after a plain
    call of the op in the same function, and a compiled function called on a dual tensor, which
    Dynamo does not show as one (a graph break; torch 2.14's Dynamo refuses dual inputs itself).
    fullgraph=True keeps the error (Dynamo's, carrying ours, or its graph-break error). Forward
    mode whose variable does not reach the op, and vmap without forward mode, still compile into
    one graph."""
    refused = r"no forward-mode derivatives|compiler.disable\(\)|dual tensor input"
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    fused = lambda w: ncrl_kernels.fused_ncrl(hs, ts, w, bias, labels, block_size=4, backend=backend)  # noqa: E731
    forward_ad, func = torch.autograd.forward_ad, torch.func
    # Not all ones: shifting every logit alike leaves the loss unchanged, a derivative of 0.
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)).to(device)
    x = torch.tensor(1.5, device=device)

    def dual_inside(w):
        value = fused(w)  # a plain call first: forward AD starts later in the same compiled frame
        with forward_ad.dual_level():
            return value, forward_ad.unpack_dual(fused(forward_ad.make_dual(w, direction))).tangent

    refused_inside = {
        "jvp": lambda w: func.jvp(fused, (w,), (direction,))[1],
        "op then jvp": lambda w: fused(w) + func.jvp(fused, (w,), (direction,))[1],
        "jacfwd": lambda w: func.jacfwd(fused)(w),
        "hessian": func.hessian(fused),
        "nested jvp": lambda w: func.jvp(lambda w: func.jvp(lambda x: fused(w) * x ** 2, (x,), (torch.ones_like(x),))[1],
                                         (w,), (direction,))[1],
        "dual_level": dual_inside,
    }
    for fullgraph in (False, True):
        for name, call in refused_inside.items():
            torch._dynamo.reset()
            with pytest.raises(Exception, match=refused):
                torch.compile(call, backend="aot_eager", fullgraph=fullgraph)(weight)
        torch._dynamo.reset()
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=fullgraph)
        compiled(weight)  # a graph traced outside forward AD is not reused on a dual input
        with forward_ad.dual_level(), pytest.raises(Exception, match=refused):
            compiled(forward_ad.make_dual(weight, direction))

    torch._dynamo.reset()
    constant = torch.compile(lambda x: func.jvp(lambda x: fused(weight) * x ** 2, (x,), (torch.ones_like(x),))[1],
                             backend="aot_eager", fullgraph=True)
    assert_close(constant(x), 2 * x * fused(weight), torch.float32, "compiled jvp of a constant")
    torch._dynamo.reset()
    stacked = torch.stack([weight, -weight])
    mapped = torch.compile(func.vmap(fused), backend="aot_eager", fullgraph=True)(stacked)
    assert_close(mapped, torch.stack([fused(weight), fused(-weight)]), torch.float32, "compiled vmap")


@pytest.mark.parametrize("device,backend", fused_backends())
def test_batched_gradients_and_vmap(device, backend):
    """torch.autograd.grad(is_grads_batched=True) (what jacobian(vectorize=True) uses) and
    torch.vmap over the head give what a loop over the batch gives."""
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    h, t, w = leaves(hs, ts, weight)
    for reduction, seeds in (("none", torch.eye(6, device=device)), ("mean", torch.tensor([0.3, 2.0], device=device))):
        loss = ncrl_kernels.fused_ncrl(h, t, w, bias, labels, block_size=4, reduction=reduction, backend=backend)
        (batched,) = torch.autograd.grad(loss, w, seeds, is_grads_batched=True, retain_graph=True)
        for row, seed in enumerate(seeds):
            (want,) = torch.autograd.grad(loss, w, seed, retain_graph=True)
            assert_close(batched[row], want, torch.float32, f"{reduction} batched grad row {row}")
    stacked = torch.stack([hs, ts.flip(0)])
    got = torch.vmap(lambda x: ncrl_kernels.group_bilinear(x, x, weight, bias, block_size=4, backend=backend))(stacked)
    for i, x in enumerate(stacked):
        assert_close(got[i], ncrl_kernels.group_bilinear(x, x, weight, bias, block_size=4, backend=backend),
                     torch.float32, "vmap")


@pytest.mark.parametrize("device,backend", fused_backends())
def test_tensor_escaped_from_a_transform(device, backend):
    """A tensor kept from inside a finished torch.func transform (a dead functorch wrapper, whose
    data Triton and the extension cannot reach) goes through the eager route's C apply as it goes
    through Function.apply: unwrapped, giving the plain tensor's loss and gradients."""
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    kept = []
    torch.func.grad(lambda x: kept.append(x * 1) or x.sum())(hs)
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
    got, want = [], []
    for x, out in ((kept[0], got), (hs, want)):
        t, w = leaves(ts, weight)
        loss = ncrl_kernels.fused_ncrl(x, t, w, bias, labels, block_size=4, backend=backend)
        loss.backward()
        out += [loss.detach(), t.grad, w.grad]
    for name, g, r in zip(("loss", "d ts", "d weight"), got, want):
        assert_close(g, r, torch.float32, name)


@pytest.mark.parametrize("device", extension_devices())
def test_extension_gradcheck(device):
    hs, ts, weight, bias, labels = make_head_inputs(7, 8, 4, 3, dtype=torch.float64, device=device)
    args = leaves(hs, ts, weight, bias)
    for symmetric in (False, True):
        fn = lambda h, t, w, b: ncrl_kernels.fused_ncrl(  # noqa: E731
            h, t, w, b, labels, block_size=4, symmetric=symmetric, gamma=0.05, reduction="none", backend="cpp"
            if device == "cpu" else "cuda")
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(device, backend, dynamic):
    torch._dynamo.reset()
    hs, ts, weight, bias, labels = make_head_inputs(24, 32, 8, 5, device=device)

    def step(hs, ts, weight, bias, labels):
        loss, logits = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=8, gamma=0.05,
                                               return_logits=True, backend=backend)
        head = ncrl_kernels.group_bilinear(hs, ts, weight, bias, block_size=8, backend=backend)
        return loss + ncrl_kernels.atl_loss(head, labels, backend=backend), ncrl_kernels.predict(logits)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    eager_args, compiled_args = leaves(hs, ts, weight, bias), leaves(hs, ts, weight, bias)
    want, want_pred = step(*eager_args, labels)
    got, got_pred = compiled(*compiled_args, labels)
    assert_close(got, want, torch.float32, "compiled loss")
    assert torch.equal(got_pred, want_pred)
    # An incoming gradient other than 1: the operators' backward scales by it (OpFamily.head_backward).
    for a, e in zip(torch.autograd.grad(got, compiled_args, upstream(got)),
                    torch.autograd.grad(want, eager_args, upstream(want))):
        assert_close(a, e, torch.float32, "compiled grad")


def test_first_call_inside_compile():
    """A fresh process whose first call of each backend is inside torch.compile(fullgraph=True):
    nothing may be left to import or look up lazily while Dynamo traces."""
    script = """
import sys, torch, ncrl_kernels
hs, ts = torch.rand(6, 16), torch.rand(6, 16)
weight, labels = torch.rand(3, 64), torch.eye(3)[[0, 1, 2, 0, 1, 2]]
for backend in ncrl_kernels.available_backends("cpu") + ["auto"]:
    fn = torch.compile(lambda *a: ncrl_kernels.fused_ncrl(*a, labels, block_size=4, backend=backend),
                       fullgraph=True, backend="aot_eager")
    print(backend, float(fn(hs, ts, weight, None)))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    values = {line.split()[0]: float(line.split()[1]) for line in out.stdout.splitlines()}
    assert set(values) == set(ncrl_kernels.available_backends("cpu")) | {"auto"}
    assert all(v == pytest.approx(values["reference"], rel=1e-4) for v in values.values())


@pytest.mark.parametrize("device,backend", fused_backends())
def test_compile_inductor(device, backend):
    """The default torch.compile backend (Inductor) around the fused op, as in a training step."""
    torch._dynamo.reset()
    hs, ts, weight, bias, labels = make_head_inputs(24, 32, 8, 5, device=device)
    fn = lambda *a: ncrl_kernels.fused_ncrl(*a, labels, block_size=8, backend=backend)  # noqa: E731
    args = leaves(hs, ts, weight, bias)
    got = torch.compile(fn, fullgraph=True)(*args)
    got.backward(upstream(got))
    want_args = fp64(hs, ts, weight, bias)
    want = ncrl_kernels.fused_ncrl(*want_args, labels.cpu(), block_size=8, backend="reference")
    want.backward(upstream(want))
    assert_close(got, want, torch.float32, "inductor loss")
    for a, e in zip(args, want_args):
        assert_close(a.grad, e.grad, torch.float32, "inductor grad")


def eager_autocast_nodes(device, backend):
    """The autograd nodes of a fused backend's eager op's hs, ts and weight under autocast from
    fp32 leaves: the weight is cast inside the op, and hs and ts too where its kernels round them
    as they load them (OpFamily.rounds_inputs); others keep autocast's recorded casts."""
    rounds = _dispatch.resolve(backend, torch.device(device))._FAMILY.rounds_inputs
    return ["AccumulateGrad"] * 3 if rounds else ["ToCopyBackward0", "ToCopyBackward0", "AccumulateGrad"]


@pytest.mark.parametrize("device,backend", fused_backends())
def test_autocast_head_alone(device, backend):
    """The head alone under fp16 autocast from fp32 leaves, against the fp64 reference on the
    16-bit-rounded inputs: logits in fp16, d bias summed and returned in fp32 (the fake kernels'
    dtype) from the fp16 incoming gradient."""
    hs, ts, weight, bias, _ = make_head_inputs(6, 16, 4, 5, device=device)
    args = leaves(hs, ts, weight, bias)
    with torch.autocast(device, dtype=torch.float16):
        head = ncrl_kernels.group_bilinear(*args, block_size=4, backend=backend)
    upstream = torch.randn(head.shape, generator=torch.Generator().manual_seed(3)).to(device, torch.float16)
    grads = torch.autograd.grad(head, args, upstream)
    assert head.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float32] * 4
    want_args = fp64(*(x.to(torch.float16) for x in (hs, ts, weight)), bias)
    want = ncrl_kernels.group_bilinear(*want_args, block_size=4, backend="reference")
    want_grads = torch.autograd.grad(want, want_args, upstream.cpu().double())
    assert_close(head, want, torch.float16, "autocast head")
    for name, got, expected in zip(("d hs", "d ts", "d weight"), grads, want_grads):
        assert_close(got, expected, torch.float16, name)
    assert_close(grads[3], want_grads[3], torch.float32, "d bias")


@pytest.mark.parametrize("ts_dtype", ["fp32", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device,backend", all_backends())
def test_autocast(device, backend, dtype, ts_dtype):
    """Under autocast the head runs in the autocast dtype and the loss in fp32 (ATLOP's
    loss_fnt(logits.float())); gradients come back in their inputs' dtypes. The fused backends
    cast the weight inside their op (no autograd node), and Triton's kernels round fp32 hs and ts
    as they load them (no node either) and write the fp32 gradients from their fp32 accumulators,
    not rounded to 16 bits on the way as eager autocast's are. ts either fp32 or already in the
    autocast dtype (the output of an autocast linear, as ATLOP's are), hs fp32."""
    if dtype not in dtypes_for(device, backend):
        pytest.skip("the Triton interpreter has no bf16")
    hs, ts, weight, bias, labels = make_head_inputs(30, 32, 8, 5, device=device)
    ts = ts if ts_dtype == "fp32" else ts.to(dtype)
    args = leaves(hs, ts, weight, bias)
    with torch.autocast(device, dtype=dtype):
        loss, logits = ncrl_kernels.fused_ncrl(*args, labels, block_size=8, return_logits=True, backend=backend)
        head = ncrl_kernels.group_bilinear(*args, block_size=8, backend=backend)
        loss_only = ncrl_kernels.ncrl_loss(head, labels, backend=backend)
    assert loss.dtype == torch.float32 and loss_only.dtype == torch.float32
    assert logits.dtype == dtype and head.dtype == dtype
    if backend != "reference" and ts_dtype == "fp32":
        for out in (loss, head):
            casts = [type(node).__name__ for node, _ in out.grad_fn.next_functions[:3]]
            assert casts == eager_autocast_nodes(device, backend), casts
    grads = torch.autograd.grad(loss, args)
    assert [g.dtype for g in grads] == [x.dtype for x in args]
    if backend == "triton":
        for name, grad in zip(("d hs", "d weight"), grads[::2]):
            assert not torch.equal(grad, grad.to(dtype).float()), f"{name} rounded to 16 bits"
    # The reference on the same 16-bit-rounded inputs, in fp64.
    want_args = fp64(*(x.to(dtype) for x in (hs, ts, weight)), bias)
    want = ncrl_kernels.fused_ncrl(*want_args, labels.cpu(), block_size=8, backend="reference")
    want_grads = torch.autograd.grad(want, want_args)
    assert_close(loss, want, dtype, "autocast loss")
    assert_close(loss_only, want, dtype, "autocast loss on 16-bit logits")
    for a, e in zip(grads, want_grads):
        assert_close(a, e, dtype, "autocast grad")
