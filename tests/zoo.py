"""A zoo of published point-wise models, rewritten small from their papers' descriptions.

Each keeps what matters for per-point derivatives in the original: activations, skips and their
scalings, encodings, conditioning, old-style ``torch.nn.utils.weight_norm``, the way the forward
concatenates (``dim=1`` on 2-D inputs where the original does so), and the signature. Widths
are small so the tests are fast. tests/test_zoo.py checks each against autograd oracles.
"""
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def old_weight_norm(layer: nn.Module) -> nn.Module:
    """torch.nn.utils.weight_norm (the pre-hook version NeuS, IDR and DeepSDF use), without its warning."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(layer)


class FrequencyEmbedder:
    """NeRF's positional encoding [x, sin(2^k x), cos(2^k x)]_k, frequencies held as a tensor (as in NeRF).

    A plain object, not a module: NeRF, NeuS and IDR keep it as a function next to the network.
    """

    def __init__(self, d_in: int, n_freqs: int, include_input: bool = True):
        self.freq_bands = 2.0 ** torch.linspace(0.0, n_freqs - 1, n_freqs)
        self.include_input = include_input
        self.out_dim = d_in * (int(include_input) + 2 * n_freqs)

    def __call__(self, x):
        parts = [x] if self.include_input else []
        for freq in self.freq_bands:
            parts += [torch.sin(x * freq), torch.cos(x * freq)]
        return torch.cat(parts, -1)


def _geometric_init(lin: nn.Linear, layer: int, n_layers: int, d_in: int, d_embed: int, skips, bias: float,
                    encoded: bool):
    """SAL/IGR geometric init: the network starts close to the SDF of a sphere of radius `bias`."""
    out_dim, in_dim = lin.weight.shape
    with torch.no_grad():
        if layer == n_layers - 2:
            nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(in_dim), std=1e-4)
            nn.init.constant_(lin.bias, -bias)
        else:
            nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))
            nn.init.constant_(lin.bias, 0.0)
            if encoded and layer == 0:
                lin.weight[:, d_in:] = 0.0            # encoding features start switched off
            elif encoded and layer in skips:
                lin.weight[:, -(d_embed - d_in):] = 0.0


# ---- signed distance functions

class NeuSSDFNetwork(nn.Module):
    """NeuS (Wang et al. 2021): encoded input, Softplus(beta=100), a skip divided by sqrt(2), weight norm,
    output [sdf, features] with the sdf divided back by the input scale."""

    def __init__(self, d_in=3, d_feature=4, width=32, n_layers=4, skip_in=(2,), multires=4, bias=0.5, scale=1.0,
                 geometric_init=True, weight_norm=True):
        super().__init__()
        self.embed_fn = None
        d_embed = d_in
        if multires > 0:
            self.embed_fn = FrequencyEmbedder(d_in, multires)
            d_embed = self.embed_fn.out_dim
        dims = [d_embed] + [width] * n_layers + [1 + d_feature]
        self.num_layers = len(dims)
        self.skip_in = skip_in
        self.scale = scale
        for layer in range(self.num_layers - 1):
            out_dim = dims[layer + 1] - dims[0] if layer + 1 in skip_in else dims[layer + 1]
            lin = nn.Linear(dims[layer], out_dim)
            if geometric_init:
                _geometric_init(lin, layer, self.num_layers, d_in, d_embed, skip_in, bias, multires > 0)
            setattr(self, f"lin{layer}", old_weight_norm(lin) if weight_norm else lin)
        self.activation = nn.Softplus(beta=100)

    def forward(self, inputs):
        inputs = inputs * self.scale
        if self.embed_fn is not None:
            inputs = self.embed_fn(inputs)
        x = inputs
        for layer in range(self.num_layers - 1):
            lin = getattr(self, f"lin{layer}")
            if layer in self.skip_in:
                x = torch.cat([x, inputs], 1) / np.sqrt(2)
            x = lin(x)
            if layer < self.num_layers - 2:
                x = self.activation(x)
        return torch.cat([x[:, :1] / self.scale, x[:, 1:]], -1)


class IDRImplicitNetwork(nn.Module):
    """IDR (Yariv et al. 2020): like NeuS's, without the scale; output [sdf, feature vector]."""

    def __init__(self, feature_vector_size=4, d_in=3, d_out=1, dims=(32, 32, 32, 32), geometric_init=True, bias=1.0,
                 skip_in=(2,), weight_norm=True, multires=4):
        super().__init__()
        dims = [d_in] + list(dims) + [d_out + feature_vector_size]
        self.embed_fn = None
        if multires > 0:
            self.embed_fn = FrequencyEmbedder(d_in, multires)
            dims[0] = self.embed_fn.out_dim
        self.num_layers = len(dims)
        self.skip_in = skip_in
        for layer in range(self.num_layers - 1):
            out_dim = dims[layer + 1] - dims[0] if layer + 1 in skip_in else dims[layer + 1]
            lin = nn.Linear(dims[layer], out_dim)
            if geometric_init:
                _geometric_init(lin, layer, self.num_layers, d_in, dims[0], skip_in, bias, multires > 0)
            setattr(self, f"lin{layer}", old_weight_norm(lin) if weight_norm else lin)
        self.softplus = nn.Softplus(beta=100)

    def forward(self, input, compute_grad=False):
        if self.embed_fn is not None:
            input = self.embed_fn(input)
        x = input
        for layer in range(self.num_layers - 1):
            lin = getattr(self, f"lin{layer}")
            if layer in self.skip_in:
                x = torch.cat([x, input], 1) / np.sqrt(2)
            x = lin(x)
            if layer < self.num_layers - 2:
                x = self.softplus(x)
        return x


