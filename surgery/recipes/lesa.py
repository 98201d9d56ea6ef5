"""LESA (Yang et al., LESA: Learnable LLM Layer Scaling-Up, arXiv 2502.13794): new layers whose weights a small
network predicts from their neighbours', in the latent space of one SVD over all layers.

For each projection type (q, k, v, o, gate, up, down): W_cat = [W_0 … W_{L−1}] (concatenated along the input
dimension) = U·S·Vᵀ, and Vᵀ splits into one block B_l (rank × in) per layer, W_l = U·S·B_l. An MLP
(2·in → 256 → 256 → in) learns row j of B_i from rows j of B_{i−1} and B_{i+1}, on every triplet of adjacent
layers but one, held out to measure its error; a new layer between layers i and i + 1 is U·S·f(B_i, B_{i+1}).
Training as in the official setting: AdamW, lr 1e-3, 10 epochs, batch 64, loss 0.9995·MSE + 0.0005·MSE of the
row norms.

Choices where the paper leaves room or where this project deviates:
- Norms: the official code copies layer 0's RMSNorm weights into every new layer; here the mean of the two
  neighbours' (`--norms first` gives the official choice; bench/results/lesa.md compares the two). Biases and
  per-head q/k norms, which the SVD does not cover, are the neighbours' mean too.
- The blocks are scaled by √L before training (their rows have norm ≈ 1/√L), so the MLP's default
  initialisation fits their scale; predictions are scaled back. The MLP uses ReLU.
- The predictor's held-out error is reported beside that of the plain neighbour mean (B_i + B_{i+1}) / 2, in
  weight space (‖U·S·(f − B)‖ / ‖W‖), so the number says what the predictor adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.growth import NORMS, GrowthRecipe, layer_name, neighbour_mean

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.checkpoint.rewrite import TensorPlan

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORM_CHOICES = ("neighbours", "first")
NORM_TERMS = ("official", "rows")  # the loss's norm term: see lesa_loss


@dataclass
class LESA(GrowthRecipe):
    name: ClassVar[str] = "lesa"
    paper: ClassVar[str] = "Yang et al., LESA: Learnable LLM Layer Scaling-Up (arXiv 2502.13794)"
    saves: ClassVar[str] = "nothing: grows the model in depth, with new layers predicted from their neighbours"
    excludes: ClassVar[dict[str, str]] = {"depth-up": "both grow the model; grow it once"}

    norms: str = field(default="neighbours", metadata={"help": "new layers' RMSNorm weights: neighbours (their mean) or first (layer 0's, as the official code)", "choices": NORM_CHOICES})
    predictor_epochs: int = field(default=10, metadata={"help": "epochs of the predictor's training", "min": 1})
    predictor_width: int = field(default=256, metadata={"help": "the predictor's hidden width", "min": 1})
    norm_term: str = field(default="official", metadata={"help": "the loss's norm term: official (one squared difference of the whole batch's 2-norms, the official notebook's) or rows (MSE of per-row norms)", "choices": NORM_TERMS})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.predicted: dict[str, torch.Tensor] = {}

    def validate(self, config) -> None:
        super().validate(config)
        if config.moe_layers:
            raise SurgeryError("LESA predicts dense layers' projections; this model's MLPs are experts",
                               hint="grow it with --recipe depth-up")
        if config.num_hidden_layers < 4 and self.target(config.num_hidden_layers) > config.num_hidden_layers:
            raise SurgeryError(f"LESA learns from triplets of adjacent layers, one held out: {config.num_hidden_layers} "
                               "layers are too few", hint="use --recipe depth-up on a model this shallow")

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        plan = super().plan(runner, calibration_ids, seed, progress)
        layout = [tuple(slot) for slot in plan["layout"]]
        num_layers = runner.config.num_hidden_layers
        self.predicted, errors = {}, {}
        if not plan["new_layers"]:
            return {**plan, "predictor": errors}
        held_out = min(max(num_layers - num_layers // 4, 1), num_layers - 2)  # a middle layer of the upper half
        for projection in tqdm(PROJECTIONS, desc="LESA predictors", unit="projection", disable=not progress):
            def read(layer: int, projection: str = projection) -> torch.Tensor:
                return runner.tensor(layer_name(layer, f"{projection}.weight")).float()

            basis, blocks = latent_blocks(read, num_layers)
            predictor, errors[projection] = fit_predictor(basis, blocks, read(held_out), held_out,
                                                          self.predictor_epochs, self.predictor_width, seed,
                                                          norm_term=self.norm_term)
            for index, (kind, lower) in enumerate(layout):
                if kind == "new":
                    with torch.no_grad():
                        block = predict(predictor, blocks[lower], blocks[lower + 1])
                    self.predicted[layer_name(index, f"{projection}.weight")] = basis @ block
        return {**plan, "predictor": errors, "held_out_layer": held_out}

    def build_new_layer(self, plan: TensorPlan, index: int, lower: int, suffix: str) -> None:
        name = layer_name(index, suffix)
        if name in self.predicted:
            plan.add(name, self.predicted[name])
        elif suffix in NORMS and self.norms == "first":
            plan.rename(name, layer_name(0, suffix))
        else:
            plan.derive(name, [layer_name(lower, suffix), layer_name(lower + 1, suffix)], neighbour_mean)

    def describe(self, plan: dict[str, Any]) -> list[str]:
        lines = super().describe(plan)
        errors = plan.get("predictor") or {}
        if errors:
            mean = sum(e["predictor"] for e in errors.values()) / len(errors)
            baseline = sum(e["neighbour_mean"] for e in errors.values()) / len(errors)
            lines.append(f"predicted from their neighbours (held-out layer {plan['held_out_layer']}: relative weight "
                         f"error {mean:.3f}, against {baseline:.3f} for the neighbours' mean and 1.000 for zeros)")
            worse = sorted(name for name, e in errors.items() if e["predictor"] > 1.0)
            if worse:
                lines.append(f"warning: the predictor does worse than predicting zeros on {', '.join(worse)}: "
                             "those layers start from little more than noise (more --predictor-epochs, or "
                             "--recipe depth-up)")
        return lines


def latent_blocks(read: Callable[[int], torch.Tensor], layers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U·S (out × rank) and each layer's block of Vᵀ (rank × in) of the SVD of the layers' weights side by side,
    W = [W_1 … W_L] = U·S·Vᵀ, without ever putting them side by side: G = W·Wᵀ = Σ W_i·W_iᵀ is accumulated one layer
    at a time (`read(i)`, float64), its eigenvectors are U and its eigenvalues S², and each block is
    Vᵀ_i = S⁻¹·Uᵀ·W_i. Memory: one layer and the out × out Gram matrix, not L layers and an SVD's workspace (at 7B,
    the concatenated down_proj alone is 5.8 GB). Each column of U is signed so its largest entry is positive (an SVD's
    signs are arbitrary); `tests/recipes/test_depth_growth.py` checks the blocks against a direct SVD."""
    gram = None
    for layer in range(layers):
        weight = read(layer).double()
        gram = weight @ weight.T if gram is None else gram + weight @ weight.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = eigenvalues.argsort(descending=True)
    eigenvalues = eigenvalues[order]
    rank = int((eigenvalues > eigenvalues[0] * 1e-12).sum())  # the rest is the eigensolver's float64 noise
    singular, u = eigenvalues[:rank].sqrt(), eigenvectors[:, order[:rank]]
    peak = u.abs().argmax(0)
    u = u * torch.sign(u[peak, torch.arange(rank)])
    blocks = [((u.T @ read(layer).double()) / singular[:, None]).float() for layer in range(layers)]
    return (u * singular).float(), blocks


