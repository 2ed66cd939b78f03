"""A run never crashes on a kernel this GPU or this Triton cannot compile or launch: each failure kind, injected
into the Triton launch (in the interpreter), makes backend="auto" warn once (naming the kernel, the device and
Triton's error) and run that call on the torch backend, with the reference's results, and keeps that decision for
the process; backend="triton" raises a RuntimeError that says the same."""

import os
import warnings

import pytest
import torch
from helpers.cases import Case, make_inputs

import gvpo_kernels as gk
from gvpo_kernels.ops import select

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="failures are injected into the interpreter's launches")

plan = pytest.importorskip("gvpo_kernels.triton.plan")


def out_of_resources():
    from triton.runtime.errors import OutOfResources
    return OutOfResources(98304, 65536, "shared memory")


def compilation_error():
    from triton.compiler.errors import CompilationError
    return CompilationError("def kernel(): ...", None, "unsupported dot precision 'tf32' on this target")


def missing_api():
    return AttributeError("module 'triton.language' has no attribute 'exp2'")


def driver_error():
    return RuntimeError("Triton Error [CUDA]: invalid argument")


KINDS = {"out-of-resources": out_of_resources, "compilation-error": compilation_error, "missing-api": missing_api,
         "driver-error": driver_error}
PATHS = {  # the entry point and the kernel whose failure it meets
    "loss": "token_logprob_fwd_kernel", "loss-backward": "token_logprob_bwd_kernel",
    "linear": "linear_logprob_fwd_kernel", "group": "gvpo_group_fwd_kernel",
    "stats": "token_logprob_fwd_kernel", "linear-stats-backward": "linear_logprob_bwd_kernel",
}


@pytest.fixture
def injected(monkeypatch):
    """inject(kernel name, error): that kernel's launches raise the error; returns the list of launches tried."""
    monkeypatch.setattr(plan, "_FAILED", {})
    monkeypatch.setattr(select, "_warned", set())
    monkeypatch.setitem(select.AUTO, "cpu", "triton")  # "auto" runs Triton (the interpreter) on these CPU tensors
    tried = []

    def inject(name, error):
        run = plan._run

        def failing(p):
            tried.append(p.kernel.__name__)
            if p.kernel.__name__ == name:
                raise error
            run(p)

        monkeypatch.setattr(plan, "_run", failing)
        return tried

    return inject


def call(path, backend):
    """(outputs, gradients) of one call of ``path`` on ``backend`` (the reference for "reference")."""
    linear = path.startswith("linear")
    inputs = make_inputs(Case(groups=(2, 2), seq_len=6, vocab=50, hidden_size=16 if linear else 0, bias=linear),
                         torch.device("cpu"))
    fns = gk.reference if backend == "reference" else gk
    kw = {} if backend == "reference" else dict(backend=backend)
    labels, rewards, kwargs = inputs["labels"], inputs["rewards"], inputs["kwargs"]
    if path in ("loss", "loss-backward", "group"):
        x = inputs["logits"].detach().clone().requires_grad_()
        out = fns.gvpo_loss(x, labels, rewards, **kwargs, **kw)
        leaves = [x]
    elif path == "stats":
        x = inputs["logits"].detach().clone().requires_grad_()
        lp, ent = fns.token_logprobs(x, labels, mask=kwargs["mask"], return_entropy=True, **kw)
        out, leaves = lp.sum() + ent.sum(), [x]
    else:
        leaves = [inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        if path == "linear":
            out = fns.linear_gvpo_loss(*leaves[:2], labels, rewards, bias=leaves[2], **kwargs, **kw)
        else:
            lp, ent = fns.linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], mask=kwargs["mask"],
                                                return_entropy=True, **kw)
            out = lp.sum() + ent.sum()
    ran = [select.last_backend()]
    out.backward()
    return out.detach(), [t.grad for t in leaves], ran + [select.last_backend()]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_auto_falls_back_to_torch_with_one_warning(injected, kind, path):
    kernel = PATHS[path]
    tried = injected(kernel, KINDS[kind]())
    want = call(path, "reference")
    with pytest.warns(UserWarning) as record:
        got = call(path, "auto")
    messages = [str(w.message) for w in record if "torch backend instead" in str(w.message)]
    assert len(messages) == 1, messages
    error = KINDS[kind]()
    assert kernel in messages[0] and "the Triton interpreter" in messages[0] and type(error).__name__ in messages[0]
    assert "torch" in got[2]  # where the forward fell back, the backward may run its kernel on Triton
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the decision is kept: no second warning, and the failed kernel is not compiled again
    launches = tried.count(kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = call(path, "auto")
    assert tried.count(kernel) == launches
    torch.testing.assert_close(again[0], got[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_named_triton_backend_raises_saying_why(injected, kind):
    injected("token_logprob_fwd_kernel", KINDS[kind]())
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: the Triton kernel "
                                           "token_logprob_fwd_kernel cannot run on the Triton interpreter") as info:
        call("loss", "triton")
    assert type(KINDS[kind]()).__name__ in str(info.value)


def test_an_old_triton_is_refused_before_any_kernel(monkeypatch):
    """A Triton older than the oldest one checked: "auto" warns and runs torch; "triton" raises, naming the
    version."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.4.0")
    monkeypatch.setattr(select, "_warned", set())
    with pytest.raises(RuntimeError, match="Triton 3.4.0 is older than 3.5"):
        call("loss", "triton")
    reason = gk.backend.unavailable_reason("triton", torch.device("cpu"))
    assert "3.4.0" in reason


def test_the_last_backend_is_reported():
    assert call("loss", "torch")[2] == ["torch", "torch"]
    assert call("loss", "triton")[2] == ["triton", "triton"]