class IGRImplicitNet(nn.Module):
    """IGR (Gropp et al. 2020): plain Linear layers, Softplus(beta=100), skip / sqrt(2), geometric init."""

    def __init__(self, d_in=3, dims=(32, 32, 32, 32), skip_in=(2,), geometric_init=True, radius_init=1.0, beta=100):
        super().__init__()
        dims = [d_in] + list(dims) + [1]
        self.d_in = d_in
        self.num_layers = len(dims)
        self.skip_in = skip_in
        for layer in range(self.num_layers - 1):
            out_dim = dims[layer + 1] - d_in if layer + 1 in skip_in else dims[layer + 1]
            lin = nn.Linear(dims[layer], out_dim)
            if geometric_init:
                _geometric_init(lin, layer, self.num_layers, d_in, d_in, skip_in, radius_init, False)
            setattr(self, "lin" + str(layer), lin)
        self.activation = nn.Softplus(beta=beta) if beta > 0 else nn.ReLU()

    def forward(self, input):
        x = input
        for layer in range(self.num_layers - 1):
            lin = getattr(self, "lin" + str(layer))
            if layer in self.skip_in:
                x = torch.cat([x, input], -1) / np.sqrt(2)
            x = lin(x)
            if layer < self.num_layers - 2:
                x = self.activation(x)
        return x


class DeepSDFDecoder(nn.Module):
    """DeepSDF (Park et al. 2019): input [latent, xyz], the input concatenated again before `latent_in`,
    weight-normed ReLU layers with dropout, tanh on the output."""

    def __init__(self, latent_size=8, dims=(32, 32, 32, 32), dropout=(0, 1, 2, 3), dropout_prob=0.2,
                 norm_layers=(0, 1, 2, 3), latent_in=(2,), weight_norm=True, xyz_in_all=False, use_tanh=False,
                 latent_dropout=False):
        super().__init__()
        dims = [latent_size + 3] + list(dims) + [1]
        self.num_layers = len(dims)
        self.norm_layers = norm_layers
        self.latent_in = latent_in
        self.latent_dropout = latent_dropout
        self.xyz_in_all = xyz_in_all
        self.weight_norm = weight_norm
        self.use_tanh = use_tanh
        for layer in range(self.num_layers - 1):
            if layer + 1 in latent_in:
                out_dim = dims[layer + 1] - dims[0]
            else:
                out_dim = dims[layer + 1]
                if xyz_in_all and layer != self.num_layers - 2:
                    out_dim -= 3
            lin = nn.Linear(dims[layer], out_dim)
            setattr(self, "lin" + str(layer), old_weight_norm(lin) if weight_norm and layer in norm_layers else lin)
            if not weight_norm and layer in norm_layers:
                setattr(self, "bn" + str(layer), nn.LayerNorm(out_dim))
        self.relu = nn.ReLU()
        self.dropout = dropout
        self.dropout_prob = dropout_prob
        self.th = nn.Tanh()

    def forward(self, input):
        xyz = input[:, -3:]
        if input.shape[1] > 3 and self.latent_dropout:
            latent = F.dropout(input[:, :-3], p=0.2, training=self.training)
            x = torch.cat([latent, xyz], 1)
        else:
            x = input
        for layer in range(self.num_layers - 1):
            lin = getattr(self, "lin" + str(layer))
            if layer in self.latent_in:
                x = torch.cat([x, input], 1)
            elif layer != 0 and self.xyz_in_all:
                x = torch.cat([x, xyz], 1)
            x = lin(x)
            if layer == self.num_layers - 2 and self.use_tanh:
                x = self.th(x)
            if layer < self.num_layers - 2:
                if layer in self.norm_layers and not self.weight_norm:
                    x = getattr(self, "bn" + str(layer))(x)
                x = self.relu(x)
                if self.dropout is not None and layer in self.dropout:
                    x = F.dropout(x, p=self.dropout_prob, training=self.training)
        return self.th(x)