def make_predictor(width: int, hidden: int) -> torch.nn.Module:
    """2·in → hidden → hidden → in."""
    return torch.nn.Sequential(torch.nn.Linear(2 * width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, width))


def predict(predictor: torch.nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Block rows of the layer between `lower` and `upper`, from theirs (blocks in their SVD scale)."""
    scale = predictor.scale
    return predictor(torch.cat([lower, upper], dim=1) * scale) / scale


def lesa_loss(predicted: torch.Tensor, target: torch.Tensor, norm_term: str = "official") -> torch.Tensor:
    """0.9995·MSE + 0.0005·norm term. "official": the official notebook's (`train_LESA.ipynb`), one squared
    difference per batch between the 2-norms of the whole predicted batch and the whole target batch,
    MSE(‖outputs‖₂, ‖Y‖₂) of two scalars; "rows": the MSE of the per-row norms, this recipe's first reading."""
    if norm_term == "official":
        norms = (predicted.norm() - target.norm()).square()
    else:
        norms = torch.nn.functional.mse_loss(predicted.norm(dim=1), target.norm(dim=1))
    return 0.9995 * torch.nn.functional.mse_loss(predicted, target) + 0.0005 * norms


def fit_predictor(basis: torch.Tensor, blocks: list[torch.Tensor], truth: torch.Tensor, held_out: int,
                  epochs: int, hidden: int, seed: int, batch_size: int = 64, lr: float = 1e-3,
                  norm_term: str = "official") -> tuple[torch.nn.Module, dict[str, float]]:
    """Train the predictor on the triplets (i − 1, i, i + 1), one row of the blocks per sample, all but the triplet
    centred on `held_out`; return it with its held-out relative weight error against `truth` (that layer's weight),
    the neighbour mean's, and the zero predictor's (1 by definition: an error above it is worse than zeros)."""
    generator = torch.Generator().manual_seed(seed)
    scale = math.sqrt(len(blocks))
    middles = [i for i in range(1, len(blocks) - 1) if i != held_out]
    rows = blocks[0].shape[0]

    def batch_of(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample k is row k % rows of the triplet centred on middles[k // rows]; gathered per batch, so the rows
        of every triplet are never all in memory at once (at 1.2B, 2.7 GB for down_proj)."""
        layer = torch.tensor(middles)[samples // rows]
        row = samples % rows
        lower = torch.stack([blocks[i - 1][j] for i, j in zip(layer.tolist(), row.tolist())])
        upper = torch.stack([blocks[i + 1][j] for i, j in zip(layer.tolist(), row.tolist())])
        target = torch.stack([blocks[i][j] for i, j in zip(layer.tolist(), row.tolist())])
        return torch.cat([lower, upper], dim=1) * scale, target * scale

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predictor = make_predictor(blocks[0].shape[1], hidden)
    predictor.scale = scale
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(middles) * rows, generator=generator)
            for batch in order.split(batch_size):
                inputs, targets = batch_of(batch)
                loss = lesa_loss(predictor(inputs), targets, norm_term)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    predictor.eval()
    with torch.no_grad():
        lower, upper = blocks[held_out - 1], blocks[held_out + 1]
        predicted = basis @ predict(predictor, lower, upper)
        mean = basis @ ((lower + upper) / 2)
        errors = {"predictor": float((predicted - truth).norm() / truth.norm()),
                  "neighbour_mean": float((mean - truth).norm() / truth.norm()),
                  "zeros": float((torch.zeros_like(truth) - truth).norm() / truth.norm())}
    return predictor, errors
