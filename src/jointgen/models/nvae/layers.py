"""Building blocks of NVAE: weight-normalised convs, Squeeze-and-Excitation, residual cells.

NVAE: A Deep Hierarchical Variational Autoencoder (Vahdat & Kautz, NeurIPS 2020),
https://arxiv.org/abs/2007.03898, official code https://github.com/NVlabs/NVAE (not used here:
this is an independent implementation from the paper and the jointgen spec).

Only torch is imported, so every block can be built and tested without Lightning.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BN_MOMENTUM = 0.05  # NVAE uses 0.05 (PyTorch convention) for every BatchNorm
BN_EPS = 1e-5
RES_SCALE = 0.1  # fixed scale of every residual branch; not learned


# --- weight-normalised convolution ----------------------------------------------------------


class WNConv2d(nn.Conv2d):
    """Conv2d with NVAE-style weight normalisation.

    The effective weight is ``exp(log_weight_norm) * w / (||w|| + 1e-5)`` with the norm taken
    per output channel over (Cin, kh, kw). ``log_weight_norm`` starts at ``log(||w|| + 0.01)``
    so the initial effective weight equals PyTorch's default initialisation.

    The normalised weight of the last forward is cached (spec 1.3) so the spectral regulariser
    reuses it, graph included. The cache is ignored once a parameter changes in place and
    dropped when backward has passed through it (its graph is then freed).
    """

    def __init__(self, *args, weight_norm: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_weight_norm = weight_norm
        if weight_norm:
            init = torch.log(self._weight_norm(self.weight.detach()) + 1e-2)
            self.log_weight_norm = nn.Parameter(init)
        else:
            self.register_parameter("log_weight_norm", None)
        self._cache: tuple | None = None
        # depthwise kxk, stride 1: eligible for the cheaper CPU weight gradient below
        self._depthwise = (
            self.groups == self.in_channels == self.out_channels
            and self.kernel_size[0] > 1
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
        )

    @staticmethod
    def _weight_norm(w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)

    def _compute_weight(self) -> torch.Tensor:
        # eps 1e-5 in the denominator keeps backward finite when a kernel's norm collapses;
        # the per-channel factor is formed first so the full kernel is touched once
        scale = self.log_weight_norm.exp() / (self._weight_norm(self.weight) + 1e-5)
        return self.weight * scale

    def _cache_key(self) -> tuple:
        ps = (self.weight, self.log_weight_norm)
        return (torch.is_grad_enabled(), *[(p.data_ptr(), p._version, p.dtype) for p in ps])

    def _forget(self, _grad: torch.Tensor) -> None:
        self._cache = None  # backward has reached the cached weight: its graph is spent

    def normalized_weight(self) -> torch.Tensor:
        """The weight the convolution actually applies (what spectral regularisation reads)."""
        if not self.use_weight_norm:
            return self.weight
        if self._cache is not None and self._cache[0] == self._cache_key():
            return self._cache[1]
        return self._compute_weight()

    def forward_weight(self) -> torch.Tensor:
        """The weight for a forward pass, cached for the spectral regulariser."""
        w = self.weight
        if type(self).normalized_weight is not WNConv2d.normalized_weight:
            w = self.normalized_weight()  # a subclass's own weight (the masked flow convs)
        elif self.use_weight_norm:
            w = self._compute_weight()
            if not (_recomputing() or torch.compiler.is_compiling()):
                self._cache = (self._cache_key(), w)
                if w.requires_grad:
                    w.register_hook(self._forget)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.forward_weight()
        if (
            self._depthwise
            and self.bias is None
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and _custom_dw_grad(x)
            and not torch.compiler.is_compiling()
        ):
            return _DepthwiseConv.apply(x, w, self.padding)
        return self._conv_forward(x, w, self.bias)

    def __getstate__(self):  # the cached tensor (and its graph) is not part of the state
        return {**self.__dict__, "_cache": None}


# --- depthwise conv with a cheaper weight gradient on CPU -------------------------------------
# oneDNN's weight gradient for depthwise 5x5 is the slowest op of an NVAE step on CPU: several
# times its forward, worst in NCHW and for small batches. Summing the 25 shifted products
# ``x[.., i:i+H, j:j+W] * grad`` over (batch, H, W) gives the same numbers faster there.


def _custom_dw_grad(x: torch.Tensor) -> bool:
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return True  # NCHW (or ambiguous): the shifted-product sum always wins
    # channels-last: oneDNN is competitive up to a few hundred channels, then falls far behind
    # (6x at 1536 channels, the NVAE decoder cells of the CIFAR-10 model)
    return x.shape[1] >= 256


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, padding):
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        return F.conv2d(x, w, None, 1, padding, 1, w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx, gw = _depthwise_backward(grad, x, w, ctx.padding, *ctx.needs_input_grad[:2])
        return gx, gw, None


def _depthwise_backward(grad, x, w, padding, need_x: bool, need_w: bool):
    """Input and weight gradients of a stride-1, bias-free depthwise conv."""
    (ph, pw), (kh, kw) = padding, w.shape[2:]
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    grad = grad.contiguous(memory_format=fmt)
    shifted = need_w and x.device.type == "cpu" and _custom_dw_grad(x)
    gx = gw = None
    if need_x or (need_w and not shifted):
        mask = (need_x, need_w and not shifted, False)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, (1, 1), (ph, pw), (1, 1), False, (0, 0), w.shape[0], mask
        )
    if shifted:
        h, wd = grad.shape[2:]
        xp = F.pad(x, (pw, pw, ph, ph))
        gw = torch.empty(w.shape[0], kh, kw, dtype=w.dtype, device=w.device)
        for i in range(kh):
            for j in range(kw):
                gw[:, i, j] = (xp[:, :, i : i + h, j : j + wd] * grad).sum((0, 2, 3))
        gw = gw.unsqueeze(1).contiguous(memory_format=fmt)
    return gx, gw


class _UpsampleDepthwise(torch.autograd.Function):
    """Nearest x2 upsampling then a depthwise conv, storing the *low-resolution* input: backward
    upsamples it again (a copy) instead of keeping the 4x larger tensor from forward."""

    @staticmethod
    def forward(ctx, x, w, padding):
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        out = None
        for i, n in _batch_chunks(x, scale=4):  # a few images at a time (see _CHUNK_BYTES)
            up = F.interpolate(x.narrow(0, i, n), scale_factor=2, mode="nearest")
            o = F.conv2d(up, w, None, 1, padding, 1, w.shape[0])
            if n == x.shape[0]:
                return o
            del up
            if out is None:
                shape = (x.shape[0], *o.shape[1:])
                out = torch.empty(shape, dtype=o.dtype, device=o.device, memory_format=_format(o))
            out.narrow(0, i, n).copy_(o)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if need_x else None
        gw = None
        for i, n in _batch_chunks(x, scale=4):  # a few images at a time (see _CHUNK_BYTES)
            up = F.interpolate(x.narrow(0, i, n), scale_factor=2, mode="nearest")
            g_up, g_w = _depthwise_backward(
                grad.narrow(0, i, n), up, w, ctx.padding, need_x, need_w
            )
            del up
            if need_x:
                # each input pixel fed a 2x2 block: its gradient is the block's sum
                torch.ops.aten.upsample_nearest2d_backward.grad_input(
                    g_up,
                    list(g_up.shape[2:]),
                    [n, *x.shape[1:]],
                    None,
                    None,
                    grad_input=gx.narrow(0, i, n),
                )
            gw = _add(gw, g_w)
        return gx, gw, None


def upsample_depthwise(x: torch.Tensor, dw: WNConv2d) -> torch.Tensor:
    """``dw(interpolate(x, scale_factor=2, mode="nearest"))`` for a bias-free depthwise conv."""
    grad = torch.is_grad_enabled() and (x.requires_grad or dw.weight.requires_grad)
    if not grad or torch.compiler.is_compiling() or dw.use_weight_norm or not dw._depthwise:
        return dw(F.interpolate(x, scale_factor=2, mode="nearest"))
    return _UpsampleDepthwise.apply(x, dw.weight, dw.padding)


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, **kw) -> WNConv2d:
    """A weight-normalised conv with bias and 'same' padding (the NVAE default conv)."""
    return WNConv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, **kw)


def plain_conv(cin: int, cout: int, k: int = 1, groups: int = 1) -> WNConv2d:
    """A conv without weight norm and bias: the convs inside inverted residuals."""
    return WNConv2d(
        cin, cout, k, padding=(k - 1) // 2, groups=groups, bias=False, weight_norm=False
    )


# --- BatchNorm that survives recomputation ----------------------------------------------------
# Activation checkpointing re-runs a cell's forward in backward. A plain BatchNorm would then
# update its running statistics a second time; during the re-run ours normalises with the batch
# statistics (the same values) and leaves the running statistics alone. (torch's own BatchNorm
# updates twice under checkpointing, and so did this package's previous recompute option.)

_state = threading.local()


def _recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recompute_context():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recompute_context()  # (first run, re-run)


def checkpoint_call(fn, *args):
    """Non-reentrant activation checkpointing that keeps BN running statistics exact."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_checkpoint_contexts)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that does not update its running statistics when recomputed.

    ``forward(x, replicas=4)`` normalises ``x`` as if it were its nearest-neighbour x2
    upsampling: the batch mean and variance are the same, and the running variance takes the
    unbiased correction of the 4x larger count. The output is that of BN on the upsampled
    tensor, before the upsampling (both are per-element maps of the same statistics).
    """

    def forward(self, x: torch.Tensor, replicas: int = 1) -> torch.Tensor:
        if replicas > 1 and self.training and self.track_running_stats:
            y, mean, invstd = torch.ops.aten.native_batch_norm(
                x, self.weight, self.bias, None, None, True, 0.0, self.eps
            )
            if not _recomputing():
                self.update_running_stats(mean, invstd, x, replicas)
            return y
        if self.training and self.track_running_stats and _recomputing():
            # throw-away copies: the autograd node must save the same tensors as the first run
            rm, rv = self.running_mean.clone(), self.running_var.clone()
            return F.batch_norm(x, rm, rv, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)

    @torch.no_grad()
    def update_running_stats(
        self, mean: torch.Tensor, invstd: torch.Tensor, x: torch.Tensor, replicas: int
    ) -> None:
        """Count a batch whose statistics (``mean``, ``invstd`` of ``x``) stand for ``replicas``
        copies of every element of ``x``."""
        factor = self.count_batch()
        n = x.numel() // x.shape[1] * replicas
        var = invstd.double().pow(-2).sub(self.eps).mul(n / max(n - 1, 1))
        rm, rv = self.running_mean, self.running_var
        rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(var.to(rv.dtype), alpha=factor)

    def count_batch(self) -> float:
        """Count this batch as ``forward`` does; returns the running-average factor."""
        if self.num_batches_tracked is None:
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def batch_norm(c: int) -> BatchNorm2d:
    return BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


# --- memory-lean BatchNorm + Swish -----------------------------------------------------------


def _bn_swish_forward(x, weight, bias, running_mean, running_var, momentum, eps, update):
    """Swish(BN(x)) in training mode; returns it with the batch mean and inverse std."""
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, momentum, eps
    )
    if update is not None:  # running statistics kept by the caller (BN ``replicas``)
        update(mean, invstd, x)
    return F.silu(y, inplace=True), mean, invstd  # y itself is not needed for backward


def _bn_output(x, weight, bias, mean, invstd, out=None) -> torch.Tensor:
    """The training-mode BN output recomputed from its input with one fused multiply-add
    (into ``out`` when given, a tensor like ``x``)."""
    scale = invstd * weight
    shift = bias - mean * scale
    out = torch.empty_like(x) if out is None else out
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=out)


def _bn_swish_backward(gy, buf, x, weight, mean, invstd, eps, needs):
    """Gradients (x, weight, bias) of ``Swish(BN(x))`` given the output gradient ``gy`` and the
    recomputed BN output ``buf``; ``buf`` receives in turn the Swish and the input gradient."""
    gy = torch.ops.aten.silu_backward.grad_input(gy, buf, grad_input=buf)
    return _bn_backward(gy, x, weight, mean, invstd, eps, needs)


def _bn_backward(gy, x, weight, mean, invstd, eps, needs):
    """Gradients (x, weight, bias) of training-mode BN; the input gradient overwrites ``gy``."""
    # per-channel sums: gb = sum(gy), gw = sum(gy * (x - mean)) * invstd; with the input
    # gradient masked out torch computes them without full-size temporaries
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        gy, x, weight, None, None, mean, invstd, True, eps, (False, True, True)
    )
    gx = None
    if needs[0]:
        # gx = scale * (gy - gb / n - (x - mean) * invstd * gw / n), written into gy
        shape = (1, -1, 1, 1)
        n = x.numel() // x.shape[1]
        scale = invstd * weight
        k2 = scale * invstd * gw / -n
        k3 = scale * gb / -n - mean * k2
        gx = gy.mul_(scale.view(shape)).addcmul_(x, k2.view(shape)).add_(k3.view(shape))
    return gx, gw if needs[1] else None, gb if needs[2] else None


# The fused functions below (and upsample + depthwise) work a few images at a time on CPU: their
# full-size temporaries would otherwise come on top of every saved activation, and glibc seldom
# reuses the holes they leave. Chunks of at most 512 KiB per temporary (tiny config, channels-last,
# peak RSS: 0.390 GB unchunked, 0.380 at 1 MiB, 0.379 at 512 KiB; with checkpointing 0.376, 0.366,
# 0.362); accelerators take the whole batch (fewer kernel launches).
_CHUNK_BYTES = {"cpu": 1 << 19}


def _batch_chunks(x: torch.Tensor, scale: int = 1) -> list[tuple[int, int]]:
    """(start, length) pairs along the batch; a chunk's temporaries, ``scale`` times its part of
    ``x``, stay within ``_CHUNK_BYTES`` (one image at least)."""
    b = x.shape[0]
    per_image = max(x.numel() // max(b, 1) * x.element_size() * scale, 1)
    limit = _CHUNK_BYTES.get(x.device.type)
    n = b if limit is None else max(1, limit // per_image)
    return [(i, min(n, b - i)) for i in range(0, b, n)] or [(0, 0)]


def _add(total, part):
    return part if total is None else total if part is None else total.add_(part)


class _BNSwishFn(torch.autograd.Function):
    """Training-mode BN then Swish, storing only the BN input; backward recomputes the BN
    output with one fused multiply-add (NVAE's fused BN-Swish, written with aten ops).

    Backward allocates a single full-size buffer, which holds in turn the recomputed BN output,
    the Swish gradient and the input gradient: torch's batch-norm backward would take two more
    (its result and a temporary), at the memory peak of a checkpointed cell's backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, update=None):
        args = (x, weight, bias, running_mean, running_var, momentum, eps, update)
        out, mean, invstd = _bn_swish_forward(*args)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        buf = _bn_output(x, weight, bias, mean, invstd)
        grad = grad.contiguous(memory_format=_format(x))
        needs = ctx.needs_input_grad[:3]
        grads = _bn_swish_backward(grad, buf, x, weight, mean, invstd, ctx.eps, needs)
        return *grads, None, None, None, None, None


class _BNSwishConvFn(torch.autograd.Function):
    """``conv(Swish(BN(x)))`` storing only the BN input ``x``: the conv input (the Swish
    output) is recomputed in backward instead of being kept between the passes, so a cell's
    residual branch keeps one tensor per BN-Swish-conv instead of two."""

    @staticmethod
    def forward(ctx, x, bn_w, bn_b, rm, rv, momentum, eps, update, w, b, conv_args, depthwise):
        stride, padding, dilation, groups = conv_args
        chunks = _batch_chunks(x)
        if len(chunks) == 1:
            a, mean, invstd = _bn_swish_forward(x, bn_w, bn_b, rm, rv, momentum, eps, update)
            out = F.conv2d(a, w, b, stride, padding, dilation, groups)
        else:
            # the statistics of the whole batch (the kernel native_batch_norm uses, running
            # statistics included), then BN, Swish and the conv a few images at a time
            mean, var = torch.batch_norm_update_stats(x, rm, rv, momentum)
            invstd = torch.sqrt(var + eps).reciprocal_()
            if update is not None:
                update(mean, invstd, x)
            out = None
            for i, n in chunks:
                a = F.silu(_bn_output(x.narrow(0, i, n), bn_w, bn_b, mean, invstd), inplace=True)
                o = F.conv2d(a, w, b, stride, padding, dilation, groups)
                del a
                if out is None:
                    shape = (x.shape[0], *o.shape[1:])
                    out = torch.empty(
                        shape, dtype=o.dtype, device=o.device, memory_format=_format(o)
                    )
                out.narrow(0, i, n).copy_(o)
        ctx.save_for_backward(x, bn_w, bn_b, mean, invstd, w)
        ctx.eps, ctx.conv_args, ctx.depthwise = eps, conv_args, depthwise
        ctx.bias_sizes = None if b is None else list(b.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, bn_w, bn_b, mean, invstd, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need = ctx.needs_input_grad
        # per chunk of images one buffer holds the conv input (the Swish output), then the BN
        # output recomputed again; the Swish gradients fill one full-size tensor, which then
        # receives the input gradient
        gy = torch.empty_like(x)
        g_cw = g_cb = None
        for i, n in _batch_chunks(x):
            xs, gs = x.narrow(0, i, n), grad.narrow(0, i, n)
            buf = F.silu(_bn_output(xs, bn_w, bn_b, mean, invstd), inplace=True)
            gb = None
            if ctx.depthwise:  # the cheaper weight gradient of a CPU depthwise conv
                g_a, gw = _depthwise_backward(gs, buf, w, padding, True, need[8])
            else:
                mask = (True, need[8], need[9] and ctx.bias_sizes is not None)
                g_a, gw, gb = torch.ops.aten.convolution_backward(
                    gs,
                    buf,
                    w,
                    ctx.bias_sizes,
                    stride,
                    padding,
                    dilation,
                    False,
                    (0, 0),
                    groups,
                    mask,
                )
            _bn_output(xs, bn_w, bn_b, mean, invstd, out=buf)
            torch.ops.aten.silu_backward.grad_input(g_a, buf, grad_input=gy.narrow(0, i, n))
            del g_a, buf
            g_cw, g_cb = _add(g_cw, gw), _add(g_cb, gb)
        grads = _bn_backward(gy, x, bn_w, mean, invstd, ctx.eps, need[:3])
        return *grads, None, None, None, None, None, g_cw, g_cb, None, None


def _format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class BNSwish(nn.Module):
    """BatchNorm followed by Swish.

    With ``recompute=True`` training runs a fused function that stores only the BN input and
    recomputes the BN output in backward (the trick the NVAE paper credits with ~18% memory
    savings), at the cost of one extra elementwise pass.
    """

    def __init__(self, c: int, recompute: bool = False) -> None:
        super().__init__()
        self.bn = batch_norm(c)
        self.recompute = recompute

    def fused_args(self, x: torch.Tensor, replicas: int = 1) -> tuple | None:
        """Arguments of the fused functions (after ``x``), or None for the plain path."""
        bn = self.bn
        fused = self.recompute and self.training and torch.is_grad_enabled()
        # a SyncBatchNorm (multi-GPU conversion) or an affine-free BN takes the plain path
        if not (fused and type(bn) is BatchNorm2d and bn.affine and x.requires_grad):
            return None
        update = None
        if _recomputing() or not bn.track_running_stats:
            stats, momentum = (None, None), 0.0
        elif replicas > 1:
            stats, momentum = (None, None), 0.0
            update = functools.partial(_update_replicated, bn, replicas)
        else:
            stats, momentum = (bn.running_mean, bn.running_var), bn.count_batch()
        return bn.weight, bn.bias, *stats, momentum, bn.eps, update

    def forward(self, x: torch.Tensor, replicas: int = 1) -> torch.Tensor:
        """``replicas``: see :class:`BatchNorm2d` (only for this package's BatchNorm2d)."""
        args = self.fused_args(x, replicas)
        if args is None:
            return F.silu(self.bn(x) if replicas == 1 else self.bn(x, replicas))
        return _BNSwishFn.apply(x, *args)


def _update_replicated(bn: BatchNorm2d, replicas: int, mean, invstd, x) -> None:
    bn.update_running_stats(mean, invstd, x, replicas)


def bn_swish_conv(act: BNSwish, conv: WNConv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(act(x))``; with ``act.recompute`` in training, one function that keeps only
    ``x`` for backward (see :class:`_BNSwishConvFn`)."""
    args = act.fused_args(x)
    plain = conv.padding_mode != "zeros" or isinstance(conv.padding, str)
    if args is None or plain or torch.compiler.is_compiling():
        return conv(act(x))
    w = conv.forward_weight()
    depthwise = conv._depthwise and conv.bias is None and x.device.type == "cpu"
    conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return _BNSwishConvFn.apply(x, *args, w, conv.bias, conv_args, depthwise)


# --- Squeeze-and-Excitation and skips --------------------------------------------------------


class SE(nn.Module):
    """Squeeze-and-Excitation (Hu et al., 2018): pool, Linear(C, max(C/16, 4)), ReLU, Linear,
    sigmoid."""

    def __init__(self, c: int) -> None:
        super().__init__()
        hidden = max(c // 16, 4)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Down-sampling skip: Swish, then four shifted 1x1 stride-2 convs concatenated."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        quarter = cout // 4
        sizes = [quarter, quarter, quarter, cout - 3 * quarter]
        self.convs = nn.ModuleList(conv(cin, c, k=1, stride=2) for c in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        # for even sizes the shifted inputs give the same output size as the unshifted one
        return torch.cat([c(xs) for c, xs in zip(self.convs, shifted)], dim=1)


class UpSkip(nn.Module):
    """Up-sampling skip: bilinear x2 (align_corners=True), then a 1x1 conv.

    Computed in the other order, conv then upsampling: the two commute (the conv mixes channels
    per pixel, the interpolation mixes pixels per channel with weights summing to one, so the
    bias passes through), and the conv then runs on, and keeps for backward, a quarter of the
    pixels.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv(cin, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=True)


# --- residual cells --------------------------------------------------------------------------


class BNSwishConv(nn.Module):
    """BN, Swish, Conv3x3 (WN, bias): the op of encoder and pre-process cells."""

    def __init__(self, cin: int, cout: int, stride: int = 1, recompute: bool = False) -> None:
        super().__init__()
        self.act = BNSwish(cin, recompute)
        self.conv = conv(cin, cout, k=3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_swish_conv(self.act, self.conv, x)


class InvertedResidual(nn.Module):
    """[up x2] BN, 1x1 expand, BN, Swish, depthwise 5x5, BN, Swish, 1x1 project, BN.

    The convs here have neither weight norm nor bias since a BN follows each (spec 1.2).
    """

    def __init__(
        self, cin: int, cout: int, expand: int, upsample: bool = False, recompute: bool = False
    ) -> None:
        super().__init__()
        hidden = cin * expand
        self.upsample = upsample
        self.bn_in = batch_norm(cin)
        self.expand = plain_conv(cin, hidden, 1)
        self.act1 = BNSwish(hidden, recompute)
        self.dw = plain_conv(hidden, hidden, 5, groups=hidden)
        self.act2 = BNSwish(hidden, recompute)
        self.project = plain_conv(hidden, cout, 1)
        self.bn_out = batch_norm(cout)

    def _low_res(self) -> bool:
        # only this package's BatchNorm2d can count the replicated statistics (a SyncBatchNorm
        # from a multi-GPU conversion keeps the upsample-first order)
        return type(self.bn_in) is BatchNorm2d and type(self.act1.bn) is BatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample and self._low_res():
            # BN, 1x1 conv and Swish commute with nearest upsampling, so they run before it,
            # on a quarter of the pixels; the upsampling is folded into the depthwise conv
            x = self.act1(self.expand(self.bn_in(x, 4)), 4)
            x = upsample_depthwise(x, self.dw)
        else:
            if self.upsample:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = bn_swish_conv(self.act1, self.dw, self.expand(self.bn_in(x)))
        return self.bn_out(bn_swish_conv(self.act2, self.project, x))


class Cell(nn.Module):
    """A residual cell: ``skip(x) + 0.1 * SE(ops(x))``.

    Args:
        kind: one of ``enc`` (normal encoder/pre-process), ``enc_down`` (stride 2, channels x2),
            ``dec`` (decoder normal, inverted residual E=6), ``dec_up`` (x2, channels /2),
            ``post`` (inverted residual E=3), ``post_up``.
        cin: input channels; the output has ``2*cin`` for ``*_down``, ``cin/2`` for ``*_up``.
        use_se: Squeeze-and-Excitation on the residual branch (on in every published run).
        recompute: recompute BN+Swish in backward to save memory.
        checkpoint_cell: activation checkpointing of the whole cell (more memory saved).
    """

    def __init__(
        self,
        kind: str,
        cin: int,
        use_se: bool = True,
        recompute: bool = False,
        checkpoint_cell: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.checkpoint_cell = checkpoint_cell
        if kind == "enc":
            cout, self.skip = cin, None
            self.ops = nn.Sequential(
                BNSwishConv(cin, cin, 1, recompute), BNSwishConv(cin, cin, 1, recompute)
            )
        elif kind == "enc_down":
            cout = 2 * cin
            self.skip = FactorizedReduce(cin, cout)
            self.ops = nn.Sequential(
                BNSwishConv(cin, cout, 2, recompute), BNSwishConv(cout, cout, 1, recompute)
            )
        elif kind in ("dec", "post"):
            cout, self.skip = cin, None
            self.ops = InvertedResidual(cin, cin, 6 if kind == "dec" else 3, recompute=recompute)
        elif kind in ("dec_up", "post_up"):
            cout = cin // 2
            self.skip = UpSkip(cin, cout)
            expand = 6 if kind == "dec_up" else 3
            self.ops = InvertedResidual(cin, cout, expand, upsample=True, recompute=recompute)
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
        self.cout = cout
        self.se = SE(cout) if use_se else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.skip is None else self.skip(x)
        return s + RES_SCALE * self.se(self.ops(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_cell and self.training and torch.is_grad_enabled():
            return checkpoint_call(self._forward, x)
        return self._forward(x)


# --- combiners -------------------------------------------------------------------------------


class EncCombiner(nn.Module):
    """Encoder combiner: ``enc_feature + Conv1x1(dec_state)``."""

    def __init__(self, c_enc: int, c_dec: int) -> None:
        super().__init__()
        self.conv = conv(c_dec, c_enc, k=1)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return enc + self.conv(dec)


class DecCombiner(nn.Module):
    """Decoder combiner: ``Conv1x1(concat(dec_state, z))`` back to the decoder width."""

    def __init__(self, c_dec: int, c_z: int) -> None:
        super().__init__()
        self.conv = conv(c_dec + c_z, c_dec, k=1)

    def forward(self, dec: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([dec, z], dim=1))