class LatentSDF(nn.Module):
    """How DeepSDF feeds a shape code: the decoder reads cat([latent, xyz]) per point."""

    def __init__(self, decoder: DeepSDFDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, xyz, latent):
        latent = latent.expand(*xyz.shape[:-1], latent.shape[-1])
        return self.decoder(torch.cat([latent, xyz], 1))


# ---- continuous normalizing flows: FFJORD's ODEnet (tabular) and torchdiffeq's hypernetwork CNF

class IgnoreLinear(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)

    def forward(self, t, x):
        return self._layer(x)


class ConcatLinear(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, x):
        return self._layer(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))


class SquashLinear(nn.Module):
    """The output gated by sigmoid(a linear function of t)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper(t.view(1, 1)))


class ConcatSquashLinear(nn.Module):
    """Gated by sigmoid(linear in t), then shifted by a bias linear in t."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        tt = t.view(1, 1)
        return self._layer(x) * torch.sigmoid(self._hyper_gate(tt)) + self._hyper_bias(tt)


class BlendLinear(nn.Module):
    """Interpolates between two Linear layers with t."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer0 = nn.Linear(dim_in, dim_out)
        self._layer1 = nn.Linear(dim_in, dim_out)

    def forward(self, t, x):
        y0 = self._layer0(x)
        return y0 + (self._layer1(x) - y0) * t


class HyperLinear(nn.Module):
    """A Linear layer whose weight and bias a small tanh MLP computes from t."""

    def __init__(self, dim_in, dim_out, hypernet_dim=8, n_hidden=1):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        dims = [1] + [hypernet_dim] * n_hidden + [dim_in * dim_out + dim_out]
        layers = []
        for i in range(1, len(dims)):
            layers.append(nn.Linear(dims[i - 1], dims[i]))
            if i < len(dims) - 1:
                layers.append(nn.Tanh())
        self._hypernet = nn.Sequential(*layers)

    def forward(self, t, x):
        params = self._hypernet(t.view(1, 1)).view(-1)
        b = params[:self.dim_out].view(self.dim_out)
        w = params[self.dim_out:].view(self.dim_out, self.dim_in)
        return F.linear(x, w, b)


ODE_LAYERS = {"ignore": IgnoreLinear, "concat": ConcatLinear, "squash": SquashLinear,
              "concatsquash": ConcatSquashLinear, "blend": BlendLinear, "hyper": HyperLinear}

# As in FFJORD, one activation instance per kind, shared by every layer and every network.
NONLINEARITIES = {"tanh": nn.Tanh(), "softplus": nn.Softplus(), "elu": nn.ELU(), "relu": nn.ReLU()}


class ODEnet(nn.Module):
    """FFJORD's dynamics network for tabular data: layers of one type, each reading t; forward(t, y)."""

    def __init__(self, hidden_dims, d, layer_type="concatsquash", nonlinearity="softplus"):
        super().__init__()
        base = ODE_LAYERS[layer_type]
        layers, acts, width = [], [], d
        for dim_out in tuple(hidden_dims) + (d,):
            layers.append(base(width, dim_out))
            acts.append(NONLINEARITIES[nonlinearity])
            width = dim_out
        self.layers = nn.ModuleList(layers)
        self.activation_fns = nn.ModuleList(acts[:-1])

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


