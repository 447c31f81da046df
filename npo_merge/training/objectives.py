"""The training objectives by name (dpo, dpo-npo, self-npo): what data each needs and how ties are treated.

A trainer looks an objective up with `get_objective(name)` and reads off which data to load
(preference pairs or captioned images), whether the DPO loss is reversed, and the role of the
delta it produces. The loss math itself lives in `npo_merge.training.losses`.

Ties. Pick-a-Pic labels a tie as label_0 = 0.5. We drop ties by default and report how many.
The official scripts keep them, by accident: the diffusers Diffusion-DPO script swaps the two
images only when label_0 == 0 and the NPO script only when label_0 == 1, so a tie always leaves
jpg_0 in the slot the loss pulls the model towards. In both the DPO and the NPO run the model
silently learns to move towards jpg_0 of every tied pair (treated as the winner by DPO, as the
loser by NPO). `tie_winner(objective, keep_ties=True)` reproduces exactly that, for comparisons
with the published weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from npo_merge.delta.types import Role
from npo_merge.errors import InputError
from npo_merge.training.datasets import TieWinner
from npo_merge.training.losses import BetaConvention

ObjectiveName = Literal["dpo", "dpo-npo", "self-npo"]
DataKind = Literal["pairs", "captions"]


@dataclass(frozen=True)
class Objective:
    """One training objective: its data, its loss direction and the role of the delta it yields."""

    name: ObjectiveName
    data: DataKind
    role: Role
    reverse: bool
    summary: str


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo", "pairs", "positive", False,
        "Diffusion-DPO on preference pairs: a positive offset that moves towards the preferred images.",
    ),
    "dpo-npo": Objective(
        "dpo-npo", "pairs", "negative", True,
        "Diffusion-NPO: Diffusion-DPO with the preference reversed, a negative offset for the unconditional branch.",
    ),
    "self-npo": Objective(
        "self-npo", "captions", "negative", False,
        "Self-NPO: distil the model's own anti-guided predictions; captioned images, no preference labels.",
    ),
}


def get_objective(name: str) -> Objective:
    """The objective called `name`, or an InputError listing the known ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(
            f"unknown training objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        ) from None


def tie_winner(objective: Objective | str, keep_ties: bool = False) -> TieWinner:
    """How the data should resolve ties for `objective`: "drop", or the image that the official script favoured.

    With keep_ties, DPO keeps jpg_0 as winner; DPO-NPO keeps jpg_1 as winner, so that the reversed
    loss pulls the model towards jpg_0 as the official NPO script did.
    """
    obj = get_objective(objective) if isinstance(objective, str) else objective
    if obj.data != "pairs":
        raise InputError(f"objective {obj.name!r} uses no preference pairs, so it has no ties to resolve")
    if not keep_ties:
        return "drop"
    return "jpg_1" if obj.reverse else "jpg_0"


@dataclass(frozen=True)
class DpoBeta:
    """A DPO beta together with the convention it is written in (see losses.convert_beta)."""

    value: float
    convention: BetaConvention


# The strengths the NPO paper's scripts used (G-U-N/Diffusion-NPO, DPO-DPO-NPO/run_sd15.sh, run_sdxl.sh).
PAPER_BETA: dict[str, DpoBeta] = {
    "sd1": DpoBeta(500.0, "diffusers"),   # == 1000 in the official form
    "sdxl": DpoBeta(2000.0, "official"),  # == 1000 in the diffusers form
}


@dataclass(frozen=True)
class SelfNpoSettings:
    """Self-NPO teacher settings from the official code (Self-NPO/train.py, train_xl.py).

    w is in the official form out_c + w (out_c - out_u); uncond is what the unconditional branch
    sees: the encoded empty prompt (SD1.5) or all-zero embeddings (SDXL).
    """

    w: float
    uncond: Literal["empty-prompt", "zeros"]
    num_ddim_steps: int = 25
    teacher_steps: int = 5
    huber_c: float = 1e-3
    ema_decay: float = 0.999


PAPER_SELF_NPO: dict[str, SelfNpoSettings] = {
    "sd1": SelfNpoSettings(w=-1.0, uncond="empty-prompt"),
    "sdxl": SelfNpoSettings(w=-5.0, uncond="zeros"),
}
