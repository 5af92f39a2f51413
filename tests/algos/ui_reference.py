"""The weight change as ComfyUI and the A1111 web UI compute it from a saved file, written from their sources
(comfy/weight_adapter/*.py, extensions-builtin/Lora/network_*.py) and independent of lorakit's code.

Everything runs in float64. Where the two UIs differ, the function says which one it follows:
- strength (multiplier) of Diag-OFT: A1111's W + s (R^T W - W) (ComfyUI applies s^2 when s != 1);
- BOFT: ComfyUI's (A1111 has no BOFT);
- (IA)^3: A1111's (ComfyUI has none), with LyCORIS' per-output-channel product for convs, which A1111 cannot apply;
- LoKr with a Tucker core (lokr_t2): A1111's, which makes w2 contiguous before torch.kron (ComfyUI's kron fails on
  its non-contiguous einsum result and leaves the layer unpatched; see docs/algorithms.md);
- DoRA: the per-input-column norm of W + scale dW, which A1111 always uses and ComfyUI uses for a
  column-shaped dora_scale; for a row-shaped dora_scale (dora_axis="out") LyCORIS' row norm of W + scale dW.
"""

from __future__ import annotations

import torch


def _f64(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _alpha_scale(sd, dim):
    return float(sd["alpha"]) / dim if "alpha" in sd else 1.0


def _tucker(t, wa, wb):
    # ComfyUI: einsum("i j k l, j r, i p -> p r k l", t, wb, wa), for any number of kernel dims
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


def lora_delta(sd, w):
    up, down = sd["lora_up.weight"], sd["lora_down.weight"]
    if "lora_mid.weight" in sd:
        d = torch.einsum("nm...,in,mj->ij...", sd["lora_mid.weight"], up.flatten(1), down.flatten(1))
    else:
        d = up.flatten(1) @ down.flatten(1)
    return d.reshape(w.shape) * _alpha_scale(sd, down.shape[0])


def loha_delta(sd, w):
    if "hada_t1" in sd:
        m1 = _tucker(sd["hada_t1"], sd["hada_w1_a"], sd["hada_w1_b"])
        m2 = _tucker(sd["hada_t2"], sd["hada_w2_a"], sd["hada_w2_b"])
    else:
        m1, m2 = sd["hada_w1_a"] @ sd["hada_w1_b"], sd["hada_w2_a"] @ sd["hada_w2_b"]
    return (m1 * m2).reshape(w.shape) * _alpha_scale(sd, sd["hada_w1_b"].shape[0])


def lokr_delta(sd, w):
    dim = None
    w1 = sd.get("lokr_w1")
    if w1 is None:
        dim = sd["lokr_w1_b"].shape[0]
        w1 = sd["lokr_w1_a"] @ sd["lokr_w1_b"]
    w2 = sd.get("lokr_w2")
    if w2 is None:
        dim = sd["lokr_w2_b"].shape[0]
        if "lokr_t2" in sd:
            w2 = _tucker(sd["lokr_t2"], sd["lokr_w2_a"], sd["lokr_w2_b"])
        else:
            w2 = sd["lokr_w2_a"] @ sd["lokr_w2_b"]
    if w2.dim() > 2:  # a decomposed conv w2 stays 2-d: the 2-d kron is reshaped to the weight, as the UIs do
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    scale = float(sd["alpha"]) / dim if ("alpha" in sd and dim is not None) else 1.0
    # .contiguous(): A1111's make_kron; ComfyUI's kron fails on a Tucker w2 here (module docstring)
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(w.shape) * scale


def glora_delta(sd, w):
    a1, a2, b1, b2 = (sd[k].flatten(1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    rank = a2.shape[0]
    wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
    return (wa + (b1 @ b2).reshape(w.shape)) * _alpha_scale(sd, rank)


def ia3_delta(sd, w):
    v = sd["weight"]
    if int(sd["on_input"]):
        return w * v  # (in,) or (1, in, 1, ...) broadcast over the input columns
    return w * v.reshape(-1, *([1] * (w.dim() - 1)))


def _cayley_comfy(blocks, alpha):
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > alpha:
            q = q * alpha / q_norm
    return (eye + q) @ (eye - q).inverse()


def _cayley_a1111(blocks, alpha, out_dim):
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    q = blocks - blocks.transpose(1, 2)
    norm_q = torch.norm(q.flatten())
    new_norm_q = torch.clamp(norm_q, max=alpha * out_dim)
    q = q * ((new_norm_q + 1e-8) / (norm_q + 1e-8))
    return torch.matmul(eye + q, (eye - q).inverse())


def diag_oft_rotated(sd, w, a1111=False):
    blocks = sd["oft_blocks"]
    n, b, _ = blocks.shape
    alpha = float(sd.get("alpha", torch.tensor(0.0)))
    r = _cayley_a1111(blocks, alpha, w.shape[0]) if a1111 else _cayley_comfy(blocks, alpha)
    return torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)


def diag_oft_delta(sd, w, strength):
    rotated = diag_oft_rotated(sd, w)
    if "rescale" in sd:  # neither UI applies rescale; this is LyCORIS' merged weight
        rotated = rotated * sd["rescale"]
    return strength * (rotated - w)


def boft_delta(sd, w, strength):
    blocks = sd["oft_blocks"]
    m, _, b, _ = blocks.shape
    eye = torch.eye(b, dtype=blocks.dtype)
    r = _cayley_comfy(blocks, float(sd["alpha"]))
    inp = w
    for i in range(m):
        bi = r[i]
        g, k = 2, 2 ** i * (b // 2)
        if strength != 1:
            bi = bi * strength + (1 - strength) * eye
        inp = inp.unflatten(0, (-1, g, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        inp = torch.einsum("bij,bj...->bi...", bi, inp)
        inp = inp.flatten(0, 1).unflatten(0, (-1, k, g)).transpose(1, 2).flatten(0, 2)
    if "rescale" in sd:
        inp = inp * sd["rescale"]
    return strength * (inp - w)


def _dora(sd, w, delta, strength):
    v = w + delta
    ds = sd["dora_scale"]
    if ds.shape[0] == w.shape[0] and ds.dim() > 1 and ds.shape[1] == 1 and w.shape[0] != 1:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))  # LyCORIS row norm
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(v.shape[1], *([1] * (w.dim() - 1))).transpose(0, 1)  # A1111
    return strength * (v * (ds / norm) - w)


def ui_delta(sd, w, strength=1.0, bias=None):
    """(dW, d_bias) that a UI adds to the layer for these saved tensors of one module."""
    sd, w = _f64(sd), w.double()
    if "diff" in sd:
        return strength * sd["diff"], (strength * sd["diff_b"] if "diff_b" in sd else None)
    if "w_norm" in sd:
        return strength * sd["w_norm"], strength * sd["b_norm"]
    if "oft_blocks" in sd:
        fn = diag_oft_delta if sd["oft_blocks"].dim() == 3 else boft_delta
        return fn(sd, w, strength), None
    if "on_input" in sd:
        return strength * ia3_delta(sd, w), None
    for key, fn in (("lora_up.weight", lora_delta), ("hada_w1_a", loha_delta), ("a1.weight", glora_delta)):
        if key in sd:
            break
    else:
        fn = lokr_delta
    delta = fn(sd, w)
    if "dora_scale" in sd:
        return _dora(sd, w, delta, strength), None
    return strength * delta, None