class HyperNetwork(nn.Module):
    """torchdiffeq's CNF example: t -> the parameters W, B, U of a width-`width` planar-flow layer."""

    def __init__(self, in_out_dim, hidden_dim, width):
        super().__init__()
        self.width, self.in_out_dim = width, in_out_dim
        self.blocksize = width * in_out_dim
        self.fc1 = nn.Linear(1, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, 3 * self.blocksize + width)

    def forward(self, t):
        params = torch.tanh(self.fc1(t.reshape(1, 1)))
        params = self.fc3(torch.tanh(self.fc2(params))).reshape(-1)
        n = self.blocksize
        W = params[:n].reshape(self.width, self.in_out_dim, 1)
        U = params[n:2 * n].reshape(self.width, 1, self.in_out_dim)
        G = params[2 * n:3 * n].reshape(self.width, 1, self.in_out_dim)
        U = U * torch.sigmoid(G)
        B = params[3 * n:].reshape(self.width, 1, 1)
        return W, B, U


class HyperCNF(nn.Module):
    """dz/dt = mean_i u_i tanh(w_i . z + b_i), with (w, b, u) from the hypernetwork; forward(t, z)."""

    def __init__(self, in_out_dim=2, hidden_dim=16, width=16):
        super().__init__()
        self.width = width
        self.hyper_net = HyperNetwork(in_out_dim, hidden_dim, width)

    def forward(self, t, z):
        W, B, U = self.hyper_net(t)
        Z = torch.unsqueeze(z, 0).repeat(self.width, 1, 1)
        h = torch.tanh(torch.matmul(Z, W) + B)
        return torch.matmul(h, U).mean(0)

    def as_sequential_params(self, t, prefix=""):
        """The same dynamics as Linear -> Tanh -> Linear, for torch.func.functional_call on `template`."""
        W, B, U = self.hyper_net(t)
        d = W.shape[1]
        return {prefix + "0.weight": W[:, :, 0], prefix + "0.bias": B[:, 0, 0],
                prefix + "2.weight": U[:, 0, :].t() / self.width,  # a transposed, non-contiguous weight
                prefix + "2.bias": W.new_zeros(d)}

    def template(self):
        d = self.hyper_net.in_out_dim
        return nn.Sequential(nn.Linear(d, self.width), nn.Tanh(), nn.Linear(self.width, d))


# ---- SIREN (Sitzmann et al. 2020)

def get_subdict(params, key):
    if params is None:
        return None
    prefix = key + "."
    return OrderedDict((k[len(prefix):], v) for k, v in params.items() if k.startswith(prefix))


class MetaModule(nn.Module):
    """torchmeta's marker: the forward takes (input, params=None)."""


class MetaSequential(nn.Sequential, MetaModule):
    """torchmeta's MetaSequential: a Sequential whose forward passes each MetaModule its own params."""

    def forward(self, input, params=None):
        for name, module in self._modules.items():
            if isinstance(module, MetaModule):
                input = module(input, params=get_subdict(params, name))
            else:
                input = module(input)
        return input


class BatchLinear(nn.Linear, MetaModule):
    """SIREN's Linear layer: parameters may come from `params` (a hypernetwork or meta-learning)."""

    def forward(self, input, params=None):
        if params is None:
            params = OrderedDict(self.named_parameters())
        bias = params.get("bias", None)
        weight = params["weight"]
        output = input.matmul(weight.permute(*range(weight.dim() - 2), -1, -2))
        output += bias.unsqueeze(-2)
        return output


class Sine(nn.Module):
    """SIREN's activation, sin(30 x), as its own module (not torchjac.Sine)."""

    def forward(self, input):
        return torch.sin(30 * input)


def _sine_init(m):
    if hasattr(m, "weight"):
        n = m.weight.size(-1)
        with torch.no_grad():
            m.weight.uniform_(-math.sqrt(6 / n) / 30, math.sqrt(6 / n) / 30)


def _first_layer_sine_init(m):
    if hasattr(m, "weight"):
        n = m.weight.size(-1)
        with torch.no_grad():
            m.weight.uniform_(-1 / n, 1 / n)


class FCBlock(MetaModule):
    """SIREN's FCBlock with sine activations: MetaSequential blocks of BatchLinear and Sine."""

    def __init__(self, in_features=2, out_features=1, num_hidden_layers=2, hidden_features=32,
                 outermost_linear=True):
        super().__init__()
        blocks = [MetaSequential(BatchLinear(in_features, hidden_features), Sine())]
        for _ in range(num_hidden_layers):
            blocks.append(MetaSequential(BatchLinear(hidden_features, hidden_features), Sine()))
        if outermost_linear:
            blocks.append(MetaSequential(BatchLinear(hidden_features, out_features)))
        else:
            blocks.append(MetaSequential(BatchLinear(hidden_features, out_features), Sine()))
        self.net = MetaSequential(*blocks)
        self.net.apply(_sine_init)
        self.net[0].apply(_first_layer_sine_init)

    def forward(self, coords, params=None, **kwargs):
        return self.net(coords, params=get_subdict(params, "net"))


class SineLayer(nn.Module):
    """The SIREN notebook's layer: sin(omega_0 * linear(x)), with the first-layer or hidden-layer init."""

    def __init__(self, in_features, out_features, bias=True, is_first=False, omega_0=30.0):
        super().__init__()
        self.omega_0 = omega_0
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        bound = 1 / in_features if is_first else math.sqrt(6 / in_features) / omega_0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, input):
        return torch.sin(self.omega_0 * self.linear(input))


class Siren(nn.Module):
    """The SIREN notebook's model; its forward detaches the coordinates, so one differentiates `self.net`."""

    def __init__(self, in_features=2, hidden_features=32, hidden_layers=2, out_features=1, outermost_linear=True,
                 first_omega_0=30.0, hidden_omega_0=30.0):
        super().__init__()
        net = [SineLayer(in_features, hidden_features, is_first=True, omega_0=first_omega_0)]
        for _ in range(hidden_layers):
            net.append(SineLayer(hidden_features, hidden_features, omega_0=hidden_omega_0))
        if outermost_linear:
            final = nn.Linear(hidden_features, out_features)
            bound = math.sqrt(6 / hidden_features) / hidden_omega_0
            with torch.no_grad():
                final.weight.uniform_(-bound, bound)
            net.append(final)
        else:
            net.append(SineLayer(hidden_features, out_features, omega_0=hidden_omega_0))
        self.net = nn.Sequential(*net)

    def forward(self, coords):
        coords = coords.clone().detach().requires_grad_(True)
        return self.net(coords), coords


# ---- PointNet (Qi et al. 2017): the shared per-point MLP

def pointnet_shared_mlp(widths=(16, 32, 64)):
    """conv1-bn1-relu, conv2-bn2-relu, conv3-bn3 on (B, 3, N): 1x1 convolutions, eval BatchNorm."""
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv1d(c, w, 1), nn.BatchNorm1d(w)]
        if i < len(widths) - 1:
            layers.append(nn.ReLU())
        c = w
    return nn.Sequential(*layers)


# ---- NeRF (Mildenhall et al. 2020)

class NeRF(nn.Module):
    """NeRF's MLP with its embedders inside: xyz (encoded) -> ReLU trunk with the input concatenated
    after layer `skips`; sigma from the trunk; rgb from [feature, encoded view direction] (one per point)."""

    def __init__(self, D=4, W=32, skips=(2,), multires=4, multires_views=2):
        super().__init__()
        self.embed = FrequencyEmbedder(3, multires)
        self.embed_views = FrequencyEmbedder(3, multires_views)
        self.skips = skips
        ch, ch_views = self.embed.out_dim, self.embed_views.out_dim
        self.pts_linears = nn.ModuleList(
            [nn.Linear(ch, W)] + [nn.Linear(W + (ch if i in skips else 0), W) for i in range(D - 1)])
        self.views_linears = nn.ModuleList([nn.Linear(ch_views + W, W // 2)])
        self.feature_linear = nn.Linear(W, W)
        self.alpha_linear = nn.Linear(W, 1)
        self.rgb_linear = nn.Linear(W // 2, 3)

    def forward(self, x, viewdirs):
        input_pts, input_views = self.embed(x), self.embed_views(viewdirs)
        h = input_pts
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([input_pts, h], -1)
        alpha = self.alpha_linear(h)
        h = torch.cat([self.feature_linear(h), input_views], -1)
        for layer in self.views_linears:
            h = F.relu(layer(h))
        return torch.cat([self.rgb_linear(h), alpha], -1)


# ---- Nerfies (Park et al. 2021): deformation fields with a per-image latent code

class AnnealedSinusoidalEncoder(nn.Module):
    """[x, w_k sin(2^k x), w_k cos(2^k x)] with the coarse-to-fine window w_k = (1 - cos(pi clip(alpha - k)))/2."""

    def __init__(self, num_freqs=4, alpha=2.5):
        super().__init__()
        self.num_freqs, self.alpha = num_freqs, alpha
        self.register_buffer("freq_bands", 2.0 ** torch.arange(num_freqs, dtype=torch.float32))

    def forward(self, x):
        window = 0.5 * (1 - torch.cos(math.pi * torch.clamp(
            self.alpha - torch.arange(self.num_freqs, dtype=x.dtype, device=x.device), 0.0, 1.0)))
        xb = x[..., None, :] * self.freq_bands[:, None]                      # (..., F, 3)
        features = torch.sin(torch.cat([xb, xb + 0.5 * math.pi], -2))         # (..., 2F, 3)
        features = features * window.repeat(2)[:, None]
        return torch.cat([x, features.flatten(-2)], -1)


class NerfiesMLP(nn.Module):
    """Nerfies' MLP: the input concatenated before each layer in `skips`, ReLU after every hidden layer."""

    def __init__(self, d_in, depth, width, skips=(), d_out=0, output_init_scale=None):
        super().__init__()
        self.skips = skips
        self.hidden = nn.ModuleList(
            [nn.Linear((d_in if i == 0 else width) + (d_in if i in skips and i > 0 else 0), width)
             for i in range(depth)])
        self.output = nn.Linear(width if depth else d_in, d_out) if d_out else None
        if self.output is not None and output_init_scale is not None:
            nn.init.uniform_(self.output.weight, -output_init_scale, output_init_scale)
            nn.init.zeros_(self.output.bias)

    def forward(self, x):
        inputs = x
        for i, layer in enumerate(self.hidden):
            if i in self.skips and i > 0:
                x = torch.cat([x, inputs], -1)
            x = F.relu(layer(x))
        return self.output(x) if self.output is not None else x


def _skew(w):
    zero = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([zero, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], zero, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], zero], -1)], -2)


class SE3Field(nn.Module):
    """Nerfies' SE(3) deformation: an MLP of [encoded x, latent] gives a screw axis (w, v); the point
    moves by exp of the twist, R x + p (Rodrigues' formula)."""

    def __init__(self, num_freqs=4, alpha=2.5, d_latent=8, depth=4, width=32, skips=(2,), output_init_scale=1e-4):
        super().__init__()
        self.encoder = AnnealedSinusoidalEncoder(num_freqs, alpha)
        d_in = 3 * (1 + 2 * num_freqs) + d_latent
        self.trunk = NerfiesMLP(d_in, depth, width, skips)
        self.branch_w = NerfiesMLP(width, 0, width, d_out=3, output_init_scale=output_init_scale)
        self.branch_v = NerfiesMLP(width, 0, width, d_out=3, output_init_scale=output_init_scale)

    def forward(self, points, latent):
        latent = latent.expand(*points.shape[:-1], latent.shape[-1])
        trunk = self.trunk(torch.cat([self.encoder(points), latent], -1))
        w, v = self.branch_w(trunk), self.branch_v(trunk)
        theta = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        w, v = w / theta, v / theta
        W = _skew(w)
        WW = W @ W
        s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
        eye = torch.eye(3, dtype=points.dtype, device=points.device)
        R = eye + s * W + (1 - c) * WW
        G = theta[..., None] * eye + (1 - c) * W + (theta[..., None] - s) * WW
        p = (G @ v[..., None])[..., 0]
        return (R @ points[..., None])[..., 0] + p


class TranslationField(nn.Module):
    """Nerfies' translation deformation: x + MLP([encoded x, latent])."""

    def __init__(self, num_freqs=4, alpha=2.5, d_latent=8, depth=4, width=32, skips=(2,), output_init_scale=1e-4):
        super().__init__()
        self.encoder = AnnealedSinusoidalEncoder(num_freqs, alpha)
        d_in = 3 * (1 + 2 * num_freqs) + d_latent
        self.mlp = NerfiesMLP(d_in, depth, width, skips, d_out=3, output_init_scale=output_init_scale)

    def forward(self, points, latent):
        latent = latent.expand(*points.shape[:-1], latent.shape[-1])
        return points + self.mlp(torch.cat([self.encoder(points), latent], -1))


def geman_mcclure(sq_residual, scale):
    """Nerfies' robust elastic loss (Barron's general loss at alpha=-2) of a squared residual."""
    r = sq_residual / scale ** 2
    return 2 * r / (r + 4)
